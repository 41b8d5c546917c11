package attach

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/mdlayher/netlink"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// The fuzz targets cover what this package reads from outside: netlink
// replies and events from the kernel's nbd family, the NBD server's side of
// the handshake, the options nbdfuse sends the relay, the attachment
// records under the state dir, and mountinfo paths.

// encodeStatus is the kernel's populate_nbd_status: DEVICE_LIST holding
// one DEVICE_ITEM {INDEX u32, CONNECTED u8} per device.
func encodeStatus(t testing.TB, devs []deviceStatus) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(nbdAttrDeviceList, func(list *netlink.AttributeEncoder) error {
		for _, d := range devs {
			list.Nested(nbdDeviceItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(nbdDeviceIndex, uint32(d.Index))
				c := uint8(0)
				if d.Connected {
					c = 1
				}
				item.Uint8(nbdDeviceConnected, c)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// statusFromBytes turns fuzz bytes into a device list (5 bytes a device).
func statusFromBytes(b []byte) []deviceStatus {
	var out []deviceStatus
	for ; len(b) >= 5; b = b[5:] {
		out = append(out, deviceStatus{Index: int(binary.LittleEndian.Uint32(b) & math.MaxInt32), Connected: b[4]&1 != 0})
	}
	return out
}

func FuzzDecodeStatus(f *testing.F) {
	f.Add(encodeStatus(f, []deviceStatus{{0, true}, {3, false}}))
	f.Add(encodeStatus(f, nil))
	f.Add(encodeStatus(f, []deviceStatus{{math.MaxInt32, true}}))
	f.Add([]byte{0x2c, 0, 0x09, 0, 0x14, 0, 1, 0, 8, 0, 1, 0, 0, 0, 0, 0, 5, 0, 2, 0, 1, 0, 0, 0})
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		got, err := decodeStatus(b)
		if err == nil {
			for _, d := range got {
				if d.Index < 0 || d.Index > math.MaxInt32 {
					t.Fatalf("decodeStatus(%x): index %d out of range", b, d.Index)
				}
			}
			// What was decoded re-encodes to a reply that decodes equal.
			again, err := decodeStatus(encodeStatus(t, got))
			if err != nil || !reflect.DeepEqual(again, got) {
				t.Fatalf("status %+v re-encoded decodes as %+v, %v", got, again, err)
			}
		}
		// And the fuzz bytes read as a device list round-trip.
		want := statusFromBytes(b)
		rt, err := decodeStatus(encodeStatus(t, want))
		if err != nil || len(rt) != len(want) || (len(want) > 0 && !reflect.DeepEqual(rt, want)) {
			t.Fatalf("status %+v round-trips as %+v, %v", want, rt, err)
		}
	})
}

func FuzzDecodeIndex(f *testing.F) {
	for _, i := range []int{0, 7, math.MaxInt32} {
		b, err := encodeIndexAttrs(i)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0x0c, 0, 0x02, 0, 0, 0, 0, 0x40, 0, 0, 0, 0})
	f.Add([]byte{0x08, 0, 0x01, 0, 0xff, 0xff, 0xff, 0xff}) // index 2^32-1: no such device
	f.Add([]byte{0x06, 0, 0x01, 0, 0xff, 0xff, 0, 0})       // index too short
	f.Fuzz(func(t *testing.T, b []byte) {
		idx, err := decodeIndex(b)
		if err != nil {
			return
		}
		// Anything accepted is an index the package can address again
		// (DISCONNECT, STATUS), and re-encodes to itself.
		enc, err := encodeIndexAttrs(idx)
		if err != nil {
			t.Fatalf("decodeIndex(%x) = %d, which encodeIndexAttrs refuses: %v", b, idx, err)
		}
		if again, err := decodeIndex(enc); err != nil || again != idx {
			t.Fatalf("index %d re-encoded decodes as %d, %v", idx, again, err)
		}
	})
}

// serverStream is what a well-behaved server sends a client doing OPT_GO:
// greeting, NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE, ACK.
func serverStream(info nbdproto.ExportInfo) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicNBD)
	b = binary.BigEndian.AppendUint64(b, nbdproto.MagicOption)
	b = binary.BigEndian.AppendUint16(b, nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
	reply := func(typ uint32, body []byte) {
		b = binary.BigEndian.AppendUint64(b, nbdproto.MagicOptReply)
		b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
		b = append(b, body...)
	}
	reply(nbdproto.RepInfo, exportInfo(info.Size, info.Flags))
	bs := binary.BigEndian.AppendUint16(nil, nbdproto.InfoBlockSize)
	bs = binary.BigEndian.AppendUint32(bs, info.MinBlock)
	bs = binary.BigEndian.AppendUint32(bs, info.PrefBlock)
	bs = binary.BigEndian.AppendUint32(bs, info.MaxBlock)
	reply(nbdproto.RepInfo, bs)
	reply(nbdproto.RepAck, nil)
	return b
}

