package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// plainBackend has no optional capability at all.
type plainBackend struct{ m *MemBackend }

func (p plainBackend) ReadAt(b []byte, off int64) (int, error)  { return p.m.ReadAt(b, off) }
func (p plainBackend) WriteAt(b []byte, off int64) (int, error) { return p.m.WriteAt(b, off) }
func (p plainBackend) Size() int64                              { return p.m.Size() }

// flushBackend models a write cache: writes are volatile until Flush.
type flushBackend struct {
	plainBackend
	mu       sync.Mutex
	volatile map[int64]bool
	durable  map[int64]bool
	flushes  int
}

func newFlushBackend(size int64) *flushBackend {
	return &flushBackend{plainBackend: plainBackend{NewMemBackend(size)}, volatile: map[int64]bool{}, durable: map[int64]bool{}}
}

func (f *flushBackend) WriteAt(b []byte, off int64) (int, error) {
	n, err := f.m.WriteAt(b, off)
	f.mu.Lock()
	f.volatile[off] = true
	f.mu.Unlock()
	return n, err
}

func (f *flushBackend) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for off := range f.volatile {
		f.durable[off] = true
	}
	clear(f.volatile)
	f.flushes++
	return nil
}

func (f *flushBackend) isDurable(off int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.durable[off]
}

// fuaBackend adds a native FUA write.
type fuaBackend struct{ *flushBackend }

func (f fuaBackend) WriteFUA(b []byte, off int64) error {
	if _, err := f.m.WriteAt(b, off); err != nil {
		return err
	}
	f.mu.Lock()
	f.durable[off] = true
	f.mu.Unlock()
	return nil
}

// gateBackend blocks requests at offsets listed in gates until released,
// and records the peak concurrency.
type gateBackend struct {
	*MemBackend
	gates   map[int64]chan struct{}
	entered chan int64
	cur     atomic.Int32
	peak    atomic.Int32
}

func newGateBackend(size int64, gated ...int64) *gateBackend {
	g := &gateBackend{MemBackend: NewMemBackend(size), gates: map[int64]chan struct{}{}, entered: make(chan int64, 100)}
	for _, off := range gated {
		g.gates[off] = make(chan struct{})
	}
	return g
}

func (g *gateBackend) wait(off int64) {
	n := g.cur.Add(1)
	for {
		p := g.peak.Load()
		if n <= p || g.peak.CompareAndSwap(p, n) {
			break
		}
	}
	g.entered <- off
	if ch, ok := g.gates[off]; ok {
		<-ch
	}
	g.cur.Add(-1)
}

func (g *gateBackend) ReadAt(b []byte, off int64) (int, error) {
	g.wait(off)
	return g.MemBackend.ReadAt(b, off)
}

func (g *gateBackend) WriteAt(b []byte, off int64) (int, error) {
	g.wait(off)
	return g.MemBackend.WriteAt(b, off)
}

// errBackend fails requests with the error registered for their offset.
type errBackend struct {
	*MemBackend
	errs map[int64]error
}

func (e errBackend) ReadAt(b []byte, off int64) (int, error) {
	if off == 24576 {
		return 10, nil // short read without an error
	}
	if err := e.errs[off]; err != nil {
		return 0, err
	}
	return e.MemBackend.ReadAt(b, off)
}

func (e errBackend) WriteAt(b []byte, off int64) (int, error) {
	if err := e.errs[off]; err != nil {
		return 0, err
	}
	return e.MemBackend.WriteAt(b, off)
}

func (e errBackend) Flush() error { return e.errs[-1] }

