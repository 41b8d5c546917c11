package attach

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// These tests need the kernel nbd driver, which the CI machines lack; they
// skip on the host (even in strict mode: no package installs a kernel
// module) and run in the real-kernel VM of make vm-test, where a skip fails.

func requireKernelNBD(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	_ = ensureKernelNBD() // loads the module where it exists
	testenv.RequireKernelFeature(t, "/dev/nbd0", "kernel nbd driver")
	testenv.RequireTools(t, "nbdkit", "mkfs.ext4", "e2fsck", "mount", "umount")
}

func newKernelEnv(t *testing.T, size int64) *fallbackEnv {
	dir := t.TempDir()
	e := &fallbackEnv{
		dir: dir, image: filepath.Join(dir, "disk.img"), socket: filepath.Join(dir, "nbd.sock"),
		logfile: filepath.Join(dir, "nbdkit.log"), stateDir: filepath.Join(dir, "state"), mnt: filepath.Join(dir, "mnt"),
	}
	cleanupUnder(t, dir)
	if err := os.WriteFile(e.image, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(e.image, size); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(e.mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	// The file plugin keeps acknowledged writes in the image's page cache,
	// which outlives a SIGKILL of nbdkit, as the engine's shared buffers do.
	e.srv = startNbdkit(t, e.socket, "--filter=log", "file", e.image, "logfile="+e.logfile)
	return e
}

func kernelAttach(t *testing.T, e *fallbackEnv, vol string) *Attachment {
	t.Helper()
	a := mustAttach(t, Options{Socket: e.socket, VolumeID: vol, StateDir: e.stateDir, Timeout: 30 * time.Second, DeadConnTimeout: time.Minute})
	t.Cleanup(func() { _ = Detach(context.Background(), e.stateDir, a.Device) })
	if a.Method != MethodNetlink && a.Method != MethodIoctl {
		t.Fatalf("method %s on a kernel with nbd", a.Method)
	}
	return a
}

func TestKernelFilesystemRoundTrip(t *testing.T) {
	requireKernelNBD(t)
	e := newKernelEnv(t, 256<<20)
	a := kernelAttach(t, e, "vol-kernel-fs")
	if a.Method == MethodNetlink {
		b, err := os.ReadFile(filepath.Join(sysBlock, filepath.Base(a.Device), "backend"))
		if err != nil || strings.TrimSpace(string(b)) != "vol-kernel-fs" {
			t.Fatalf("backend = %q, %v", b, err)
		}
		if idx, err := findByBackend("vol-kernel-fs"); err != nil || "/dev/nbd"+itoa(idx) != a.Device {
			t.Fatalf("findByBackend = %d, %v", idx, err)
		}
	}
	run(t, "mkfs.ext4", "-q", "-F", a.Device)
	run(t, "mount", a.Device, e.mnt)
	files := writeFiles(t, e.mnt, "k", 20, 64<<10)
	before := countFlushes(t, e.logfile)
	unix.Sync()
	if after := countFlushes(t, e.logfile); after <= before {
		t.Fatalf("sync sent no NBD_CMD_FLUSH: flags were not passed to the kernel (%d before, %d after)", before, after)
	}
	run(t, "umount", e.mnt)
	mustDetach(t, e.stateDir, a.Device)
	run(t, "e2fsck", "-n", "-f", e.image)
	a = kernelAttach(t, e, "vol-kernel-fs")
	run(t, "mount", "-o", "ro", a.Device, e.mnt)
	checkFiles(t, e.mnt, files)
	run(t, "umount", e.mnt)
	mustDetach(t, e.stateDir, a.Device)
}

func itoa(i int) string { return strconv.Itoa(i) }

// TestKernelKillServerUnderWriteLoad kills the server with SIGKILL while a
// writer streams O_DIRECT writes, restarts it, reattaches, and checks the
// writer never saw an error and every block holds its last written value.
func TestKernelKillServerUnderWriteLoad(t *testing.T) {
	requireKernelNBD(t)
	e := newKernelEnv(t, 64<<20)
	a := kernelAttach(t, e, "vol-kernel-kill")
	if a.Method != MethodNetlink {
		testenv.Skipf(t, "reattach needs the netlink interface; this kernel gave %s", a.Method)
	}
	const blocks = 1024
	fd, err := unix.Open(a.Device, unix.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf := alignedBlock()
	last := make([]uint64, blocks) // generation last written per block
	var mu sync.Mutex
	stop := make(chan struct{})
	werr := make(chan error, 1)
	go func() {
		for gen := uint64(1); ; gen++ {
			select {
			case <-stop:
				werr <- nil
				return
			default:
			}
			blk := int((gen * 7919) % blocks)
			fillBlock(buf, blk, gen)
			if _, err := unix.Pwrite(fd, buf, int64(blk)*4096); err != nil {
				werr <- err
				return
			}
			mu.Lock()
			last[blk] = gen
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	e.srv.kill()
	time.Sleep(200 * time.Millisecond)
	e.srv.start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := Reattach(ctx, e.stateDir, "vol-kernel-kill", UnixDialer(e.socket, "", 10*time.Second), Options{DeadConnTimeout: time.Minute}); err != nil {
		close(stop)
		t.Fatalf("Reattach: %v", err)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	if err := <-werr; err != nil {
		t.Fatalf("the writer saw an error across the restart: %v", err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	rb := alignedBlock()
	want := alignedBlock()
	for blk := 0; blk < blocks; blk++ {
		if _, err := unix.Pread(fd, rb, int64(blk)*4096); err != nil {
			t.Fatalf("read block %d: %v", blk, err)
		}
		if last[blk] == 0 {
			continue
		}
		fillBlock(want, blk, last[blk])
		if !bytes.Equal(rb, want) {
			t.Fatalf("block %d: lost its last acknowledged write (generation %d)", blk, last[blk])
		}
	}
}

func alignedBlock() []byte {
	b := make([]byte, 8192)
	off := 4096 - int(uintptrOf(b)%4096)
	return b[off : off+4096]
}

func fillBlock(b []byte, blk int, gen uint64) {
	for i := 0; i < len(b); i += 16 {
		binary.LittleEndian.PutUint64(b[i:], uint64(blk))
		binary.LittleEndian.PutUint64(b[i+8:], gen)
	}
}
