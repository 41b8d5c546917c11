package attach

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// BenchmarkRelayWrite measures 1 MiB writes at queue depth 1 through the
// relay to nbdkit, over a socketpair as nbdfuse's command mode uses.
func BenchmarkRelayWrite(b *testing.B) {
	sock := filepath.Join(b.TempDir(), "nbd.sock")
	ns := &nbdkitServer{socket: sock, args: []string{"memory", "1G"}}
	startNbdkitB(b, ns)
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		b.Fatal(err)
	}
	relayEnd, err := net.FileConn(os.NewFile(uintptr(fds[0]), "relay"))
	if err != nil {
		b.Fatal(err)
	}
	cliFile := os.NewFile(uintptr(fds[1]), "cli")
	cli, err := net.FileConn(cliFile)
	if err != nil {
		b.Fatal(err)
	}
	go ServeRelay(context.Background(), relayEnd, sock, "", time.Minute, 0)
	if _, err := handshake(cli, "", time.Now().Add(5*time.Second)); err != nil {
		b.Fatal(err)
	}
	payload := make([]byte, 1<<20)
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := uint64(i%512) << 20
		if _, err := cli.Write(nbdRequest(nbdproto.CmdWrite, uint64(i), off, uint32(len(payload)), payload)); err != nil {
			b.Fatal(err)
		}
		var h [16]byte
		if _, err := io.ReadFull(cli, h[:]); err != nil {
			b.Fatal(err)
		}
		if binary.BigEndian.Uint32(h[4:]) != 0 {
			b.Fatal("error reply")
		}
	}
}

// BenchmarkDirectWrite is the same load straight to nbdkit, for comparison.
func BenchmarkDirectWrite(b *testing.B) {
	sock := filepath.Join(b.TempDir(), "nbd.sock")
	startNbdkitB(b, &nbdkitServer{socket: sock, args: []string{"memory", "1G"}})
	cli, _, err := dialExport(sock, "", 5*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	payload := make([]byte, 1<<20)
	b.SetBytes(int64(len(payload)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := uint64(i%512) << 20
		if _, err := cli.Write(nbdRequest(nbdproto.CmdWrite, uint64(i), off, uint32(len(payload)), payload)); err != nil {
			b.Fatal(err)
		}
		var h [16]byte
		if _, err := io.ReadFull(cli, h[:]); err != nil {
			b.Fatal(err)
		}
	}
}
