package blockdev

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// allocatedBytes is the space the file occupies on disk.
func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func openTemp(t *testing.T, size int64, o FileOptions) (*File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev.img")
	if err := CreateSparseFile(path, size); err != nil {
		t.Fatal(err)
	}
	d, err := OpenFile(path, o)
	if err != nil {
		if o.Direct && strings.Contains(err.Error(), "O_DIRECT") {
			t.Skipf("skipping: %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, path
}

// exercise checks reads, writes (aligned and not, in memory and on disk),
// zeroing and flushing against a reference buffer.
func exercise(t *testing.T, d Device, size int64) {
	if err := d.Zero(0, size); err != nil {
		t.Fatal(err)
	}
	ref := make([]byte, size)
	rng := rand.New(rand.NewSource(7))
	for i := range 300 {
		off := rng.Int63n(size/SectorSize) * SectorSize
		n := min(int64(1+rng.Intn(24))*SectorSize, size-off)
		switch i % 5 {
		case 4:
			if err := d.Zero(off, n); err != nil {
				t.Fatalf("Zero(%d, %d): %v", off, n, err)
			}
			clear(ref[off : off+n])
		default:
			// An odd sub-slice start gives an unaligned buffer address.
			buf := make([]byte, n+1)[i%2:][:n]
			rng.Read(buf)
			mustWrite(t, d, buf, off)
			copy(ref[off:], buf)
		}
		roff := rng.Int63n(size / SectorSize * SectorSize)
		rn := min(int64(1+rng.Intn(20000)), size-roff)
		rbuf := make([]byte, rn+1)[i%2:][:rn]
		if _, err := d.ReadAt(rbuf, roff); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", rn, roff, err)
		}
		if !bytes.Equal(rbuf, ref[roff:roff+rn]) {
			j := 0
			for rbuf[j] == ref[roff+int64(j)] {
				j++
			}
			t.Fatalf("step %d: read [%d, +%d) differs from what was written at byte %d (device offset %d): got %#x want %#x (last write [%d, +%d))", i, roff, rn, j, roff+int64(j), rbuf[j], ref[roff+int64(j)], off, n)
		}
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, d, int(size), 0); !bytes.Equal(got, ref) {
		t.Fatal("whole device differs from reference")
	}
}

func TestFileBuffered(t *testing.T) {
	const size = 4 << 20
	d, _ := openTemp(t, size, FileOptions{})
	if d.Size() != size || d.IsBlockDevice() {
		t.Fatalf("size %d block %v", d.Size(), d.IsBlockDevice())
	}
	exercise(t, d, size)
}

func TestFileDirect(t *testing.T) {
	const size = 4 << 20
	d, _ := openTemp(t, size, FileOptions{Direct: true})
	t.Logf("O_DIRECT alignment: offset %d, memory %d", d.align, d.memAlign)
	exercise(t, d, size)
}

func TestFileDirectOnTmpfs(t *testing.T) {
	dir := "/dev/shm"
	if _, err := os.Stat(dir); err != nil {
		t.Skipf("skipping: no %s", dir)
	}
	path := filepath.Join(dir, "writeboost-blockdev-test-"+strings.ReplaceAll(t.Name(), "/", "_"))
	defer os.Remove(path)
	if err := CreateSparseFile(path, 1<<20); err != nil {
		t.Fatal(err)
	}
	d, err := OpenFile(path, FileOptions{Direct: true})
	if err != nil {
		// Older kernels: tmpfs refuses O_DIRECT; the error must say so.
		if !strings.Contains(err.Error(), "O_DIRECT") {
			t.Fatalf("error does not mention O_DIRECT: %v", err)
		}
		return
	}
	// Newer kernels (6.6+) accept O_DIRECT on tmpfs; then it must work.
	t.Logf("this kernel does O_DIRECT on tmpfs (alignment %d)", d.align)
	defer d.Close()
	exercise(t, d, 1<<20)
}

// TestFileZeroKeepsAllocation: Zero on a fully allocated (fallocated)
// file reads back zeros and keeps every block, so a pool that promised the
// space keeps it; Discard frees it. Before, Zero punched holes: TRIM on a
// fallocated backing file took 8,388,616 allocated sectors to 0.
func TestFileZeroKeepsAllocation(t *testing.T) {
	const size = 8 << 20
	d, path := openTemp(t, size, FileOptions{})
	if err := unix.Fallocate(int(d.f.Fd()), 0, 0, size); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xAB}, 4<<20)
	mustWrite(t, d, data, 2<<20)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	before := allocatedBytes(t, path)
	if before < size {
		t.Fatalf("fallocated file has %d bytes allocated, want %d", before, size)
	}
	if err := d.Zero(2<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, d, 4<<20, 2<<20); !bytes.Equal(got, make([]byte, 4<<20)) {
		t.Fatal("zeroed range does not read zeros")
	}
	if after := allocatedBytes(t, path); after != before {
		t.Fatalf("Zero changed the allocation: %d -> %d bytes", before, after)
	}
	if err := d.Discard(2<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if after := allocatedBytes(t, path); after > before-(3<<20) {
		t.Fatalf("discarding 4 MiB freed only %d bytes (%d -> %d)", before-allocatedBytes(t, path), before, after)
	}
	// Size is unchanged (KEEP_SIZE).
	if fi, _ := os.Stat(path); fi.Size() != size {
		t.Fatalf("file size changed to %d", fi.Size())
	}
}

func TestFileErrors(t *testing.T) {
	d, path := openTemp(t, 1<<20, FileOptions{})
	if _, err := d.ReadAt(make([]byte, 1024), 1<<20-512); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("read past end: %v", err)
	}
	if _, err := d.WriteAt(make([]byte, 512), 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("write past end: %v", err)
	}
	// A file shrunk behind our back gives a short read: an error.
	if err := os.Truncate(path, 4096); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(make([]byte, 8192), 0); !errors.Is(err, io.ErrUnexpectedEOF) || !strings.Contains(err.Error(), path) {
		t.Fatalf("short read: %v", err)
	}

	ro, err := OpenFile(path, FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt(make([]byte, 512), 0); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write to read-only: %v", err)
	}
	if err := ro.Zero(0, 512); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("zero on read-only: %v", err)
	}

	if _, err := OpenFile(filepath.Join(t.TempDir(), "missing"), FileOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open missing: %v", err)
	}
	if _, err := OpenFile(t.TempDir(), FileOptions{}); err == nil {
		t.Fatal("opened a directory")
	}
}

func TestCreateSparseFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := CreateSparseFile(path, 1<<30); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Size() != 1<<30 {
		t.Fatalf("size %d", fi.Size())
	}
	if a := allocatedBytes(t, path); a > 1<<20 {
		t.Fatalf("a sparse 1 GiB file allocates %d bytes", a)
	}
	if err := CreateSparseFile(path, 1<<30); err != nil { // idempotent
		t.Fatal(err)
	}
	if err := CreateSparseFile(path, 2<<30); err != nil { // grow
		t.Fatal(err)
	}
	err := CreateSparseFile(path, 1<<20)
	if err == nil || !strings.Contains(err.Error(), "shrink") {
		t.Fatalf("shrink: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Size() != 2<<30 {
		t.Fatalf("refused shrink still changed size to %d", fi.Size())
	}
	if err := CreateSparseFile(path, 1000); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("unaligned size: %v", err)
	}
}

// TestFileBlockDevice attaches a loop device (root) to check the block
// device paths: BLKGETSIZE64 and BLKZEROOUT.
func TestFileBlockDevice(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "losetup")
	const size = 8 << 20
	img := filepath.Join(t.TempDir(), "loop.img")
	if err := CreateSparseFile(img, size); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		testenv.Skipf(t, "losetup cannot attach a loop device: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", loop).Run() })
	for _, direct := range []bool{false, true} {
		d, err := OpenFile(loop, FileOptions{Direct: direct})
		if err != nil {
			t.Fatal(err)
		}
		if !d.IsBlockDevice() || d.Size() != size {
			t.Fatalf("block %v size %d", d.IsBlockDevice(), d.Size())
		}
		exercise(t, d, size)
		mustWrite(t, d, bytes.Repeat([]byte{1}, 1<<20), 1<<20)
		if err := d.Zero(1<<20, 1<<20); err != nil {
			t.Fatal(err)
		}
		if got := mustRead(t, d, 1<<20, 1<<20); !bytes.Equal(got, make([]byte, 1<<20)) {
			t.Fatal("BLKZEROOUT range does not read zeros")
		}
		d.Close()
	}
}