// expectHandshake is an independent reading of the protocol document: what
// a client doing OPT_GO should make of the server's bytes.
func expectHandshake(b []byte) (nbdproto.ExportInfo, bool) {
	var info nbdproto.ExportInfo
	if len(b) < 18 || binary.BigEndian.Uint64(b) != nbdproto.MagicNBD || binary.BigEndian.Uint64(b[8:]) != nbdproto.MagicOption ||
		binary.BigEndian.Uint16(b[16:])&nbdproto.FlagFixedNewstyle == 0 {
		return info, false
	}
	b = b[18:]
	got := false
	for {
		if len(b) < 20 || binary.BigEndian.Uint64(b) != nbdproto.MagicOptReply || binary.BigEndian.Uint32(b[8:]) != nbdproto.OptGo {
			return info, false
		}
		typ, n := binary.BigEndian.Uint32(b[12:]), binary.BigEndian.Uint32(b[16:])
		if n > maxOptReply || uint64(len(b)-20) < uint64(n) {
			return info, false
		}
		body := b[20 : 20+n]
		b = b[20+n:]
		switch {
		case typ == nbdproto.RepAck:
			return info, got
		case typ&nbdproto.RepErrBit != 0:
			return info, false
		case typ == nbdproto.RepInfo:
			if len(body) < 2 {
				return info, false
			}
			switch binary.BigEndian.Uint16(body) {
			case nbdproto.InfoExport:
				if len(body) != 12 {
					return info, false
				}
				info.Size, info.Flags, got = binary.BigEndian.Uint64(body[2:]), binary.BigEndian.Uint16(body[10:]), true
			case nbdproto.InfoBlockSize:
				if len(body) != 14 {
					return info, false
				}
				info.MinBlock, info.PrefBlock, info.MaxBlock = binary.BigEndian.Uint32(body[2:]), binary.BigEndian.Uint32(body[6:]), binary.BigEndian.Uint32(body[10:])
			}
		}
	}
}

// runHandshake plays b as the server's side of a connection to handshake.
func runHandshake(t *testing.T, b []byte) (nbdproto.ExportInfo, error) {
	cli, srv := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		go func() { _, _ = io.Copy(io.Discard, srv) }() // the client's OPT_GO
		_, _ = srv.Write(b)
		srv.Close()
	}()
	info, err := handshake(cli, "export", time.Now().Add(5*time.Second))
	cli.Close()
	<-done
	return info, err
}

func FuzzHandshake(f *testing.F) {
	f.Add(serverStream(nbdproto.ExportInfo{Size: 1 << 30, Flags: nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagCanMultiConn,
		MinBlock: 1, PrefBlock: 4096, MaxBlock: 32 << 20}))
	f.Add(serverStream(nbdproto.ExportInfo{Size: 4096, Flags: nbdproto.FlagHasFlags | nbdproto.FlagReadOnly}))
	good := serverStream(nbdproto.ExportInfo{Size: 1 << 20, Flags: nbdproto.FlagHasFlags})
	f.Add(good[:18])
	f.Add(good[:len(good)-1])
	noExport := append(bytes.Clone(good[:18]), good[18+20+12:]...)
	f.Add(noExport)
	refused := binary.BigEndian.AppendUint64(bytes.Clone(good[:18]), nbdproto.MagicOptReply)
	refused = binary.BigEndian.AppendUint32(refused, nbdproto.OptGo)
	refused = binary.BigEndian.AppendUint32(refused, nbdproto.RepErrBit|6)
	refused = binary.BigEndian.AppendUint32(refused, 5)
	f.Add(append(refused, "nope!"...))
	f.Fuzz(func(t *testing.T, b []byte) {
		info, err := runHandshake(t, b)
		want, ok := expectHandshake(b)
		if ok != (err == nil) {
			t.Fatalf("server bytes %x: handshake %+v, %v; want ok=%v", b, info, err, ok)
		}
		if err != nil {
			if !errors.Is(err, ErrHandshake) {
				t.Fatalf("error %v does not wrap ErrHandshake", err)
			}
			return
		}
		if info != want {
			t.Fatalf("server bytes %x: info %+v, want %+v", b, info, want)
		}
	})
}

