package attach

import (
	"bytes"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/mdlayher/genetlink"
)

// unhex turns a spaced hex dump into bytes; on each line, the first word
// that is not hex starts a comment.
func unhex(t *testing.T, s string) []byte {
	t.Helper()
	var words []string
	for _, line := range strings.Split(s, "\n") {
		for _, w := range strings.Fields(line) {
			if _, err := hex.DecodeString(w); err != nil {
				break
			}
			words = append(words, w)
		}
	}
	b, err := hex.DecodeString(strings.Join(words, ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The expected encodings below are assembled by hand from
// include/uapi/linux/nbd-netlink.h and include/uapi/linux/netlink.h: each
// attribute is struct nlattr {u16 nla_len; u16 nla_type} in host (little)
// endian, then the payload padded to 4 bytes; nla_len counts header and
// payload but not padding; nested attributes carry NLA_F_NESTED (0x8000),
// which the kernel masks off (nla_type()).
func TestEncodeConnectAttrs(t *testing.T) {
	got, err := encodeConnectAttrs(connectRequest{
		Index:       -1, // kernel picks: NBD_ATTR_INDEX absent
		SizeBytes:   1 << 30,
		BlockSize:   4096,
		TimeoutSec:  30,
		DeadConnSec: 120,
		// HAS_FLAGS|SEND_FLUSH|SEND_FUA|CAN_MULTI_CONN
		ServerFlags: 0x10d,
		Backend:     "vol-1",
		FDs:         []int{3, 4},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := unhex(t, `
		0c00 0200  00000040 00000000   NBD_ATTR_SIZE_BYTES (2) u64 1<<30
		0c00 0300  00100000 00000000   NBD_ATTR_BLOCK_SIZE_BYTES (3) u64 4096
		0c00 0400  1e000000 00000000   NBD_ATTR_TIMEOUT (4) u64 30
		0c00 0500  0d010000 00000000   NBD_ATTR_SERVER_FLAGS (5) u64 0x10d
		0c00 0800  78000000 00000000   NBD_ATTR_DEAD_CONN_TIMEOUT (8) u64 120
		0a00 0a00  766f6c2d 3100 0000  NBD_ATTR_BACKEND_IDENTIFIER (10) "vol-1\0" + 2 pad
		1c00 0780                      NBD_ATTR_SOCKETS (7) | NLA_F_NESTED, 28 bytes
		  0c00 0180                    NBD_SOCK_ITEM (1) | NLA_F_NESTED
		    0800 0100 03000000         NBD_SOCK_FD (1) u32 3
		  0c00 0180
		    0800 0100 04000000         NBD_SOCK_FD (1) u32 4
	`)
	if !bytes.Equal(got, want) {
		t.Fatalf("CONNECT attributes\n got %x\nwant %x", got, want)
	}
}

func TestEncodeConnectAttrsIndexAndReconfigure(t *testing.T) {
	got, err := encodeConnectAttrs(connectRequest{
		Index: 5, SizeBytes: 4096, BlockSize: 512, ServerFlags: 1, FDs: []int{7},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := unhex(t, `
		0800 0100  05000000            NBD_ATTR_INDEX (1) u32 5
		0c00 0200  00100000 00000000   SIZE_BYTES 4096
		0c00 0300  00020000 00000000   BLOCK_SIZE_BYTES 512
		0c00 0500  01000000 00000000   SERVER_FLAGS 1
		1000 0780  0c00 0180 0800 0100 07000000
	`)
	if !bytes.Equal(got, want) {
		t.Fatalf("CONNECT with index\n got %x\nwant %x", got, want)
	}

	// RECONFIGURE: index, timeouts, backend (the kernel requires it to match
	// when the device has one) and sockets; never size or flags.
	got, err = encodeConnectAttrs(connectRequest{
		Index: 2, SizeBytes: 99, ServerFlags: 0xff, DeadConnSec: 60, Backend: "v", FDs: []int{9}, reconfigureOnly: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	want = unhex(t, `
		0800 0100  02000000            INDEX 2
		0c00 0800  3c000000 00000000   DEAD_CONN_TIMEOUT 60
		0600 0a00  7600 0000           BACKEND "v\0" + 2 pad
		1000 0780  0c00 0180 0800 0100 09000000
	`)
	if !bytes.Equal(got, want) {
		t.Fatalf("RECONFIGURE\n got %x\nwant %x", got, want)
	}
}

func TestEncodeConnectAttrsRejects(t *testing.T) {
	for name, r := range map[string]connectRequest{
		"no sockets":              {Index: -1, SizeBytes: 4096},
		"zero size":               {Index: -1, FDs: []int{3}},
		"negative fd":             {Index: -1, SizeBytes: 4096, FDs: []int{-1}},
		"reconfigure needs index": {Index: -1, FDs: []int{3}, reconfigureOnly: true},
	} {
		if _, err := encodeConnectAttrs(r); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := encodeIndexAttrs(-1); err == nil {
		t.Error("negative index accepted")
	}
}

func TestGenetlinkMessage(t *testing.T) {
	attrs, err := encodeIndexAttrs(3)
	if err != nil {
		t.Fatal(err)
	}
	b, err := genetlink.Message{
		Header: genetlink.Header{Command: nbdCmdDisconnect, Version: nbdGenlVersion},
		Data:   attrs,
	}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	// struct genlmsghdr {u8 cmd; u8 version; u16 reserved} then attributes.
	want := unhex(t, `02 01 0000   0800 0100 03000000`)
	if !bytes.Equal(b, want) {
		t.Fatalf("DISCONNECT message\n got %x\nwant %x", b, want)
	}
}

func TestDecodeReplies(t *testing.T) {
	// CONNECT reply: nbd_connect_reply puts NBD_ATTR_INDEX u32.
	idx, err := decodeIndex(unhex(t, `0800 0100 07000000`))
	if err != nil || idx != 7 {
		t.Fatalf("decodeIndex = %d, %v; want 7", idx, err)
	}
	if _, err := decodeIndex(unhex(t, `0c00 0200 00000040 00000000`)); err == nil {
		t.Fatal("reply without index accepted")
	}
	if _, err := decodeIndex([]byte{1, 2, 3}); err == nil {
		t.Fatal("garbage accepted")
	}

	// STATUS reply (populate_nbd_status): DEVICE_LIST { DEVICE_ITEM {INDEX u32, CONNECTED u8} ... }.
	// The kernel uses nla_nest_start_noflag, so no NLA_F_NESTED here.
	st, err := decodeStatus(unhex(t, `
		2c00 0900
		  1400 0100  0800 0100 00000000  0500 0200 01 000000
		  1400 0100  0800 0100 03000000  0500 0200 00 000000
	`))
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 2 || st[0] != (deviceStatus{0, true}) || st[1] != (deviceStatus{3, false}) {
		t.Fatalf("decodeStatus = %+v", st)
	}
}