func TestHandshakeGoInfo(t *testing.T) {
	_, path := startServer(t, Config{},
		Export{Name: "", Description: "default disk", Backend: NewMemBackend(1 << 20)},
		Export{Name: "other", Backend: NewMemBackend(3 << 20), ReadOnly: true})
	c := dialRaw(t, path, nbdproto.ClientFixedNewstyle)

	infos, r := c.goInfo(nbdproto.OptInfo, "other", nbdproto.InfoName, nbdproto.InfoDescription, nbdproto.InfoBlockSize)
	if r.typ != nbdproto.RepAck {
		t.Fatalf("OPT_INFO reply %#x", r.typ)
	}
	if c.size != 3<<20 {
		t.Errorf("size %d", c.size)
	}
	if c.flags&FlagReadOnly == 0 || c.flags&FlagSendTrim != 0 || c.flags&FlagSendWriteZeroes != 0 || c.flags&FlagSendFUA != 0 {
		t.Errorf("read-only export flags %#x", c.flags)
	}
	if string(infos[nbdproto.InfoName]) != "other" {
		t.Errorf("INFO_NAME %q", infos[nbdproto.InfoName])
	}
	if _, ok := infos[nbdproto.InfoDescription]; ok {
		t.Errorf("empty description sent")
	}
	bs := infos[nbdproto.InfoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 512 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != MaxPayload {
		t.Errorf("INFO_BLOCK_SIZE %x", bs)
	}

	// Still negotiating after OPT_INFO: now OPT_GO on the default export.
	infos, r = c.goInfo(nbdproto.OptGo, "", nbdproto.InfoDescription)
	if r.typ != nbdproto.RepAck {
		t.Fatalf("OPT_GO reply %#x", r.typ)
	}
	if string(infos[nbdproto.InfoDescription]) != "default disk" {
		t.Errorf("INFO_DESCRIPTION %q", infos[nbdproto.InfoDescription])
	}
	want := FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn
	if c.flags != want {
		t.Errorf("flags %#x, want %#x", c.flags, want)
	}
	if r := c.do(nbdproto.CmdWrite, 0, 512, 4, []byte("abcd")); r.errno != 0 {
		t.Fatalf("write errno %d", r.errno)
	}
	if r := c.do(nbdproto.CmdRead, 0, 510, 8, nil); r.errno != 0 || !bytes.Equal(r.data, []byte("\x00\x00abcd\x00\x00")) {
		t.Fatalf("read %d %q", r.errno, r.data)
	}
}

func TestHandshakeOptionErrors(t *testing.T) {
	_, path := startServer(t, Config{}, Export{Name: "a", Backend: NewMemBackend(4096)}, Export{Name: "b", Backend: NewMemBackend(4096)})
	c := dialRaw(t, path, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)

	if _, r := c.goInfo(nbdproto.OptGo, "nope"); r.typ != nbdproto.RepErrUnknown {
		t.Errorf("unknown export: reply %#x", r.typ)
	}
	c.sendOpt(nbdproto.OptStructuredReply, nil)
	if r := c.mustOpt(); r.typ != nbdproto.RepErrUnsup || r.opt != nbdproto.OptStructuredReply {
		t.Errorf("STRUCTURED_REPLY: %+v", r)
	}
	c.sendOpt(42, []byte("whatever"))
	if r := c.mustOpt(); r.typ != nbdproto.RepErrUnsup || r.opt != 42 {
		t.Errorf("unknown option: %+v", r)
	}
	// Info request count disagreeing with the length.
	bad := infoPayload("a", nbdproto.InfoName)
	c.sendOpt(nbdproto.OptInfo, bad[:len(bad)-1])
	if r := c.mustOpt(); r.typ != nbdproto.RepErrInvalid {
		t.Errorf("short OPT_INFO: %+v", r)
	}
	c.sendOpt(nbdproto.OptInfo, []byte{0, 0, 1, 0}) // name length beyond the data
	if r := c.mustOpt(); r.typ != nbdproto.RepErrInvalid {
		t.Errorf("bad name length: %+v", r)
	}
	c.sendOpt(nbdproto.OptList, []byte{1})
	if r := c.mustOpt(); r.typ != nbdproto.RepErrInvalid {
		t.Errorf("OPT_LIST with data: %+v", r)
	}
	c.sendOpt(nbdproto.OptList, nil)
	var names []string
	for {
		r := c.mustOpt()
		if r.typ == nbdproto.RepAck {
			break
		}
		if r.typ != nbdproto.RepServer || binary.BigEndian.Uint32(r.data) != uint32(len(r.data)-4) {
			t.Fatalf("OPT_LIST reply %+v", r)
		}
		names = append(names, string(r.data[4:]))
	}
	if fmt.Sprint(names) != "[a b]" {
		t.Errorf("exports %v", names)
	}
	c.sendOpt(nbdproto.OptAbort, nil)
	if r := c.mustOpt(); r.typ != nbdproto.RepAck {
		t.Errorf("abort: %+v", r)
	}
	c.expectClosed()
}

func TestHandshakeExportName(t *testing.T) {
	_, path := startServer(t, Config{}, Export{Name: "x", Backend: NewMemBackend(8192)})
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprint("noZeroes=", noZeroes), func(t *testing.T) {
			cf := nbdproto.ClientFixedNewstyle
			if noZeroes {
				cf |= nbdproto.ClientNoZeroes
			}
			c := dialRaw(t, path, cf)
			c.sendOpt(nbdproto.OptExportName, []byte("x"))
			n := 10
			if !noZeroes {
				n += 124
			}
			b := make([]byte, n)
			if _, err := io.ReadFull(c.br, b); err != nil {
				t.Fatal(err)
			}
			if binary.BigEndian.Uint64(b) != 8192 {
				t.Fatalf("size %x", b[:8])
			}
			// Exactly n bytes: the next thing on the wire is our reply.
			if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 {
				t.Fatalf("flush errno %d", r.errno)
			}
		})
	}
	c := dialRaw(t, path, nbdproto.ClientFixedNewstyle)
	c.sendOpt(nbdproto.OptExportName, []byte("missing"))
	c.expectClosed()
}

