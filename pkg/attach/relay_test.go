package attach

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// fakeUpstream accepts connections on a unix socket, negotiates OPT_GO and
// hands each connection to the next script.
func fakeUpstream(t *testing.T, flags uint16, scripts ...func(c net.Conn)) string {
	sock := filepath.Join(t.TempDir(), "up.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for _, script := range scripts {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			greeting(c, nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
			if _, err := readGo(c); err != nil {
				c.Close()
				return
			}
			optReply(c, nbdproto.RepInfo, exportInfo(1<<20, flags))
			optReply(c, nbdproto.RepAck, nil)
			script(c)
			c.Close()
		}
	}()
	return sock
}

func nbdRequest(typ uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbdproto.MagicRequest)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, payload...)
}

func readRequest(t *testing.T, c net.Conn) (typ uint16, handle uint64, payload []byte) {
	var h [28]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		t.Errorf("upstream read: %v", err)
		return
	}
	typ = binary.BigEndian.Uint16(h[6:])
	handle = binary.BigEndian.Uint64(h[8:])
	if typ == nbdproto.CmdWrite {
		payload = make([]byte, binary.BigEndian.Uint32(h[24:]))
		io.ReadFull(c, payload)
	}
	return
}

func simpleReply(handle uint64, data []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, nbdproto.MagicReply)
	b = binary.BigEndian.AppendUint32(b, 0)
	b = binary.BigEndian.AppendUint64(b, handle)
	return append(b, data...)
}

