package pool

import (
	"bytes"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

func TestDirectoryLifecycle(t *testing.T) {
	p, err := New(Config{Kind: KindDirectory, Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	path, err := p.Create("vol-1", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := p.Create("vol-1", 1<<20); err != nil || again != path {
		t.Fatalf("idempotent create: %v %v", again, err)
	}
	if _, err := p.Create("vol-1", 2<<20); !errors.Is(err, ErrSizeClash) {
		t.Fatalf("size clash: %v", err)
	}
	if err := p.Expand("vol-1", 3<<20); err != nil {
		t.Fatal(err)
	}
	if _, sz, err := p.Lookup("vol-1"); err != nil || sz != 3<<20 {
		t.Fatalf("lookup after expand: %d %v", sz, err)
	}
	if err := p.Delete("vol-1"); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("vol-1"); err != nil {
		t.Fatal("second delete:", err)
	}
	if _, _, err := p.Lookup("vol-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("lookup after delete: %v", err)
	}
	for _, bad := range []string{"../x", "", "a/b", ".hidden"} {
		if _, err := p.Create(bad, 4096); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
}

func TestKinds(t *testing.T) {
	if p, err := New(Config{Kind: KindLVM, VolumeGroup: "vg"}); err != nil || p.String() != "lvm:vg" {
		t.Fatalf("lvm: %v %v", p, err)
	}
	if _, err := New(Config{Kind: KindLVM}); err == nil {
		t.Fatal("lvm without a volume group accepted")
	}
	if _, err := New(Config{Kind: "zfs"}); err == nil {
		t.Fatal("unknown kind accepted")
	}
}

// TestCapacityIsReal mounts a small tmpfs so that allocation really runs out.
func TestCapacityIsReal(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", dir).CombinedOutput(); err != nil {
		testenv.Skipf(t, "mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	p, err := New(Config{Kind: KindDirectory, Path: filepath.Join(dir, "pool")})
	if err != nil {
		t.Fatal(err)
	}
	before, _ := p.Capacity()
	if _, err := p.Create("a", 8<<20); err != nil {
		t.Fatal(err)
	}
	after, _ := p.Capacity()
	if before-after < 8<<20 {
		t.Fatalf("capacity fell by %d, want >= %d", before-after, 8<<20)
	}
	if _, err := p.Create("b", 12<<20); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("full pool: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "pool", "b.img.tmp")); !os.IsNotExist(err) {
		t.Fatal("temporary file left behind")
	}
	p.Delete("a")
	if c, _ := p.Capacity(); c < before-4096 {
		t.Fatalf("capacity not returned: %d < %d", c, before)
	}
}

// TestDirectoryNoPreviousTenantData: a new volume reads as zeros even
// where it takes the name, the leftover temporary file or the blocks of
// a deleted volume that was full of data.
func TestDirectoryNoPreviousTenantData(t *testing.T) {
	dir := t.TempDir()
	p, err := New(Config{Kind: KindDirectory, Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	const size = 4 << 20
	junk := bytes.Repeat([]byte{0xAA}, size)
	path, err := p.Create("v", size)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("v"); err != nil {
		t.Fatal(err)
	}
	// A crash mid-Create left a temporary file full of data.
	if err := os.WriteFile(filepath.Join(dir, "v.img.tmp"), junk, 0o600); err != nil {
		t.Fatal(err)
	}
	path, err = p.Create("v", size)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Expand("v", 2*size); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 2*size {
		t.Fatalf("size %d", len(b))
	}
	if i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 }); i >= 0 {
		t.Fatalf("new volume shows old data at byte %d", i)
	}
}

// TestZeroRangeDevice zeroes part of a real block device (a loop device
// over a file full of data) and of a file, as the LVM wiper does.
func TestZeroRangeDevice(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "losetup")
	img := filepath.Join(t.TempDir(), "disk.img")
	const size = 8 << 20
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xEE}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).Output()
	if err != nil {
		testenv.Skipf(t, "losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	for _, path := range []string{dev, img} {
		method, err := ZeroRange(path, 1<<20, 3<<20)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size)
		_, err = io.ReadFull(f, b)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range b {
			zero := i >= 1<<20 && i < 4<<20
			if (c == 0) != zero {
				t.Fatalf("%s (%s): byte %d is %#x", path, method, i, c)
			}
		}
		t.Logf("%s zeroed by %s", path, method)
	}
}

// TestDiscardOption: only a directory pool can be declared thin.
func TestDiscardOption(t *testing.T) {
	p, err := New(Config{Kind: KindDirectory, Path: t.TempDir(), Discard: true})
	if err != nil || !PassesDiscards(p) {
		t.Fatalf("directory pool with discard: %v, passes discards %v", err, err == nil && PassesDiscards(p))
	}
	if p, err := New(Config{Kind: KindDirectory, Path: t.TempDir()}); err != nil || PassesDiscards(p) {
		t.Fatal("a directory pool passes discards by default")
	}
	if _, err := New(Config{Kind: KindLVM, VolumeGroup: "vg", Discard: true}); err == nil {
		t.Fatal("lvm pool with discard accepted")
	}
}