// TestFileDirectReadModifyWrite forces a 4 KiB O_DIRECT alignment (as on
// a 4Kn disk) so sector-aligned requests take the read-modify-write path,
// including concurrent writes to different sectors of one block, which
// must not clobber each other.
func TestFileDirectReadModifyWrite(t *testing.T) {
	const size = 1 << 20
	d, _ := openTemp(t, size, FileOptions{Direct: true})
	d.align, d.memAlign = 4096, 4096
	exercise(t, d, size)

	if err := d.Zero(0, size); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 8)
	for s := range 8 {
		go func() {
			var err error
			for round := range 50 {
				for blk := range int64(16) {
					if _, werr := d.WriteAt(fill(byte(s*50+round), 512), blk*4096+int64(s)*512); werr != nil && err == nil {
						err = werr
					}
				}
			}
			done <- err
		}()
	}
	for range 8 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	got := mustRead(t, d, 16*4096, 0)
	for blk := range 16 {
		for s := range 8 {
			sec := got[blk*4096+s*512:][:512]
			if !bytes.Equal(sec, fill(byte(s*50+49), 512)) {
				t.Fatalf("block %d sector %d holds %#x, want the writer's last value %#x (lost update)", blk, s, sec[0], byte(s*50+49))
			}
		}
	}
}

func TestFileZeroWritesWhenNoHoles(t *testing.T) {
	const size = 4 << 20
	d, _ := openTemp(t, size, FileOptions{})
	d.noZeroRange.Store(true) // as on a filesystem without ZERO_RANGE (tmpfs)
	mustWrite(t, d, bytes.Repeat([]byte{7}, size), 0)
	if err := d.Zero(512, 3<<20); err != nil {
		t.Fatal(err)
	}
	got := mustRead(t, d, size, 0)
	want := bytes.Repeat([]byte{7}, size)
	clear(want[512 : 512+3<<20])
	if !bytes.Equal(got, want) {
		t.Fatal("zeroing by writing zeros gave the wrong contents")
	}
	if d.ZeroDeallocates() {
		t.Fatal("claims to zero in metadata without ZERO_RANGE")
	}
}

func TestFileDirectIgnoresPartialTail(t *testing.T) {
	path := filepath.Join(t.TempDir(), "odd.img")
	if err := CreateSparseFile(path, 64<<10+512); err != nil {
		t.Fatal(err)
	}
	d, err := OpenFile(path, FileOptions{Direct: true})
	if err != nil {
		if strings.Contains(err.Error(), "O_DIRECT") {
			t.Skipf("skipping: %v", err)
		}
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size()%d.align != 0 || d.Size() < 64<<10 {
		t.Fatalf("size %d with alignment %d", d.Size(), d.align)
	}
	// Force 4 KiB alignment: the 512-byte tail is then out of reach.
	d.align, d.memAlign = 4096, 4096
	d.size.Store(64 << 10)
	mustWrite(t, d, fill(5, 512), 64<<10-512) // read-modify-write of the last whole block
	if fi, _ := os.Stat(path); fi.Size() != 64<<10+512 {
		t.Fatalf("file size changed to %d", fi.Size())
	}
	if got := mustRead(t, d, 512, 64<<10-512); !bytes.Equal(got, fill(5, 512)) {
		t.Fatal("last sector not written")
	}
}