func TestHandshakeHostileClientsClosed(t *testing.T) {
	_, path := startServer(t, Config{}, Export{Backend: NewMemBackend(4096)})
	c := dialRaw(t, path, 1<<7) // unknown client flag
	c.expectClosed()

	c = dialRaw(t, path, nbdproto.ClientFixedNewstyle)
	c.sendOpt(nbdproto.OptInfo, make([]byte, maxOptionLen+1))
	c.expectClosed()

	c = dialRaw(t, path, nbdproto.ClientFixedNewstyle)
	c.write(make([]byte, 16)) // bad option magic
	c.expectClosed()
}

func TestFlagsFollowBackendCapabilities(t *testing.T) {
	m := NewMemBackend(4096)
	fb := newFlushBackend(4096)
	for _, tc := range []struct {
		name string
		e    Export
		want uint16
	}{
		{"plain", Export{Backend: plainBackend{m}}, FlagHasFlags},
		{"flusher", Export{Backend: fb}, FlagHasFlags | FlagSendFlush | FlagSendFUA},
		{"fua", Export{Backend: fuaBackend{fb}}, FlagHasFlags | FlagSendFlush | FlagSendFUA},
		{"mem", Export{Backend: m}, FlagHasFlags | FlagSendFlush | FlagSendFUA | FlagSendTrim | FlagSendWriteZeroes | FlagCanMultiConn},
		{"mem-ro", Export{Backend: m, ReadOnly: true}, FlagHasFlags | FlagReadOnly | FlagSendFlush | FlagCanMultiConn},
	} {
		if got := tc.e.Flags(); got != tc.want {
			t.Errorf("%s: flags %#x, want %#x", tc.name, got, tc.want)
		}
	}
}

