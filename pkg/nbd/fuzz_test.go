package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
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
	b := binary.BigEndian.AppendUint32(nil, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// FuzzRequest feeds arbitrary transmission streams to a connection: it
// must never panic or hang, and what it writes must be replies.
func FuzzRequest(f *testing.F) {
	f.Add(reqBytes(cmdRead, 0, 1, 0, 512, nil))
	f.Add(append(reqBytes(cmdWrite, cmdFlagFUA, 2, 100, 4, []byte("abcd")), reqBytes(cmdFlush, 0, 3, 0, 0, nil)...))
	f.Add(reqBytes(cmdTrim, 0, 4, 0, 1<<30, nil))
	f.Add(reqBytes(cmdWriteZeroes, cmdFlagNoHole, 5, 4096, 4096, nil))
	f.Add(reqBytes(cmdWrite, 0, 6, 1<<20, 16, make([]byte, 16)))
	f.Add(reqBytes(cmdRead, 0, 7, ^uint64(0), ^uint32(0), nil))
	f.Add(reqBytes(cmdDisc, 0, 8, 0, 0, nil))
	f.Add(reqBytes(cmdBlockStatus, 0, 9, 0, 512, nil))
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
		if out := sc.out.Bytes(); len(out) > 0 && (len(out) < replyHdrSize || binary.BigEndian.Uint32(out) != magicReply) {
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
	flags := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	seed := func(opts ...[]byte) []byte {
		b := append([]byte(nil), flags...)
		for _, o := range opts {
			b = append(b, o...)
		}
		return b
	}
	f.Add(seed(optBytes(optGo, infoPayload("", infoBlockSize))))
	f.Add(seed(optBytes(optInfo, infoPayload("disk", infoName, infoDescription)), optBytes(optGo, infoPayload("disk"))))
	f.Add(seed(optBytes(optList, nil), optBytes(optStructuredRepl, nil), optBytes(optExportName, []byte("disk"))))
	f.Add(seed(optBytes(optAbort, nil)))
	f.Add(seed(optBytes(optInfo, []byte{0, 0, 0, 9, 'a'})))
	f.Add(seed(optBytes(optGo, []byte{0xff, 0xff, 0xff, 0xff, 0, 0})))
	f.Add(seed(optBytes(99, []byte("x")), optBytes(optExportName, []byte("nope"))))
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
		var h [requestHdrSize]byte
		copy(h[:], reqBytes(typ, flags, handle, off, n, nil))
		r, err := parseRequest(&h)
		if err != nil || r != (request{flags: flags, typ: typ, handle: handle, offset: off, length: n}) {
			t.Fatalf("round trip: %+v %v", r, err)
		}
		h[0] ^= 1
		if _, err := parseRequest(&h); err == nil {
			t.Fatal("bad magic accepted")
		}
	})
}