// rw is a downstream made of fixed client bytes; replies are kept.
type rw struct {
	io.Reader
	bytes.Buffer
}

func (r *rw) Read(p []byte) (int, error)  { return r.Reader.Read(p) }
func (r *rw) Write(p []byte) (int, error) { return r.Buffer.Write(p) }

// FuzzRelayHandshake feeds arbitrary client bytes (nbdfuse's side) to the
// relay's server handshake, which must end (input is finite) and accept
// only a stream holding OPT_GO; and checks that what the relay encodes for
// an export is what the client decodes.
func FuzzRelayHandshake(f *testing.F) {
	goReq := encodeGo(nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes, "")
	f.Add(goReq, uint64(1<<30), nbdproto.FlagHasFlags|nbdproto.FlagSendFlush|nbdproto.FlagCanMultiConn)
	info := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFixedNewstyle)
	info = binary.BigEndian.AppendUint64(info, nbdproto.MagicOption)
	info = binary.BigEndian.AppendUint32(info, nbdproto.OptInfo)
	info = binary.BigEndian.AppendUint32(info, 0)
	f.Add(append(info, goReq[4:]...), uint64(4096), nbdproto.FlagHasFlags|nbdproto.FlagReadOnly)
	abort := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFixedNewstyle)
	abort = binary.BigEndian.AppendUint64(abort, nbdproto.MagicOption)
	abort = binary.BigEndian.AppendUint32(abort, nbdproto.OptAbort)
	abort = binary.BigEndian.AppendUint32(abort, 0)
	f.Add(abort, uint64(0), uint16(0))
	f.Add(goReq[:10], uint64(1), uint16(0xffff))
	f.Fuzz(func(t *testing.T, client []byte, size uint64, flags uint16) {
		r := &relay{down: &rw{Reader: bytes.NewReader(client)}, info: nbdproto.ExportInfo{Size: size, Flags: flags}}
		if err := r.serverHandshake(); err == nil && !bytes.Contains(client, binary.BigEndian.AppendUint32(nil, nbdproto.OptGo)) {
			t.Fatalf("relay finished a handshake without OPT_GO in %x", client)
		}

		// Round trip: the relay's replies, read by this package's client.
		cli, srv := net.Pipe()
		r = &relay{down: srv, info: nbdproto.ExportInfo{Size: size, Flags: flags}}
		errc := make(chan error, 1)
		go func() { errc <- r.serverHandshake(); srv.Close() }()
		got, err := handshake(cli, "", time.Now().Add(5*time.Second))
		cli.Close()
		if rerr := <-errc; err != nil || rerr != nil {
			t.Fatalf("relay handshake: client %v, relay %v", err, rerr)
		}
		if want := (nbdproto.ExportInfo{Size: size, Flags: relayFlags(flags)}); got != want {
			t.Fatalf("relay sent %+v, client read %+v", want, got)
		}
	})
}

func FuzzStateName(f *testing.F) {
	f.Add("pvc-123", "pvc_123")
	f.Add("a/b", "a%2fb")
	f.Add("\u0100", "\x100")      // one rune vs a byte and a digit
	f.Add("\xff", "\xfe")         // invalid UTF-8 bytes
	f.Add(".hidden", "%2ehidden") // a leading dot
	f.Add("..", ".")
	f.Fuzz(func(t *testing.T, a, b string) {
		na, nb := stateName(a), stateName(b)
		if a == "" {
			return // refused by Options.validate before any record is named
		}
		if a != b && na == nb {
			t.Fatalf("volumes %q and %q share the record %q", a, b, na)
		}
		if strings.ContainsAny(na, "/\x00") || strings.HasPrefix(na, ".") || !strings.HasSuffix(na, ".json") {
			t.Fatalf("volume %q: record name %q is not a plain, visible file name", a, na)
		}
	})
}