func TestReadWriteTrimZeroes(t *testing.T) {
	const size = 1 << 20
	_, path := startServer(t, Config{}, Export{Backend: NewMemBackend(size)})
	c := connect(t, path, "")
	data := make([]byte, 200000)
	for i := range data {
		data[i] = byte(i*7 + 1)
	}
	if r := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 1000, uint32(len(data)), data); r.errno != 0 {
		t.Fatalf("write: %d", r.errno)
	}
	if r := c.do(nbdproto.CmdRead, 0, 1000, uint32(len(data)), nil); !bytes.Equal(r.data, data) {
		t.Fatal("read back differs")
	}
	if r := c.do(nbdproto.CmdTrim, 0, 4096, 4096, nil); r.errno != 0 {
		t.Fatalf("trim: %d", r.errno)
	}
	if r := c.do(nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole|nbdproto.CmdFlagFUA, 16384, 100, nil); r.errno != 0 {
		t.Fatalf("write zeroes: %d", r.errno)
	}
	want := append([]byte(nil), data...)
	clear(want[4096-1000 : 8192-1000])
	clear(want[16384-1000 : 16384-1000+100])
	if r := c.do(nbdproto.CmdRead, 0, 1000, uint32(len(data)), nil); !bytes.Equal(r.data, want) {
		t.Fatal("trimmed/zeroed ranges do not read back as zeros")
	}
	c.send(nbdproto.CmdDisc, 0, 9, 0, 0, nil)
	c.expectClosed()
}

func TestRequestValidation(t *testing.T) {
	const size = 64 << 10
	_, path := startServer(t, Config{},
		Export{Name: "rw", Backend: NewMemBackend(size)},
		Export{Name: "ro", Backend: NewMemBackend(size), ReadOnly: true},
		Export{Name: "plain", Backend: plainBackend{NewMemBackend(size)}})
	c := connect(t, path, "rw")
	for _, tc := range []struct {
		name    string
		typ     uint16
		off     uint64
		n       uint32
		payload bool
		want    uint32
	}{
		{"read past end", nbdproto.CmdRead, size - 512, 1024, false, nbdproto.ErrInval},
		{"read offset overflow", nbdproto.CmdRead, ^uint64(0) - 10, 512, false, nbdproto.ErrInval},
		{"write past end", nbdproto.CmdWrite, size - 512, 1024, true, nbdproto.ErrNoSpc},
		{"trim past end", nbdproto.CmdTrim, size, 1, false, nbdproto.ErrInval},
		{"zeroes past end", nbdproto.CmdWriteZeroes, size - 1, 2, false, nbdproto.ErrNoSpc},
		{"read too large", nbdproto.CmdRead, 0, MaxPayload + 1, false, nbdproto.ErrInval},
		{"cache", nbdproto.CmdCache, 0, 512, false, nbdproto.ErrInval},
		{"block status", nbdproto.CmdBlockStatus, 0, 512, false, nbdproto.ErrInval},
		{"unknown", 99, 0, 512, false, nbdproto.ErrInval},
		{"read at end, empty", nbdproto.CmdRead, size, 0, false, 0},
	} {
		var p []byte
		if tc.payload {
			p = make([]byte, tc.n)
		}
		if r := c.do(tc.typ, 0, tc.off, tc.n, p); r.errno != tc.want {
			t.Errorf("%s: errno %d, want %d", tc.name, r.errno, tc.want)
		}
	}
	// The stream is still in sync after rejected writes carrying payloads.
	if r := c.do(nbdproto.CmdWrite, 0, 0, 3, []byte("xyz")); r.errno != 0 {
		t.Fatalf("write after rejects: %d", r.errno)
	}

	ro := connect(t, path, "ro")
	for _, typ := range []uint16{nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes} {
		var p []byte
		if typ == nbdproto.CmdWrite {
			p = make([]byte, 512)
		}
		if r := ro.do(typ, 0, 0, 512, p); r.errno != nbdproto.ErrPerm {
			t.Errorf("read-only %s: errno %d, want EPERM", nbdproto.CmdName(typ), r.errno)
		}
	}
	if r := ro.do(nbdproto.CmdRead, 0, 0, 512, nil); r.errno != 0 {
		t.Errorf("read-only read: %d", r.errno)
	}

	pl := connect(t, path, "plain")
	for _, typ := range []uint16{nbdproto.CmdTrim, nbdproto.CmdWriteZeroes} {
		if r := pl.do(typ, 0, 0, 512, nil); r.errno != nbdproto.ErrInval {
			t.Errorf("unadvertised %s: errno %d, want EINVAL", nbdproto.CmdName(typ), r.errno)
		}
	}
	if r := pl.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Errorf("flush on a backend without cache: %d", r.errno)
	}
}

