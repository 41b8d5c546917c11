package volume

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbdproto"
)

// fakeAttacher plays the kernel: Attach negotiates the export over the
// volume's real NBD socket and holds the connection, as a kernel nbd
// device holds its sockets; Detach drops it. Calls can be made to fail.
type fakeAttacher struct {
	mu       sync.Mutex
	conns    map[string]net.Conn // device -> connection
	infos    map[string]nbdproto.ExportInfo
	sockets  map[string]string
	next     int
	failNext map[string]error // "attach"/"detach" -> error for the next call
	calls    map[string]int
}

func newFakeAttacher() *fakeAttacher {
	return &fakeAttacher{conns: map[string]net.Conn{}, infos: map[string]nbdproto.ExportInfo{}, sockets: map[string]string{},
		failNext: map[string]error{}, calls: map[string]int{}}
}

func (f *fakeAttacher) fail(op string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failNext[op] = err
}

func (f *fakeAttacher) take(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls[op]++
	err := f.failNext[op]
	delete(f.failNext, op)
	return err
}

func (f *fakeAttacher) Attach(ctx context.Context, o attach.Options) (attach.Attachment, error) {
	if err := f.take("attach"); err != nil {
		return attach.Attachment{}, err
	}
	c, info, err := attach.UnixDialer(o.Socket, o.Export, 5*time.Second)(ctx)
	if err != nil {
		return attach.Attachment{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	dev := fmt.Sprintf("/dev/fake%d", f.next)
	f.next++
	f.conns[dev], f.infos[dev], f.sockets[dev] = c, info, o.Socket
	return attach.Attachment{Device: dev, Method: "fake", VolumeID: o.VolumeID, Socket: o.Socket,
		Size: int64(info.Size), Flags: info.Flags}, nil
}

func (f *fakeAttacher) Detach(_ context.Context, _, device string) error {
	if err := f.take("detach"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if c := f.conns[device]; c != nil {
		c.Close()
	}
	delete(f.conns, device)
	return nil
}

// Resize plays the kernel's resize: the export must already serve the
// new size (a fresh handshake shows it), else the device could address
// bytes the volume does not have.
func (f *fakeAttacher) Resize(ctx context.Context, _, volumeID string, size int64) (attach.Attachment, error) {
	if err := f.take("resize"); err != nil {
		return attach.Attachment{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for dev, info := range f.infos {
		if f.conns[dev] == nil {
			continue
		}
		c, now, err := attach.UnixDialer(f.sockets[dev], "", 5*time.Second)(ctx)
		if err != nil {
			return attach.Attachment{}, err
		}
		c.Close()
		if int64(now.Size) < size {
			return attach.Attachment{}, fmt.Errorf("fake resize of %s to %d: the export serves only %d", dev, size, now.Size)
		}
		info.Size = uint64(size)
		f.infos[dev] = info
		return attach.Attachment{Device: dev, Method: "fake", VolumeID: volumeID, Socket: f.sockets[dev], Size: size, Flags: info.Flags}, nil
	}
	return attach.Attachment{}, fmt.Errorf("fake resize: %s is not attached", volumeID)
}

func (f *fakeAttacher) attached() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.conns)
}

const (
	testCache   = 8 << 20
	testBacking = 32 << 20
)

type memVolume struct {
	cache, backing *blockdev.Faulty
	cacheMem       *blockdev.Mem
	cfg            Config
	att            *fakeAttacher
}

func newMemVolume(t *testing.T) *memVolume {
	t.Helper()
	dir := t.TempDir()
	cm := blockdev.NewMem(testCache, nil)
	m := &memVolume{cacheMem: cm, cache: blockdev.NewFaulty(cm),
		backing: blockdev.NewFaulty(blockdev.NewMem(testBacking, nil)), att: newFakeAttacher()}
	m.cfg = Config{ID: "vol-1", CachePath: "mem:cache", BackingPath: "mem:backing",
		Cache: m.cache, Backing: m.backing, Format: true, SegmentSize: 64 << 10,
		BufferPath: filepath.Join(dir, "vol-1.buf"),
		Socket:     filepath.Join(dir, "vol-1.sock"), Control: filepath.Join(dir, "vol-1.control"),
		Attacher: m.att, AttachOptions: attach.Options{StateDir: filepath.Join(dir, "attach")}}
	return m
}

// assertStopped checks that nothing of the volume is left running.
func (m *memVolume) assertStopped(t *testing.T) {
	t.Helper()
	if n := m.att.attached(); n != 0 {
		t.Errorf("%d attachments left", n)
	}
	for _, s := range []string{m.cfg.Socket, m.cfg.Control} {
		if c, err := net.Dial("unix", s); err == nil {
			c.Close()
			t.Errorf("%s still accepts connections", s)
		}
	}
	// The engine is closed cleanly: a new one opens the same devices
	// without replaying anything.
	e, err := engine.Open(engine.Options{Cache: m.cache, Backing: m.backing})
	if err != nil {
		t.Fatalf("reopen after stop: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestStartServesAttachesAndStops(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	a, ok := v.Attachment()
	if !ok || a.Size != testBacking {
		t.Fatalf("attachment %+v %v", a, ok)
	}
	// One multi-connection policy: the export promises that a flush on
	// one connection covers all, and carries flushes and FUA.
	for _, f := range []uint16{nbdproto.FlagCanMultiConn, nbdproto.FlagSendFlush, nbdproto.FlagSendFUA} {
		if a.Flags&f == 0 {
			t.Errorf("export flags %#x lack %#x", a.Flags, f)
		}
	}
	data := bytes.Repeat([]byte{0xab}, 4096)
	if _, err := v.Engine().WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.cfg.BufferPath); err != nil {
		t.Fatalf("buffer file: %v", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(m.cfg.BufferPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("buffer file left after a clean stop: %v", err)
	}
	m.assertStopped(t)
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	// The write is in the cache: a new runtime reads it back.
	m.cfg.Attacher = nil
	v2, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := v2.Engine().ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	if err := v2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestStartUndoesAFailedAttach(t *testing.T) {
	m := newMemVolume(t)
	m.att.fail("attach", errors.New("injected"))
	if _, err := Start(context.Background(), m.cfg); err == nil {
		t.Fatal("start succeeded with a failing attach")
	}
	m.assertStopped(t)
	// And a retry works.
	v, err := Start(context.Background(), m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	m.assertStopped(t)
}

// A failed engine Close must not wedge: the retry recovers the cache and
// closes it cleanly; nothing acknowledged is lost.
func TestStopRetriesAFailedClose(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x5a}, 4096)
	if _, err := v.Engine().WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	m.cache.FailFlushesAfter(0, syscall.EIO)
	if err := v.Stop(ctx); err == nil {
		t.Fatal("stop succeeded with a failing cache flush")
	}
	if _, err := os.Stat(m.cfg.BufferPath); err != nil {
		t.Fatalf("buffer file must be kept after a failed close: %v", err)
	}
	m.cache.Reset()
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("retry: %v", err)
	}
	m.assertStopped(t)
	e, err := engine.Open(engine.Options{Cache: m.cache, Backing: m.backing})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	got := make([]byte, 4096)
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("acknowledged write lost across the failed close: %v", err)
	}
}

// TestStopConvergesWithDeadCache: a volume whose cache device died stops
// on the retry even though the device still fails (a retry that could
// never succeed would wedge NodeUnstage), keeps the RAM buffer file, and
// leaves the cache as it failed: once the device works again, an open
// recovers the write that only the RAM buffer held.
func TestStopConvergesWithDeadCache(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xc3}, 4096)
	if _, err := v.Engine().WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	m.cache.FailReadsAfter(0, syscall.EIO)
	m.cache.FailWritesAfter(0, syscall.EIO)
	m.cache.FailFlushesAfter(0, syscall.EIO)
	if err := v.Stop(ctx); !errors.Is(err, engine.ErrCacheFailed) {
		t.Fatalf("stop with a dead cache: %v, want the cache's failure", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("retry with the cache still dead: %v", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatalf("second retry: %v", err)
	}
	if n := m.att.attached(); n != 0 {
		t.Fatalf("%d attachments left", n)
	}
	if _, err := os.Stat(m.cfg.BufferPath); err != nil {
		t.Fatalf("the RAM buffer file must be kept when the cache failed: %v", err)
	}
	m.cache.Reset()
	e, err := engine.Open(engine.Options{Cache: m.cache, Backing: m.backing, BufferPath: m.cfg.BufferPath})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	got := make([]byte, 4096)
	if _, err := e.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the write held only by the RAM buffer was not recovered: %v", err)
	}
}

func TestStopRetriesAFailedDetach(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	m.att.fail("detach", errors.New("device busy"))
	if err := v.Stop(ctx); err == nil {
		t.Fatal("stop succeeded with a failing detach")
	}
	// Still served: the device above it is still attached.
	if v.Engine() == nil {
		t.Fatal("engine closed under an attached device")
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	m.assertStopped(t)
}

// Release leaves the device attached and the buffers in place.
func TestReleaseKeepsAttachmentAndBuffers(t *testing.T) {
	m := newMemVolume(t)
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if m.att.attached() != 1 || m.att.calls["detach"] != 0 {
		t.Fatalf("release detached: %d attached, %d detaches", m.att.attached(), m.att.calls["detach"])
	}
	if _, err := os.Stat(m.cfg.BufferPath); err != nil {
		t.Fatalf("buffer file: %v", err)
	}
}

func TestFilesLockedAndOpenedByPolicy(t *testing.T) {
	lockWait = 200 * time.Millisecond
	dir := t.TempDir()
	cache, backing := filepath.Join(dir, "cache.img"), filepath.Join(dir, "backing.img")
	for p, n := range map[string]int64{cache: testCache, backing: testBacking} {
		if err := blockdev.CreateSparseFile(p, n); err != nil {
			t.Fatal(err)
		}
	}
	cfg := Config{ID: "f", CachePath: cache, BackingPath: backing, Format: true, SegmentSize: 64 << 10,
		Socket: filepath.Join(dir, "f.sock")}
	ctx := context.Background()
	v, err := Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg2 := cfg
	cfg2.Socket = filepath.Join(dir, "g.sock")
	if _, err := Start(ctx, cfg2); !errors.Is(err, ErrInUse) {
		t.Fatalf("second runtime on one cache: %v", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	v, err = Start(ctx, cfg2)
	if err != nil {
		t.Fatalf("after the first stopped: %v", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

// A filesystem without O_DIRECT (tmpfs) gets buffered I/O under DirectIO.
func TestDirectFallsBackWhereRefused(t *testing.T) {
	dir, err := os.MkdirTemp("/dev/shm", "wbvol-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "img")
	if err := blockdev.CreateSparseFile(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	f, err := openPolicy(p, DirectIO)
	if err != nil {
		t.Fatalf("direct on tmpfs: %v", err)
	}
	f.Close()
}

// slowDev delays every read, as a slow or overloaded cache device would.
type slowDev struct {
	blockdev.Device
	d time.Duration
}

func (s slowDev) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(s.d)
	return s.Device.ReadAt(p, off)
}

// Start's context reaches the engine's recovery: a deadline stops a slow
// recovery part-way, as a crash would, and a later start recovers.
func TestStartContextBoundsRecovery(t *testing.T) {
	m := newMemVolume(t)
	m.cfg.Attacher = nil
	ctx := context.Background()
	v, err := Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	// Fill a good part of the log and take the cache as a crash would
	// leave it.
	data := bytes.Repeat([]byte{7}, 64<<10)
	for off := int64(0); off < 4<<20; off += int64(len(data)) {
		if _, err := v.Engine().WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Engine().Flush(); err != nil {
		t.Fatal(err)
	}
	crashed := m.cacheMem.CrashImage(blockdev.CrashKeepAll, nil)
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	m.cfg.Cache = slowDev{crashed, 20 * time.Millisecond}
	m.cfg.BufferPath = ""
	m.cfg.Socket = m.cfg.Socket + "2"
	m.cfg.Control = ""
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := Start(short, m.cfg); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("start past its deadline: %v", err)
	}
	v, err = Start(ctx, m.cfg)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := v.Engine().ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read after the abandoned recovery: %v", err)
	}
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}
