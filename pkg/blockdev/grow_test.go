package blockdev

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestFileGrow: an open file device takes the bytes a pool added under it,
// never more than the file has, and never shrinks.
func TestFileGrow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vol.img")
	if err := CreateSparseFile(path, 1<<20); err != nil {
		t.Fatal(err)
	}
	d, err := OpenFile(path, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	mustWrite(t, d, fill(7, 4096), 1<<20-4096)
	if _, err := d.WriteAt(fill(1, 4096), 1<<20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("write past the end: %v, want EINVAL", err)
	}
	if err := d.Grow(2 << 20); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("grow beyond the file: %v, want EINVAL", err)
	}
	if d.Size() != 1<<20 {
		t.Fatalf("a refused grow changed the size to %d", d.Size())
	}
	if err := os.Truncate(path, 2<<20); err != nil { // the pool grows the file
		t.Fatal(err)
	}
	if err := d.Grow(2 << 20); err != nil {
		t.Fatal(err)
	}
	if d.Size() != 2<<20 {
		t.Fatalf("size %d after grow, want %d", d.Size(), 2<<20)
	}
	if got := mustRead(t, d, 1<<20, 1<<20); !bytes.Equal(got, make([]byte, 1<<20)) {
		t.Fatal("the grown range does not read as zeros")
	}
	mustWrite(t, d, fill(9, 4096), 2<<20-4096)
	if got := mustRead(t, d, 4096, 1<<20-4096); !bytes.Equal(got, fill(7, 4096)) {
		t.Fatal("data before the old end changed")
	}
	if err := d.Grow(1 << 20); err != nil || d.Size() != 2<<20 {
		t.Fatalf("grow to a smaller size: %v, size %d: want a no-op", err, d.Size())
	}
}

// TestMemGrow: the in-memory device grows with zeros, crash images keep
// the size, and the wrappers pass Grow through (Faulty failing it when a
// write fault is armed).
func TestMemGrow(t *testing.T) {
	pw := NewPower()
	m := NewMem(64<<10, pw)
	mustWrite(t, m, fill(3, 512), 64<<10-512)
	f := NewFaulty(m)
	f.FailWritesAfter(0, syscall.EIO)
	if err := f.Grow(128 << 10); !errors.Is(err, syscall.EIO) {
		t.Fatalf("faulty grow: %v, want EIO", err)
	}
	f.Reset()
	var g Grower = NewCounting(f)
	if err := g.Grow(128 << 10); err != nil {
		t.Fatal(err)
	}
	if m.Size() != 128<<10 {
		t.Fatalf("size %d", m.Size())
	}
	if err := m.Grow(64 << 10); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("shrink: %v, want EINVAL", err)
	}
	if got := mustRead(t, m, 64<<10, 64<<10); !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Fatal("grown range not zero")
	}
	img := m.CrashImage(CrashDropAll, nil)
	if img.Size() != 128<<10 {
		t.Fatalf("crash image size %d", img.Size())
	}
}