func TestMalformedRequestClosesOnlyThatConnection(t *testing.T) {
	_, path := startServer(t, Config{}, Export{Backend: NewMemBackend(1 << 20)})
	good := connect(t, path, "")
	bad := connect(t, path, "")
	bad.write(bytes.Repeat([]byte{0xee}, nbdproto.RequestHeaderSize))
	bad.expectClosed()

	huge := connect(t, path, "")
	huge.send(nbdproto.CmdWrite, 0, 1, 0, MaxPayload+1, nil)
	huge.expectClosed()

	if r := good.do(nbdproto.CmdWrite, 0, 0, 5, []byte("hello")); r.errno != 0 {
		t.Fatalf("good connection broken: %d", r.errno)
	}
}

func TestOutOfOrderReplies(t *testing.T) {
	g := newGateBackend(1<<20, 0)
	_, path := startServer(t, Config{}, Export{Backend: g})
	c := connect(t, path, "")
	if _, err := g.MemBackend.WriteAt([]byte("slow"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := g.MemBackend.WriteAt([]byte("fast"), 8192); err != nil {
		t.Fatal(err)
	}
	c.send(nbdproto.CmdRead, 0, 1, 0, 4, nil)
	if off := <-g.entered; off != 0 {
		t.Fatalf("first request at %d", off)
	}
	c.send(nbdproto.CmdRead, 0, 2, 8192, 4, nil)
	r := c.mustRecv()
	if r.handle != 2 || string(r.data) != "fast" {
		t.Fatalf("first reply %d %q, want the unblocked request 2", r.handle, r.data)
	}
	close(g.gates[0])
	if r := c.mustRecv(); r.handle != 1 || string(r.data) != "slow" {
		t.Fatalf("second reply %d %q", r.handle, r.data)
	}
}

func TestInFlightBounded(t *testing.T) {
	gated := []int64{0, 4096, 8192, 12288, 16384}
	g := newGateBackend(1<<20, gated...)
	_, path := startServer(t, Config{MaxInFlightRequests: 2}, Export{Backend: g})
	c := connect(t, path, "")
	for i, off := range gated {
		c.send(nbdproto.CmdWrite, 0, uint64(i), uint64(off), 4096, make([]byte, 4096))
	}
	<-g.entered
	<-g.entered
	select {
	case off := <-g.entered:
		t.Fatalf("third request (offset %d) started with 2 allowed in flight", off)
	case <-time.After(100 * time.Millisecond):
	}
	for _, off := range gated {
		close(g.gates[off])
	}
	for range gated {
		if r := c.mustRecv(); r.errno != 0 {
			t.Fatalf("errno %d", r.errno)
		}
	}
	if p := g.peak.Load(); p != 2 {
		t.Errorf("peak concurrency %d, want 2", p)
	}
}

// sleepBackend takes a while for every write.
type sleepBackend struct {
	*MemBackend
	cur, peak atomic.Int32
}

func (s *sleepBackend) WriteAt(b []byte, off int64) (int, error) {
	n := s.cur.Add(1)
	for p := s.peak.Load(); n > p && !s.peak.CompareAndSwap(p, n); p = s.peak.Load() {
	}
	time.Sleep(2 * time.Millisecond)
	s.cur.Add(-1)
	return s.MemBackend.WriteAt(b, off)
}

func TestSlowBackendKeepsConcurrency(t *testing.T) {
	for _, noInline := range []bool{false, true} {
		sb := &sleepBackend{MemBackend: NewMemBackend(1 << 20)}
		_, path := startServer(t, Config{NoInline: noInline}, Export{Backend: sb})
		c := connect(t, path, "")
		const n = 64
		for i := 0; i < n; i++ {
			c.send(nbdproto.CmdWrite, 0, uint64(i), uint64(i%16)*4096, 4096, make([]byte, 4096))
		}
		for i := 0; i < n; i++ {
			if r := c.mustRecv(); r.errno != 0 {
				t.Fatal(r.errno)
			}
		}
		// Inline execution is only for fast backends: slow writes must
		// still overlap.
		if p := sb.peak.Load(); p < 4 {
			t.Errorf("noInline=%v: peak concurrency %d with a slow backend", noInline, p)
		}
	}
}

func TestFlushAndFUADurability(t *testing.T) {
	for _, native := range []bool{false, true} {
		t.Run(fmt.Sprint("nativeFUA=", native), func(t *testing.T) {
			fb := newFlushBackend(1 << 20)
			var b Backend = fb
			if native {
				b = fuaBackend{fb}
			}
			_, path := startServer(t, Config{}, Export{Backend: b})
			c := connect(t, path, "")
			const n = 32
			for i := 0; i < n; i++ {
				c.send(nbdproto.CmdWrite, 0, uint64(i), uint64(i)*4096, 4096, make([]byte, 4096))
			}
			for i := 0; i < n; i++ {
				c.mustRecv()
			}
			if fb.isDurable(0) {
				t.Fatal("test backend is not modelling a cache")
			}
			if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != 0 {
				t.Fatalf("flush: %d", r.errno)
			}
			for i := 0; i < n; i++ {
				if !fb.isDurable(int64(i) * 4096) {
					t.Fatalf("write %d replied before FLUSH is not durable after it", i)
				}
			}
			if r := c.do(nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 1<<19, 512, make([]byte, 512)); r.errno != 0 || !fb.isDurable(1<<19) {
				t.Fatalf("FUA write not durable at its reply (errno %d)", r.errno)
			}
		})
	}
}

func TestErrorMapping(t *testing.T) {
	eb := errBackend{NewMemBackend(1 << 20), map[int64]error{
		0:     fmt.Errorf("disk: %w", syscall.EIO),
		4096:  fmt.Errorf("full: %w", syscall.ENOSPC),
		8192:  fmt.Errorf("bad: %w", syscall.EINVAL),
		12288: errors.New("something odd"),
		16384: fmt.Errorf("closing: %w", syscall.ESHUTDOWN),
		20480: fmt.Errorf("quota: %w", syscall.EDQUOT),
		-1:    fmt.Errorf("flush: %w", syscall.EIO),
	}}
	_, path := startServer(t, Config{}, Export{Backend: eb})
	c := connect(t, path, "")
	for off, want := range map[uint64]uint32{0: nbdproto.ErrIO, 4096: nbdproto.ErrNoSpc, 8192: nbdproto.ErrInval, 12288: nbdproto.ErrIO, 16384: nbdproto.ErrShutdown, 20480: nbdproto.ErrNoSpc} {
		if r := c.do(nbdproto.CmdRead, 0, off, 4096, nil); r.errno != want || r.data != nil {
			t.Errorf("read at %d: errno %d, want %d", off, r.errno, want)
		}
		if r := c.do(nbdproto.CmdWrite, 0, off, 4096, make([]byte, 4096)); r.errno != want {
			t.Errorf("write at %d: errno %d, want %d", off, r.errno, want)
		}
	}
	if r := c.do(nbdproto.CmdFlush, 0, 0, 0, nil); r.errno != nbdproto.ErrIO {
		t.Errorf("flush: errno %d", r.errno)
	}
	if r := c.do(nbdproto.CmdRead, 0, 24576, 4096, nil); r.errno != nbdproto.ErrIO {
		t.Errorf("short read: errno %d, want EIO", r.errno)
	}
	// A failed READ sends no data: the next reply parses cleanly.
	if r := c.do(nbdproto.CmdRead, 0, 65536, 16, nil); r.errno != 0 || len(r.data) != 16 {
		t.Errorf("read after errors: %d", r.errno)
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	g := newGateBackend(1<<20, 4096)
	s := NewServer(Config{})
	if err := s.AddExport(Export{Backend: g}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := ListenUnix(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	c := connect(t, path, "")
	c.send(nbdproto.CmdWrite, 0, 1, 4096, 4, []byte("data"))
	<-g.entered
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Error("still accepting after Shutdown")
	}
	close(g.gates[4096])
	if r := c.mustRecv(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("in-flight write: handle %d errno %d", r.handle, r.errno)
	}
	c.expectClosed()
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	if b := make([]byte, 4); func() bool { g.MemBackend.ReadAt(b, 4096); return string(b) != "data" }() {
		t.Error("in-flight write lost")
	}
}

// TestShutdownLeavesLaterRequestsUnanswered: a request the server reads
// after its Shutdown began is neither run nor answered, and the connection
// closes once what was read before has its reply. An error reply (it was
// ESHUTDOWN) is EIO to the filesystem above the kernel's nbd device,
// while a request left unanswered is sent again on the next server's
// connection (the kernel's nbd driver after RECONFIGURE, our relay after
// it redials): in the real-kernel tier a graceful plugin upgrade failed a
// writer's fsync with "Other side returned error (108)".
func TestShutdownLeavesLaterRequestsUnanswered(t *testing.T) {
	g := newGateBackend(1<<20, 4096)
	// One request in flight: the reader has read the second request's
	// header and waits for room until the first is answered.
	s, path := startServer(t, Config{MaxInFlightRequests: 1}, Export{Backend: g})
	c := connect(t, path, "")
	c.write(append(requestBytes(nbdproto.CmdWrite, 0, 1, 4096, 4, []byte("data")),
		requestBytes(nbdproto.CmdWrite, 0, 2, 8192, 4, []byte("late"))...))
	<-g.entered
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	for !s.shuttingDown() {
		time.Sleep(time.Millisecond)
	}
	close(g.gates[4096])
	if r := c.mustRecv(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("the request read before the shutdown: handle %d errno %d", r.handle, r.errno)
	}
	if r, err := c.recv(); err == nil {
		t.Fatalf("the request read after the shutdown began was answered (handle %d, errno %d); want no reply and the connection closed", r.handle, r.errno)
	}
	if err := <-shut; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	b := make([]byte, 4)
	g.MemBackend.ReadAt(b, 8192)
	if string(b) == "late" {
		t.Error("the request read after the shutdown began was run")
	}
}

func TestManyConnectionsConcurrent(t *testing.T) {
	const size = 4 << 20
	m := NewMemBackend(size)
	_, path := startServer(t, Config{}, Export{Backend: m})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := connect(t, path, "")
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			region := uint64(w) * (size / 4)
			shadow := make([]byte, size/4)
			const depth = 16
			for round := 0; round < 20; round++ {
				// Distinct offsets per round: concurrent overlapping
				// writes have no defined order.
				perm := rng.Perm(size / 4 / 4096)
				for i := 0; i < depth; i++ {
					off := uint64(perm[i]) * 4096
					p := make([]byte, 4096)
					for j := range p {
						p[j] = byte(rng.Uint32())
					}
					copy(shadow[off:], p)
					c.send(nbdproto.CmdWrite, 0, uint64(i), region+off, 4096, p)
				}
				for i := 0; i < depth; i++ {
					if r := c.mustRecv(); r.errno != 0 {
						t.Errorf("write errno %d", r.errno)
						return
					}
				}
			}
			for i := 0; i < size/4/65536; i++ {
				c.send(nbdproto.CmdRead, 0, uint64(i), region+uint64(i)*65536, 65536, nil)
			}
			for i := 0; i < size/4/65536; i++ {
				r := c.mustRecv()
				if !bytes.Equal(r.data, shadow[r.handle*65536:(r.handle+1)*65536]) {
					t.Errorf("conn %d: chunk %d differs", w, r.handle)
				}
			}
		}()
	}
	wg.Wait()
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.sock")
	l, err := ListenUnix(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket mode %v %v", fi.Mode(), err)
	}
	if _, err := ListenUnix(path, 0); err == nil {
		t.Fatal("second listener on a live socket succeeded")
	}
	l.Close()
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Fatalf("socket left after Close: %v", err)
	}

	// A stale socket (nothing listening) is replaced.
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ul.SetUnlinkOnClose(false)
	ul.Close()
	l, err = ListenUnix(path, 0o660)
	if err != nil {
		t.Fatalf("stale socket not replaced: %v", err)
	}
	if fi, _ := os.Lstat(path); fi.Mode().Perm() != 0o660 {
		t.Errorf("mode %v", fi.Mode())
	}
	l.Close()

	reg := filepath.Join(dir, "file")
	if err := os.WriteFile(reg, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ListenUnix(reg, 0); err == nil {
		t.Fatal("a regular file was replaced by a socket")
	}
	if b, _ := os.ReadFile(reg); string(b) != "keep" {
		t.Fatal("regular file damaged")
	}
}

func TestMemBackendLockOrderAndBounds(t *testing.T) {
	const size = 2 * memLocks << memStripeShift
	m := NewMemBackend(size)
	// Requests spanning the wrap of the lock array, concurrently with
	// requests spanning everything: must neither deadlock nor race.
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 3<<memStripeShift)
			for i := 0; i < 200; i++ {
				off := int64((memLocks-1)<<memStripeShift) + int64(i%3)*4096
				if w%2 == 0 {
					m.WriteAt(p, off)
				} else {
					m.ReadAt(p, off)
				}
				if i%50 == 0 {
					m.WriteZeroes(0, size)
				}
			}
		}()
	}
	wg.Wait()
	if _, err := m.ReadAt(make([]byte, 2), size-1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("read past end: %v", err)
	}
	if err := m.WriteZeroes(-1, 1); !errors.Is(err, syscall.EINVAL) {
		t.Errorf("negative offset: %v", err)
	}
}

