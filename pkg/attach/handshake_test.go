package attach

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

func TestHandshakeNbdkit(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	startNbdkit(t, sock, "memory", "64M")
	conns, info, err := dialN(context.Background(), UnixDialer(sock, "some-export", 5*time.Second), 3)
	if err != nil {
		t.Fatal(err)
	}
	defer closeAll(conns)
	if info.Size != 64<<20 {
		t.Fatalf("size %d; want %d", info.Size, 64<<20)
	}
	want := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush | nbdproto.FlagSendFUA | nbdproto.FlagCanMultiConn
	if info.Flags&want != want {
		t.Fatalf("flags %#x lack %#x (nbdkit memory advertises them)", info.Flags, want)
	}
	if len(conns) != 3 {
		t.Fatalf("%d connections; want 3 (server offers CAN_MULTI_CONN)", len(conns))
	}
	// The connection is in transmission phase: an NBD_CMD_READ must work.
	req := binary.BigEndian.AppendUint32(nil, 0x25609513)
	req = binary.BigEndian.AppendUint16(req, 0)    // flags
	req = binary.BigEndian.AppendUint16(req, 0)    // READ
	req = binary.BigEndian.AppendUint64(req, 42)   // handle
	req = binary.BigEndian.AppendUint64(req, 4096) // offset
	req = binary.BigEndian.AppendUint32(req, 512)  // length
	if _, err := conns[1].Write(req); err != nil {
		t.Fatal(err)
	}
	var rep [16 + 512]byte
	if _, err := io.ReadFull(conns[1], rep[:]); err != nil {
		t.Fatal(err)
	}
	if binary.BigEndian.Uint32(rep[0:]) != 0x67446698 || binary.BigEndian.Uint32(rep[4:]) != 0 || binary.BigEndian.Uint64(rep[8:]) != 42 {
		t.Fatalf("bad simple reply %x", rep[:16])
	}
}

// fakeServer runs script on the server end of a pipe and returns the client end.
func fakeServer(t *testing.T, script func(c net.Conn)) net.Conn {
	cli, srv := net.Pipe()
	go func() {
		defer srv.Close()
		script(srv)
	}()
	t.Cleanup(func() { cli.Close() })
	return cli
}

func greeting(c net.Conn, flags uint16) {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicNBD)
	b = binary.BigEndian.AppendUint64(b, nbdproto.MagicOption)
	b = binary.BigEndian.AppendUint16(b, flags)
	c.Write(b)
}

// readGo consumes client flags and the OPT_GO request, returning the export.
func readGo(c net.Conn) (string, error) {
	var h [4 + 16]byte
	if _, err := io.ReadFull(c, h[:]); err != nil {
		return "", err
	}
	data := make([]byte, binary.BigEndian.Uint32(h[16:]))
	if _, err := io.ReadFull(c, data); err != nil {
		return "", err
	}
	n := binary.BigEndian.Uint32(data)
	return string(data[4 : 4+n]), nil
}

func optReply(c net.Conn, typ uint32, body []byte) {
	b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicOptReply)
	b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
	c.Write(append(b, body...))
}

func exportInfo(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, nbdproto.InfoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

func TestHandshakeFake(t *testing.T) {
	deadline := func() time.Time { return time.Now().Add(2 * time.Second) }

	t.Run("ok with block size", func(t *testing.T) {
		c := fakeServer(t, func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle|nbdproto.FlagNoZeroes)
			if exp, err := readGo(s); err != nil || exp != "vol" {
				return
			}
			optReply(s, nbdproto.RepInfo, exportInfo(1<<20, nbdproto.FlagHasFlags|nbdproto.FlagSendFlush))
			bs := binary.BigEndian.AppendUint16(nil, nbdproto.InfoBlockSize)
			bs = binary.BigEndian.AppendUint32(bs, 512)
			bs = binary.BigEndian.AppendUint32(bs, 4096)
			bs = binary.BigEndian.AppendUint32(bs, 32<<20)
			optReply(s, nbdproto.RepInfo, bs)
			optReply(s, 99, []byte("unknown reply types are ignored"))
			optReply(s, nbdproto.RepAck, nil)
		})
		info, err := handshake(c, "vol", deadline())
		if err != nil {
			t.Fatal(err)
		}
		want := nbdproto.ExportInfo{Size: 1 << 20, Flags: nbdproto.FlagHasFlags | nbdproto.FlagSendFlush, MinBlock: 512, PrefBlock: 4096, MaxBlock: 32 << 20}
		if info != want {
			t.Fatalf("info %+v; want %+v", info, want)
		}
	})

	for name, c := range map[string]struct {
		script func(s net.Conn)
		want   string
	}{
		"bad magic": {func(s net.Conn) { s.Write(make([]byte, 18)) }, "bad magic"},
		"oldstyle": {func(s net.Conn) {
			b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicNBD)
			s.Write(binary.BigEndian.AppendUint64(b, 0x00420281861253))
			s.Write([]byte{0, 0})
		}, "not a newstyle"},
		"not fixed": {func(s net.Conn) { greeting(s, 0) }, "fixed newstyle"},
		"refused": {func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle)
			readGo(s)
			optReply(s, nbdproto.RepErrBit|6, []byte("no such export"))
		}, "refused export"},
		"ack without export": {func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle)
			readGo(s)
			optReply(s, nbdproto.RepAck, nil)
		}, "without NBD_INFO_EXPORT"},
		"short info": {func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle)
			readGo(s)
			optReply(s, nbdproto.RepInfo, []byte{0, 0, 1})
		}, "NBD_INFO_EXPORT of 3 bytes"},
		"huge reply": {func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle)
			readGo(s)
			b := binary.BigEndian.AppendUint64(nil, nbdproto.MagicOptReply)
			b = binary.BigEndian.AppendUint32(b, nbdproto.OptGo)
			b = binary.BigEndian.AppendUint32(b, nbdproto.RepInfo)
			s.Write(binary.BigEndian.AppendUint32(b, 1<<30))
		}, "option reply of"},
		"hangs up": {func(s net.Conn) {
			greeting(s, nbdproto.FlagFixedNewstyle)
			readGo(s)
		}, "read option reply"},
		"silent": {func(s net.Conn) { time.Sleep(3 * time.Second) }, "read greeting"},
	} {
		t.Run(name, func(t *testing.T) {
			conn := fakeServer(t, c.script)
			_, err := handshake(conn, "vol", time.Now().Add(300*time.Millisecond))
			if !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v; want ErrHandshake mentioning %q", err, c.want)
			}
		})
	}
}
