package serve

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// loopStat returns the sectors written and discarded on a loop device so
// far (/sys/block/loopN/stat fields 7 and 14). Writes count WRITE_ZEROES
// too (the kernel accounts them as writes).
func loopStat(t *testing.T, dev string) (written, discarded int64) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "stat"))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) < 14 {
		t.Fatalf("%s stat: %q", dev, b)
	}
	written, _ = strconv.ParseInt(f[6], 10, 64)
	discarded, _ = strconv.ParseInt(f[13], 10, 64)
	return written * 512, discarded * 512
}

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestServeMkfsFstrimCostsLittle: mkfs.ext4 (which discards the whole
// device) and fstrim on a 4 GiB volume whose backing store is a block
// device (a loop device over a fully allocated file) write at most 64 MiB
// to it, discard nothing, and the file keeps every block. Before, TRIM was
// zeroing: 8,113 MiB written to the backing device, and on a file every
// block punched out (8,388,616 allocated sectors -> 0).
func TestServeMkfsFstrimCostsLittle(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fstrim", "mount", "umount")
	const size = 4 << 30
	dir := t.TempDir()
	loopOver := func(name string) (img, dev string) {
		img = filepath.Join(dir, name)
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		out, _ := run(t, time.Minute, false, "losetup", "--find", "--show", img)
		dev = strings.TrimSpace(out)
		t.Cleanup(func() { run(t, time.Minute, true, "losetup", "-d", dev) })
		return img, dev
	}
	// Side by side: what mkfs.ext4 itself writes to a raw device of the
	// same size (its journal, zeroed, and its metadata).
	_, raw := loopOver("raw.img")
	rawBefore, _ := loopStat(t, raw)
	run(t, 10*time.Minute, false, "mkfs.ext4", "-q", raw)
	rawAfter, _ := loopStat(t, raw)
	rawWritten := rawAfter - rawBefore

	img, backing := loopOver("backing.img")
	allocBefore := allocated(t, img)
	wBefore, dBefore := loopStat(t, backing)

	s := startServe(t, dir, "--backing", backing, "--cache-size", "512MiB")
	a := attach(t, s, filepath.Join(dir, "fuse"))
	start := time.Now()
	run(t, 10*time.Minute, false, "mkfs.ext4", "-q", a.loop)
	t.Logf("mkfs.ext4 of 4 GiB took %v", time.Since(start))
	mnt := filepath.Join(dir, "mnt")
	mount(t, a.loop, mnt)
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	syncFS(t, mnt)
	run(t, 10*time.Minute, false, "fstrim", "-v", mnt)
	run(t, time.Minute, false, "umount", mnt)
	wb(t, false, "drain", "--control", s.control)

	wAfter, dAfter := loopStat(t, backing)
	written, discarded := wAfter-wBefore, dAfter-dBefore
	t.Logf("mkfs.ext4 + fstrim of 4 GiB: %d MiB written to the backing device (mkfs.ext4 on the raw device: %d MiB), %d MiB discarded; allocated %d -> %d bytes",
		written>>20, rawWritten>>20, discarded>>20, allocBefore, allocated(t, img))
	// The goal is 64 MiB per 4 GiB; mkfs.ext4 alone writes a
	// little more (its 64 MiB journal is zeroed), so the cache may add
	// at most 2 MiB (fstrim, one file) to what mkfs.ext4 itself writes.
	if written > rawWritten+2<<20 {
		t.Errorf("%d MiB written to the backing device, mkfs.ext4 on the raw device writes %d MiB", written>>20, rawWritten>>20)
	}
	if discarded != 0 {
		t.Errorf("%d bytes discarded on a backing device whose pool promised its space", discarded)
	}
	if got := allocated(t, img); got < allocBefore {
		t.Errorf("the fallocated backing file lost blocks: %d -> %d bytes allocated", allocBefore, got)
	}
}