func TestAddExportValidation(t *testing.T) {
	s := NewServer(Config{})
	m := NewMemBackend(4096)
	for _, e := range []Export{
		{Name: "nil"},
		{Name: "min", Backend: m, MinBlockSize: 256},
		{Name: "odd", Backend: m, PreferredBlockSize: 3000},
		{Name: "order", Backend: m, MinBlockSize: 8192, PreferredBlockSize: 4096},
	} {
		if err := s.AddExport(e); err == nil {
			t.Errorf("export %q accepted", e.Name)
		}
	}
	if err := s.AddExport(Export{Name: "ok", Backend: m, MinBlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	if err := s.AddExport(Export{Name: "ok", Backend: m}); err == nil {
		t.Error("duplicate export accepted")
	}
}

func TestErrno(t *testing.T) {
	for err, want := range map[error]uint32{
		nil: 0, syscall.EPERM: nbdproto.ErrPerm, syscall.EROFS: nbdproto.ErrPerm, fmt.Errorf("x: %w", syscall.EINVAL): nbdproto.ErrInval,
		syscall.ENOSPC: nbdproto.ErrNoSpc, syscall.EFBIG: nbdproto.ErrNoSpc, syscall.ENOMEM: nbdproto.ErrNoMem, syscall.EOVERFLOW: nbdproto.ErrOverflow,
		syscall.ESHUTDOWN: nbdproto.ErrShutdown, syscall.EIO: nbdproto.ErrIO, errors.New("x"): nbdproto.ErrIO,
	} {
		if got := Errno(err); got != want {
			t.Errorf("Errno(%v) = %d, want %d", err, got, want)
		}
	}
}
