package nbdproto

import (
	"testing"
)

// FuzzRequestRoundTrip checks the request decoder against its encoder, and
// that a wrong magic is refused.
func FuzzRequestRoundTrip(f *testing.F) {
	f.Add(uint16(1), uint16(0), uint64(1), uint64(2), uint32(3))
	f.Add(CmdFlagFUA, CmdWrite, uint64(1<<63), uint64(1<<40), uint32(MaxPayload))
	f.Fuzz(func(t *testing.T, flags, typ uint16, handle, off uint64, n uint32) {
		want := Request{Flags: flags, Type: typ, Handle: handle, Offset: off, Length: n}
		var h [RequestHeaderSize]byte
		b := AppendRequest(nil, want)
		if len(b) != RequestHeaderSize {
			t.Fatalf("encoded %d bytes", len(b))
		}
		copy(h[:], b)
		got, err := ParseRequest(&h)
		if err != nil || got != want {
			t.Fatalf("round trip: %+v %v, want %+v", got, err, want)
		}
		h[0] ^= 1
		if _, err := ParseRequest(&h); err == nil {
			t.Fatal("bad magic accepted")
		}
	})
}

func TestReplyRoundTrip(t *testing.T) {
	var h [ReplyHeaderSize]byte
	PutReply(h[:], ErrIO, 0xdeadbeef)
	r, err := ParseReply(&h)
	if err != nil || r.Errno != ErrIO || r.Handle != 0xdeadbeef {
		t.Fatalf("%+v %v", r, err)
	}
	h[3] ^= 1
	if _, err := ParseReply(&h); err == nil {
		t.Fatal("bad magic accepted")
	}
}

// The values the kernel and every peer rely on (NBD protocol document).
func TestWireValues(t *testing.T) {
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"NBDMAGIC", MagicNBD, 0x4e42444d41474943},
		{"IHAVEOPT", MagicOption, 0x49484156454f5054},
		{"request magic", uint64(MagicRequest), 0x25609513},
		{"reply magic", uint64(MagicReply), 0x67446698},
		{"CAN_MULTI_CONN", uint64(FlagCanMultiConn), 1 << 8},
		{"SEND_RESIZE", uint64(FlagSendResize), 1 << 9},
		{"WRITE_ZEROES", uint64(CmdWriteZeroes), 6},
		{"OPT_GO", uint64(OptGo), 7},
		{"REP_ERR_UNSUP", uint64(RepErrUnsup), 1<<31 | 1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}