func FuzzLoadState(f *testing.F) {
	good, err := json.MarshalIndent(&state{Attachment: Attachment{Device: "/dev/loop3", Method: MethodFallback, VolumeID: "vol-1",
		Socket: "/run/wb/vol-1.sock", Export: "vol-1", Size: 1 << 30, Flags: nbdproto.FlagHasFlags | nbdproto.FlagSendFlush, Connections: 1, Detail: "direct-io"},
		MountDir: "/var/lib/wb/fuse/vol-1", BackingFile: "/var/lib/wb/fuse/vol-1/nbd", NbdfusePID: 4242}, "", "  ")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good, "vol-1")
	f.Add(good, "vol-2")
	f.Add(good[:len(good)/2], "vol-1")
	f.Add([]byte(`{"device":"/dev/nbd0","method":"netlink","volumeId":"v","index":-1}`), "v")
	f.Add([]byte(`null`), "x")
	f.Add([]byte{}, "v")
	f.Fuzz(func(t *testing.T, b []byte, id string) {
		if id == "" {
			return // refused by Options.validate before any record is read
		}
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, stateName(id)), b, 0o600); err != nil {
			if errors.Is(err, syscall.ENAMETOOLONG) {
				return
			}
			t.Fatal(err)
		}
		st, err := loadState(dir, id)
		if err != nil {
			if !strings.Contains(err.Error(), "volume") {
				t.Fatalf("error %q does not say which volume", err)
			}
			return
		}
		if st.VolumeID != id {
			t.Fatalf("loadState(%q) returned the record of volume %q", id, st.VolumeID)
		}
		// Saved again and reloaded, the record is unchanged, and the scan
		// by device finds it.
		if err := saveState(dir, st); err != nil {
			t.Fatal(err)
		}
		again, err := loadState(dir, id)
		if err != nil || !reflect.DeepEqual(again, st) {
			t.Fatalf("record %+v saved and reloaded as %+v, %v", st, again, err)
		}
		if byDev, err := findStateByDevice(dir, st.Device); err != nil || !reflect.DeepEqual(byDev, st) {
			t.Fatalf("findStateByDevice(%q) = %+v, %v; want %+v", st.Device, byDev, err, st)
		}
	})
}

