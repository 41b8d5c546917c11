package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// streamConn is a net.Conn reading a fixed byte stream and discarding
// writes, so the fuzzers drive the real connection code without sockets.
type streamConn struct {
	r   io.Reader
	out bytes.Buffer
}

func (s *streamConn) Read(p []byte) (int, error)       { return s.r.Read(p) }
func (s *streamConn) Write(p []byte) (int, error)      { return s.out.Write(p) }
func (s *streamConn) Close() error                     { return nil }
func (s *streamConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz"} }
func (s *streamConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz"} }
func (s *streamConn) SetDeadline(time.Time) error      { return nil }
func (s *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (s *streamConn) SetWriteDeadline(time.Time) error { return nil }

func reqBytes(typ, flags uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbdproto.MagicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzRequest feeds arbitrary transmission streams to a connection: it
// must never panic or hang, and what it writes must be replies.
func FuzzRequest(f *testing.F) {
	f.Add(reqBytes(nbdproto.CmdRead, 0, 1, 0, 512, nil))
	f.Add(append(reqBytes(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 2, 100, 4, []byte("abcd")), reqBytes(nbdproto.CmdFlush, 0, 3, 0, 0, nil)...))
	f.Add(reqBytes(nbdproto.CmdTrim, 0, 4, 0, 1<<30, nil))
	f.Add(reqBytes(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole, 5, 4096, 4096, nil))
	f.Add(reqBytes(nbdproto.CmdWrite, 0, 6, 1<<20, 16, make([]byte, 16)))
	f.Add(reqBytes(nbdproto.CmdRead, 0, 7, ^uint64(0), ^uint32(0), nil))
	f.Add(reqBytes(nbdproto.CmdDisc, 0, 8, 0, 0, nil))
	f.Add(reqBytes(nbdproto.CmdBlockStatus, 0, 9, 0, 512, nil))
	f.Add([]byte{0x25, 0x60, 0x95, 0x13, 0, 0})
	srv := NewServer(Config{})
	exp := newExportState(Export{Backend: NewMemBackend(64 << 10)})
	f.Fuzz(func(t *testing.T, in []byte) {
		sc := &streamConn{r: bytes.NewReader(in)}
		c := newConn(srv, sc)
		c.exp = exp
		c.br = bufio.NewReaderSize(sc, 4096)
		_ = c.readLoop()
		c.work.Wait()
		c.wmu.Lock()
		_ = c.bw.Flush()
		c.wmu.Unlock()
		// Replies may carry READ data of lengths only the requests
		// know, so check the stream begins with a well-formed reply.
		if out := sc.out.Bytes(); len(out) > 0 && (len(out) < nbdproto.ReplyHeaderSize || binary.BigEndian.Uint32(out) != nbdproto.MagicReply) {
			t.Fatalf("malformed reply stream %x", out[:min(len(out), 16)])
		}
	})
}

type fuzzSource struct{ exps map[string]*exportState }

func (f fuzzSource) lookupExport(name string) *exportState { return f.exps[name] }
func (f fuzzSource) exportNames() []string                 { return []string{"", "disk"} }
func (f fuzzSource) shuttingDown() bool                    { return false }

// FuzzHandshake feeds arbitrary client bytes to the negotiation: it must
// never panic, and succeed only with a known export.
func FuzzHandshake(f *testing.F) {
	flags := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	seed := func(opts ...[]byte) []byte {
		b := append([]byte(nil), flags...)
		for _, o := range opts {
			b = append(b, o...)
		}
		return b
	}
	f.Add(seed(optBytes(nbdproto.OptGo, infoPayload("", nbdproto.InfoBlockSize))))
	f.Add(seed(optBytes(nbdproto.OptInfo, infoPayload("disk", nbdproto.InfoName, nbdproto.InfoDescription)), optBytes(nbdproto.OptGo, infoPayload("disk"))))
	f.Add(seed(optBytes(nbdproto.OptList, nil), optBytes(nbdproto.OptStructuredReply, nil), optBytes(nbdproto.OptExportName, []byte("disk"))))
	f.Add(seed(optBytes(nbdproto.OptAbort, nil)))
	f.Add(seed(optBytes(nbdproto.OptInfo, []byte{0, 0, 0, 9, 'a'})))
	f.Add(seed(optBytes(nbdproto.OptGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})))
	f.Add(seed(optBytes(99, []byte("x")), optBytes(nbdproto.OptExportName, []byte("nope"))))
	src := fuzzSource{exps: map[string]*exportState{
		"":     newExportState(Export{Backend: NewMemBackend(4096)}),
		"disk": newExportState(Export{Name: "disk", Description: "d", Backend: NewMemBackend(8192)}),
	}}
	f.Fuzz(func(t *testing.T, in []byte) {
		exp, err := handshake(src, bufio.NewReader(bytes.NewReader(in)), bufio.NewWriter(io.Discard))
		if (exp == nil) == (err == nil) {
			t.Fatalf("handshake returned export %v and error %v", exp, err)
		}
		if exp != nil && exp != src.exps[exp.Name] {
			t.Fatalf("unknown export %q chosen", exp.Name)
		}
	})
}

// FuzzParseRequest checks the header decoder against its encoder.
func FuzzParseRequest(f *testing.F) {
	f.Add(uint16(1), uint16(0), uint64(1), uint64(2), uint32(3))
	f.Fuzz(func(t *testing.T, flags, typ uint16, handle, off uint64, n uint32) {
		var h [nbdproto.RequestHeaderSize]byte
		copy(h[:], reqBytes(typ, flags, handle, off, n, nil))
		r, err := nbdproto.ParseRequest(&h)
		if err != nil || r != (nbdproto.Request{Flags: flags, Type: typ, Handle: handle, Offset: off, Length: n}) {
			t.Fatalf("round trip: %+v %v", r, err)
		}
		h[0] ^= 1
		if _, err := nbdproto.ParseRequest(&h); err == nil {
			t.Fatal("bad magic accepted")
		}
	})
}
