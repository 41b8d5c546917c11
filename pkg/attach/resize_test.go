package attach

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

// growFile is an NBD backend over a sparse file whose exported size goes
// up when the test grows it, as the engine's does (nbdkit's file plugin
// fixes each connection's size at its handshake, so it cannot stand in).
type growFile struct {
	f    *os.File
	size atomic.Int64
}

func (g *growFile) ReadAt(p []byte, off int64) (int, error)  { return g.f.ReadAt(p, off) }
func (g *growFile) WriteAt(p []byte, off int64) (int, error) { return g.f.WriteAt(p, off) }
func (g *growFile) Flush() error                             { return g.f.Sync() }
func (g *growFile) Size() int64                              { return g.size.Load() }
func (g *growFile) MultiConnSafe() bool                      { return true }

// grow makes the file and the export size bytes.
func (g *growFile) grow(t *testing.T, size int64) {
	t.Helper()
	if err := g.f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	g.size.Store(size)
}

// growServer serves a growFile on a unix socket until the test ends (or
// stop); it can be restarted on the same file, as a restarted plugin is.
type growServer struct {
	t      *testing.T
	socket string
	b      *growFile
	srv    *nbd.Server
}

func startGrowServer(t *testing.T, dir string, size int64) *growServer {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, "grow.img"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	s := &growServer{t: t, socket: filepath.Join(dir, "grow.sock"), b: &growFile{f: f}}
	s.b.grow(t, size)
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *growServer) start() {
	s.t.Helper()
	s.srv = nbd.NewServer(nbd.Config{})
	if err := s.srv.AddExport(nbd.Export{Backend: s.b}); err != nil {
		s.t.Fatal(err)
	}
	l, err := nbd.ListenUnix(s.socket, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	go s.srv.Serve(l)
}

func (s *growServer) stop() {
	if s.srv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.srv.Shutdown(ctx)
		s.srv = nil
	}
}

