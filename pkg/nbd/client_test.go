package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// testClient is a minimal NBD client speaking the wire protocol directly,
// so tests can send anything, including what a real client never would.
type testClient struct {
	t     testing.TB
	nc    net.Conn
	br    *bufio.Reader
	wmu   sync.Mutex
	flags uint16
	size  uint64

	mu      sync.Mutex
	readLen map[uint64]uint32 // handles of READs in flight and their lengths
}

type optReplyMsg struct {
	opt, typ uint32
	data     []byte
}

type replyMsg struct {
	handle uint64
	errno  uint32
	data   []byte
}

// startServer serves exports on a fresh unix socket and returns its path.
func startServer(t testing.TB, cfg Config, exports ...Export) (*Server, string) {
	t.Helper()
	s := NewServer(cfg)
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := ListenUnix(path, 0)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s, path
}

// dialRaw connects and reads the greeting; it sends the given client flags.
func dialRaw(t testing.TB, path string, cflags uint32) *testClient {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(20 * time.Second))
	c := &testClient{t: t, nc: nc, br: bufio.NewReader(nc), readLen: map[uint64]uint32{}}
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	if binary.BigEndian.Uint64(g[0:]) != nbdproto.MagicNBD || binary.BigEndian.Uint64(g[8:]) != nbdproto.MagicOption {
		t.Fatalf("bad greeting %x", g)
	}
	if hf := binary.BigEndian.Uint16(g[16:]); hf != nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes {
		t.Fatalf("handshake flags %#x", hf)
	}
	c.write(binary.BigEndian.AppendUint32(nil, cflags))
	return c
}

func (c *testClient) write(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Errorf("client write: %v", err)
	}
}

func (c *testClient) sendOpt(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicOption)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *testClient) readOpt() (optReplyMsg, error) {
	var h [20]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return optReplyMsg{}, err
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != nbdproto.MagicOptReply {
		return optReplyMsg{}, fmt.Errorf("bad option reply magic %#x", m)
	}
	r := optReplyMsg{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	_, err := io.ReadFull(c.br, r.data)
	return r, err
}

func (c *testClient) mustOpt() optReplyMsg {
	c.t.Helper()
	r, err := c.readOpt()
	if err != nil {
		c.t.Fatalf("read option reply: %v", err)
	}
	return r
}

func infoPayload(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// goInfo sends OPT_INFO or OPT_GO and collects the info replies by type.
func (c *testClient) goInfo(opt uint32, name string, infos ...uint16) (map[uint16][]byte, optReplyMsg) {
	c.t.Helper()
	c.sendOpt(opt, infoPayload(name, infos...))
	got := map[uint16][]byte{}
	for {
		r := c.mustOpt()
		if r.opt != opt {
			c.t.Fatalf("reply to option %d, want %d", r.opt, opt)
		}
		switch r.typ {
		case nbdproto.RepInfo:
			got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
		case nbdproto.RepAck:
			if e, ok := got[nbdproto.InfoExport]; ok {
				c.size = binary.BigEndian.Uint64(e)
				c.flags = binary.BigEndian.Uint16(e[8:])
			}
			return got, r
		default:
			return got, r
		}
	}
}

// connect dials and enters transmission on export name with OPT_GO.
func connect(t testing.TB, path, name string) *testClient {
	t.Helper()
	c := dialRaw(t, path, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	if _, r := c.goInfo(nbdproto.OptGo, name); r.typ != nbdproto.RepAck {
		t.Fatalf("OPT_GO: reply type %#x %q", r.typ, r.data)
	}
	return c
}

func (c *testClient) send(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	if typ == nbdproto.CmdRead {
		c.mu.Lock()
		c.readLen[handle] = length
		c.mu.Unlock()
	}
	c.write(requestBytes(typ, flags, handle, off, length, payload))
}

// requestBytes is one request as sent on the wire.
func requestBytes(typ, flags uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := make([]byte, nbdproto.RequestHeaderSize, nbdproto.RequestHeaderSize+len(payload))
	binary.BigEndian.PutUint32(b[0:], nbdproto.MagicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	return append(b, payload...)
}

func (c *testClient) recv() (replyMsg, error) {
	var h [nbdproto.ReplyHeaderSize]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return replyMsg{}, err
	}
	if m := binary.BigEndian.Uint32(h[0:]); m != nbdproto.MagicReply {
		return replyMsg{}, fmt.Errorf("bad reply magic %#x", m)
	}
	r := replyMsg{errno: binary.BigEndian.Uint32(h[4:]), handle: binary.BigEndian.Uint64(h[8:])}
	c.mu.Lock()
	n, isRead := c.readLen[r.handle]
	delete(c.readLen, r.handle)
	c.mu.Unlock()
	if isRead && r.errno == 0 {
		r.data = make([]byte, n)
		if _, err := io.ReadFull(c.br, r.data); err != nil {
			return r, err
		}
	}
	return r, nil
}

func (c *testClient) mustRecv() replyMsg {
	c.t.Helper()
	r, err := c.recv()
	if err != nil {
		c.t.Fatalf("read reply: %v", err)
	}
	return r
}

// do sends one request and waits for its reply (nothing else in flight).
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) replyMsg {
	c.t.Helper()
	c.send(typ, flags, 7, off, length, payload)
	r := c.mustRecv()
	if r.handle != 7 {
		c.t.Fatalf("reply handle %d, want 7", r.handle)
	}
	return r
}

// expectClosed asserts the server hung up.
func (c *testClient) expectClosed() {
	c.t.Helper()
	_ = c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	for {
		_, err := c.br.Read(buf)
		if err == nil {
			continue
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			c.t.Fatal("server did not close the connection")
		}
		return
	}
}