// TestRelayResendsAfterServerLoss: the first server answers a WRITE, then
// dies with a READ and a FLUSH unanswered (sending half a READ payload); the
// relay redials and the second server gets exactly those two again, in
// order. The client sees each reply once and no torn READ.
func TestRelayResendsAfterServerLoss(t *testing.T) {
	const flags = nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagCanMultiConn | nbdproto.FlagSendDF
	data := bytes.Repeat([]byte{0xab}, 512)
	got2 := make(chan []uint16, 1)
	sock := fakeUpstream(t, flags,
		func(c net.Conn) {
			if typ, h, p := readRequest(t, c); typ != nbdproto.CmdWrite || h != 1 || len(p) != 4096 {
				t.Errorf("first server: got type %d handle %d len %d", typ, h, len(p))
			}
			c.Write(simpleReply(1, nil))
			readRequest(t, c)                   // READ 2
			readRequest(t, c)                   // FLUSH 3
			c.Write(simpleReply(2, data[:100])) // dies mid-payload
		},
		func(c net.Conn) {
			var seen []uint16
			for i := 0; i < 2; i++ {
				typ, h, _ := readRequest(t, c)
				seen = append(seen, typ)
				if typ == nbdproto.CmdRead {
					c.Write(simpleReply(h, data))
				} else {
					c.Write(simpleReply(h, nil))
				}
			}
			got2 <- seen
			io.Copy(io.Discard, c)
		},
	)
	cli, down := net.Pipe()
	defer cli.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	relayErr := make(chan error, 1)
	go func() { relayErr <- ServeRelay(ctx, down, sock, "", 10*time.Second, 0) }()

	info, err := handshake(cli, "anything", time.Now().Add(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != 1<<20 || info.Flags != relayFlags(flags) || info.Flags&(nbdproto.FlagCanMultiConn|nbdproto.FlagSendDF) != 0 {
		t.Fatalf("relay advertised %+v; want size 1MiB flags %#x", info, relayFlags(flags))
	}
	go func() {
		cli.Write(nbdRequest(nbdproto.CmdWrite, 1, 0, 4096, make([]byte, 4096)))
		cli.Write(nbdRequest(nbdproto.CmdRead, 2, 0, 512, nil))
		cli.Write(nbdRequest(3, 3, 0, 0, nil)) // FLUSH
	}()
	cli.SetReadDeadline(time.Now().Add(10 * time.Second))
	replies := map[uint64]int{}
	for len(replies) < 3 {
		var h [16]byte
		if _, err := io.ReadFull(cli, h[:]); err != nil {
			t.Fatalf("client read after %v: %v", replies, err)
		}
		handle := binary.BigEndian.Uint64(h[8:])
		replies[handle]++
		if handle == 2 {
			p := make([]byte, 512)
			if _, err := io.ReadFull(cli, p); err != nil || !bytes.Equal(p, data) {
				t.Fatalf("READ payload torn or wrong: %v", err)
			}
		}
	}
	for h, n := range replies {
		if n != 1 {
			t.Fatalf("handle %d answered %d times", h, n)
		}
	}
	if seen := <-got2; len(seen) != 2 || seen[0] != nbdproto.CmdRead || seen[1] != 3 {
		t.Fatalf("second server got %v; want READ then FLUSH", seen)
	}
	cli.Write(nbdRequest(nbdproto.CmdDisc, 4, 0, 0, nil))
	if err := <-relayErr; err != nil {
		t.Fatalf("relay: %v", err)
	}
}

// TestRelayGivesUp: a server that never comes back ends the relay after the
// dead-connection timeout, with an error, instead of hanging the client.
func TestRelayGivesUp(t *testing.T) {
	sock := fakeUpstream(t, nbdproto.FlagHasFlags|nbdproto.FlagSendFlush, func(c net.Conn) {
		readRequest(t, c)
	})
	cli, down := net.Pipe()
	defer cli.Close()
	relayErr := make(chan error, 1)
	go func() { relayErr <- ServeRelay(context.Background(), down, sock, "", 300*time.Millisecond, 0) }()
	if _, err := handshake(cli, "", time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	cli.Write(nbdRequest(nbdproto.CmdRead, 1, 0, 512, nil))
	select {
	case err := <-relayErr:
		if err == nil {
			t.Fatal("relay ended without error while the server was gone")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("relay did not give up")
	}
}

func TestRelayRejectsChangedServer(t *testing.T) {
	// A server that comes back with another size must not be served to a
	// filesystem that knew the old one.
	sock := filepath.Join(t.TempDir(), "up.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for i, size := range []uint64{1 << 20, 2 << 20} {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			greeting(c, nbdproto.FlagFixedNewstyle)
			readGo(c)
			optReply(c, nbdproto.RepInfo, exportInfo(size, nbdproto.FlagHasFlags))
			optReply(c, nbdproto.RepAck, nil)
			if i == 0 {
				readRequest(t, c)
			}
			c.Close()
		}
	}()
	cli, down := net.Pipe()
	defer cli.Close()
	relayErr := make(chan error, 1)
	go func() { relayErr <- ServeRelay(context.Background(), down, sock, "", 5*time.Second, 0) }()
	if _, err := handshake(cli, "", time.Now().Add(5*time.Second)); err != nil {
		t.Fatal(err)
	}
	cli.Write(nbdRequest(nbdproto.CmdRead, 1, 0, 512, nil))
	select {
	case err := <-relayErr:
		if err == nil {
			t.Fatal("relay accepted a server of another size")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("relay hung")
	}
}

// TestRelayRefusesOtherOptions: structured replies (and anything else but
// OPT_GO/OPT_INFO) are refused with NBD_REP_ERR_UNSUP, so every reply the
// relay forwards stays a simple reply it can parse; OPT_GO still works after.
func TestRelayRefusesOtherOptions(t *testing.T) {
	sock := fakeUpstream(t, nbdproto.FlagHasFlags|nbdproto.FlagSendFlush, func(c net.Conn) { io.Copy(io.Discard, c) })
	cli, down := net.Pipe()
	defer cli.Close()
	go ServeRelay(context.Background(), down, sock, "", time.Second, 0)
	cli.SetDeadline(time.Now().Add(5 * time.Second))
	var g [18]byte
	if _, err := io.ReadFull(cli, g[:]); err != nil {
		t.Fatal(err)
	}
	req := binary.BigEndian.AppendUint32(nil, nbdproto.ClientFixedNewstyle)
	req = binary.BigEndian.AppendUint64(req, nbdproto.MagicOption)
	req = binary.BigEndian.AppendUint32(req, 8) // NBD_OPT_STRUCTURED_REPLY
	req = binary.BigEndian.AppendUint32(req, 0)
	cli.Write(req)
	var rh [20]byte
	if _, err := io.ReadFull(cli, rh[:]); err != nil {
		t.Fatal(err)
	}
	if typ := binary.BigEndian.Uint32(rh[12:]); typ != nbdproto.RepErrUnsup || binary.BigEndian.Uint32(rh[8:]) != 8 {
		t.Fatalf("structured reply option answered with type %#x for option %d", typ, binary.BigEndian.Uint32(rh[8:]))
	}
	cli.Write(encodeGo(0, "")[4:]) // OPT_GO without the client flags already sent
	for {
		if _, err := io.ReadFull(cli, rh[:]); err != nil {
			t.Fatal(err)
		}
		body := make([]byte, binary.BigEndian.Uint32(rh[16:]))
		io.ReadFull(cli, body)
		if binary.BigEndian.Uint32(rh[12:]) == nbdproto.RepAck {
			break
		}
	}
}