// checkGrownDevice writes a block at the new end of dev (O_DIRECT, so it
// reaches the server before the check) and finds it in the served file.
func checkGrownDevice(t *testing.T, dev string, b *growFile, size int64) {
	t.Helper()
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBlock()
	for i := range buf {
		buf[i] = 0x5A
	}
	if _, err := f.WriteAt(buf, size-4096); err != nil {
		t.Fatalf("write at the new end of %s: %v", dev, err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := b.f.ReadAt(got, size-4096); err != nil || !bytes.Equal(got, buf) {
		t.Fatalf("the block written at the new end is not in the served file (%v)", err)
	}
	if _, err := f.ReadAt(buf, size); err == nil {
		t.Fatalf("%s reads past its size %d", dev, size)
	}
}

// resizeBody is shared by the fallback and kernel variants: attach, grow
// the export, Resize, check the kernel's size and I/O at the new end,
// repeat (harmless), refuse a shrink; then restart the server bigger (a
// volume grown while its server was away) and converge again.
func resizeBody(t *testing.T, s *growServer, o Options) {
	const small, big, bigger = 32 << 20, 96 << 20, 160 << 20
	a := mustAttach(t, o)
	t.Cleanup(func() { _ = Detach(context.Background(), o.StateDir, a.Device) })
	ctx := context.Background()
	if got, err := deviceSize(filepath.Base(a.Device)); err != nil || got != small {
		t.Fatalf("%s: %d bytes (%v), want %d", a.Device, got, err, small)
	}
	s.b.grow(t, big)
	if got, _ := deviceSize(filepath.Base(a.Device)); got != small {
		t.Fatalf("%s grew to %d before Resize", a.Device, got)
	}
	r, err := Resize(ctx, o.StateDir, o.VolumeID, big)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := deviceSize(filepath.Base(a.Device)); err != nil || got != big || r.Size != big || r.Device != a.Device {
		t.Fatalf("after Resize: %s has %d bytes (%v), record %+v; want %d", a.Device, got, err, r, big)
	}
	checkGrownDevice(t, a.Device, s.b, big)
	if _, err := Resize(ctx, o.StateDir, o.VolumeID, big); err != nil {
		t.Fatalf("repeated Resize: %v", err)
	}
	if _, err := Resize(ctx, o.StateDir, o.VolumeID, small); err == nil {
		t.Fatal("a shrink was accepted")
	}
	st, err := loadState(o.StateDir, o.VolumeID)
	if err != nil || st.Size != big {
		t.Fatalf("record after Resize: %+v %v", st, err)
	}

	// The server restarts bigger (grown while it was away): the device
	// reconnects (kernel: Reattach; fallback: the relay by itself) and a
	// Resize converges.
	s.stop()
	s.b.grow(t, bigger)
	s.start()
	if a.Method == MethodNetlink {
		if _, err := Reattach(ctx, o.StateDir, o.VolumeID, UnixDialer(s.socket, "", 10*time.Second), o); err != nil {
			t.Fatalf("Reattach to a grown export: %v", err)
		}
	}
	if _, err := Resize(ctx, o.StateDir, o.VolumeID, bigger); err != nil {
		t.Fatal(err)
	}
	checkGrownDevice(t, a.Device, s.b, bigger)
	t.Logf("%s (%s): %d -> %d -> %d bytes", a.Device, a.Method, small, big, bigger)
}

// TestFallbackResize: the loop device over nbdfuse (through the relay,
// whose file is the ceiling) grows live by its sizelimit, never showing
// more than the volume.
func TestFallbackResize(t *testing.T) {
	requireFallbackTools(t)
	dir := t.TempDir()
	cleanupUnder(t, dir)
	s := startGrowServer(t, dir, 32<<20)
	o := Options{Socket: s.socket, VolumeID: "grow-fb", StateDir: filepath.Join(dir, "state"), PreferMethod: MethodFallback,
		Timeout: 20 * time.Second, DeadConnTimeout: 30 * time.Second, RelayCommand: testRelayCommand(t)}
	resizeBody(t, s, o)
	st, err := loadState(o.StateDir, o.VolumeID)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(st.BackingFile); err != nil || fi.Size() != FallbackCeiling {
		t.Fatalf("nbdfuse's file: %v %v, want the ceiling %d", fi, err, int64(FallbackCeiling))
	}
}

// TestFallbackResizeDirectRefused: without the relay nbdfuse's file is the
// volume's size, and Resize says it cannot grow live.
func TestFallbackResizeDirectRefused(t *testing.T) {
	requireFallbackTools(t)
	dir := t.TempDir()
	cleanupUnder(t, dir)
	s := startGrowServer(t, dir, 32<<20)
	o := Options{Socket: s.socket, VolumeID: "grow-direct", StateDir: filepath.Join(dir, "state"), PreferMethod: MethodFallback, Timeout: 20 * time.Second}
	a := mustAttach(t, o)
	t.Cleanup(func() { _ = Detach(context.Background(), o.StateDir, a.Device) })
	s.b.grow(t, 64<<20)
	if _, err := Resize(context.Background(), o.StateDir, o.VolumeID, 64<<20); !errors.Is(err, ErrResizeUnsupported) {
		t.Fatalf("Resize of a direct fallback: %v, want ErrResizeUnsupported", err)
	}
	if got, _ := deviceSize(filepath.Base(a.Device)); got != 32<<20 {
		t.Fatalf("%s: %d bytes after a refused Resize", a.Device, got)
	}
}

// TestKernelResize: NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES resizes
// a live netlink device in the real kernel (VM tier).
func TestKernelResize(t *testing.T) {
	requireKernelNBD(t)
	dir := t.TempDir()
	cleanupUnder(t, dir)
	s := startGrowServer(t, dir, 32<<20)
	o := Options{Socket: s.socket, VolumeID: "grow-kernel", StateDir: filepath.Join(dir, "state"), PreferMethod: MethodNetlink,
		Timeout: 30 * time.Second, DeadConnTimeout: time.Minute}
	resizeBody(t, s, o)
}