// escapeMountPath is the kernel's mangle() for mountinfo: space, tab,
// newline and backslash as three-digit octal escapes.
func escapeMountPath(s string) string {
	r := strings.NewReplacer(`\`, `\134`, " ", `\040`, "\t", `\011`, "\n", `\012`)
	return r.Replace(s)
}

func FuzzUnescapeMountPath(f *testing.F) {
	f.Add(`/var/lib/kubelet/pods/x/volumes/my vol`)
	f.Add(`/a\b`)
	f.Add("/tab\there\nnewline")
	f.Add(`\134040`)
	f.Add(`\`)
	f.Add(`\04`)
	f.Add(`\777`)
	f.Fuzz(func(t *testing.T, s string) {
		if got := unescapeMountPath(escapeMountPath(s)); got != s {
			t.Fatalf("path %q, escaped %q, unescapes as %q", s, escapeMountPath(s), got)
		}
		_ = unescapeMountPath(s) // raw mountinfo fields: must not panic
	})
}

// relayFrame is one reply the relay should forward: its bytes as the
// server sent them.
type relayModelReq struct {
	typ    uint16
	length uint32
}

// expectRelay models the relay: which requests it reads from down (until
// the first bad one, EOF or a disconnect), and which of the server's
// replies in up it forwards, verbatim and in order, until the first reply
// that is malformed, truncated or for a handle not awaiting one.
func expectRelay(down, up []byte) []byte {
	inflight := map[uint64]relayModelReq{}
	for len(down) >= 28 && binary.BigEndian.Uint32(down) == nbdproto.MagicRequest {
		q := relayModelReq{typ: binary.BigEndian.Uint16(down[6:]), length: binary.BigEndian.Uint32(down[24:])}
		handle := binary.BigEndian.Uint64(down[8:])
		n := 28
		if q.typ == nbdproto.CmdWrite {
			if q.length > nbdproto.MaxPayload || uint64(len(down)-28) < uint64(q.length) {
				break
			}
			n += int(q.length)
		}
		if q.typ == nbdproto.CmdRead && q.length > nbdproto.MaxPayload {
			break
		}
		down = down[n:]
		if q.typ == nbdproto.CmdDisc {
			break
		}
		inflight[handle] = q
	}
	var out []byte
	for len(up) >= 16 && binary.BigEndian.Uint32(up) == nbdproto.MagicReply {
		handle := binary.BigEndian.Uint64(up[8:])
		q, ok := inflight[handle]
		if !ok {
			break
		}
		n := 16
		if q.typ == nbdproto.CmdRead && binary.BigEndian.Uint32(up[4:]) == 0 {
			if uint64(len(up)-16) < uint64(q.length) {
				break
			}
			n += int(q.length)
		}
		out = append(out, up[:n]...)
		up = up[n:]
		delete(inflight, handle)
	}
	return out
}

// FuzzRelayTransmission feeds arbitrary requests from nbdfuse and
// arbitrary replies from the server through the relay: it must forward
// exactly the well-formed replies to requests it holds, each once, with
// read payloads of the requested length, and stop at anything else
// rather than forward a torn or unasked-for reply.
func FuzzRelayTransmission(f *testing.F) {
	reqs := append(nbdRequest(nbdproto.CmdWrite, 1, 0, 4, []byte("abcd")), nbdRequest(nbdproto.CmdRead, 2, 0, 4, nil)...)
	reqs = append(reqs, nbdRequest(3, 3, 0, 0, nil)...) // FLUSH
	reps := append(simpleReply(1, nil), simpleReply(2, []byte("abcd"))...)
	reps = append(reps, simpleReply(3, nil)...)
	f.Add(reqs, reps)
	f.Add(reqs, append(simpleReply(2, []byte("ab")), simpleReply(1, nil)...))                                    // torn read payload
	f.Add(reqs, append(simpleReply(1, nil), simpleReply(1, nil)...))                                             // answered twice
	f.Add(append(reqs, nbdRequest(nbdproto.CmdDisc, 9, 0, 0, nil)...), reps)                                     // then a disconnect
	f.Add(nbdRequest(nbdproto.CmdRead, 5, 0, nbdproto.MaxPayload+1, nil), simpleReply(5, nil))                   // oversized read
	f.Add(nbdRequest(nbdproto.CmdRead, 6, 0, 8, nil), binary.BigEndian.AppendUint32(simpleReply(6, nil)[:4], 5)) // error reply, short
	f.Fuzz(func(t *testing.T, down, up []byte) {
		cli, srv := net.Pipe()
		out := &rw{Reader: bytes.NewReader(down)}
		r := &relay{down: out, broken: make(chan int, 1)}
		r.mu.inflight = map[uint64]*relayReq{}
		r.mu.up = cli
		upDone := make(chan struct{})
		go func() { r.readUpstream(cli, 0); close(upDone) }()
		sent := make(chan struct{})
		go func() { _, _ = io.Copy(io.Discard, srv); close(sent) }()
		if err := r.readDownstream(); err == nil && len(down) > 0 && !bytes.Contains(down, binary.BigEndian.AppendUint32(nil, nbdproto.MagicRequest)) {
			t.Fatalf("relay accepted requests %x without a request magic", down)
		}
		// The server answers only once every request is in: the model
		// does not depend on the interleaving.
		_, _ = srv.Write(up)
		srv.Close()
		<-upDone
		<-sent
		r.downMu.Lock()
		got := out.Bytes()
		r.downMu.Unlock()
		if want := expectRelay(down, up); !bytes.Equal(got, want) {
			t.Fatalf("requests %x, replies %x: relay forwarded %x, want %x", down, up, got, want)
		}
	})
}
