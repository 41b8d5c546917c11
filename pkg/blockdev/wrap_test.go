package blockdev

import (
	"errors"
	"syscall"
	"testing"
)

func TestFaulty(t *testing.T) {
	m := NewMem(1<<20, nil)
	f := NewFaulty(m)
	boom := errors.New("boom")
	f.FailWritesAfter(2, boom)
	mustWrite(t, f, fill(1, 512), 0)
	if err := f.Zero(512, 512); err != nil {
		t.Fatal(err)
	}
	for range 2 { // sticky
		if _, err := f.WriteAt(fill(2, 512), 0); !errors.Is(err, boom) {
			t.Fatalf("third write: %v", err)
		}
	}
	if err := f.Zero(0, 512); !errors.Is(err, boom) {
		t.Fatalf("zero after fault: %v", err)
	}
	if got := mustRead(t, m, 1, 0); got[0] != 1 {
		t.Fatal("a failed write reached the device")
	}
	f.FailReadsAfter(0, syscall.EIO)
	if _, err := f.ReadAt(make([]byte, 512), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read: %v", err)
	}
	f.FailFlushesAfter(1, boom)
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Flush(); !errors.Is(err, boom) {
		t.Fatalf("flush: %v", err)
	}
	f.Reset()
	mustWrite(t, f, fill(3, 512), 0)
	if got := mustRead(t, f, 1, 0); got[0] != 3 {
		t.Fatal("after Reset the device does not work")
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if f.Size() != m.Size() || !ZeroDeallocates(f) {
		t.Fatal("Faulty does not pass Size/ZeroDeallocates through")
	}
}

func TestCounting(t *testing.T) {
	m := NewMem(1<<20, nil)
	c := NewCounting(m)
	mustWrite(t, c, make([]byte, 4096), 0)
	mustWrite(t, c, make([]byte, 512), 8192)
	mustRead(t, c, 1024, 0)
	c.Zero(0, 8192)
	c.Flush()
	before := c.Snapshot()
	want := Counts{ReadOps: 1, ReadBytes: 1024, WriteOps: 2, WriteBytes: 4608, Flushes: 1, Zeroes: 1, ZeroBytes: 8192}
	if before != want {
		t.Fatalf("counts %+v, want %+v", before, want)
	}
	if _, err := c.ReadAt(make([]byte, 512), 1<<20); err == nil {
		t.Fatal("read past end succeeded")
	}
	mustRead(t, c, 512, 0)
	d := c.Snapshot().Sub(before)
	if d != (Counts{ReadOps: 2, ReadBytes: 512, ReadErrors: 1}) {
		t.Fatalf("delta %+v", d)
	}
}
