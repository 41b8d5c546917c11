package blockdev

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"sync"
	"syscall"
	"testing"
)

func fill(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

func mustWrite(t *testing.T, d Device, p []byte, off int64) {
	t.Helper()
	if n, err := d.WriteAt(p, off); err != nil || n != len(p) {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

func mustRead(t *testing.T, d Device, n int, off int64) []byte {
	t.Helper()
	p := make([]byte, n)
	if got, err := d.ReadAt(p, off); err != nil || got != n {
		t.Fatalf("ReadAt(%d bytes, %d) = %d, %v", n, off, got, err)
	}
	return p
}

func TestMemReadWriteZero(t *testing.T) {
	m := NewMem(64<<20, nil)
	if m.Size() != 64<<20 {
		t.Fatalf("size %d", m.Size())
	}
	if got := mustRead(t, m, 8192, 1<<20); !bytes.Equal(got, make([]byte, 8192)) {
		t.Fatal("fresh device is not zero")
	}
	// A write straddling pages, at a sector (not page) offset.
	data := make([]byte, 3*4096)
	rand.New(rand.NewSource(1)).Read(data)
	mustWrite(t, m, data, 4096+512)
	if got := mustRead(t, m, len(data), 4096+512); !bytes.Equal(got, data) {
		t.Fatal("read back differs")
	}
	// Unaligned read is allowed.
	if got := mustRead(t, m, 10, 4096+512+3); !bytes.Equal(got, data[3:13]) {
		t.Fatal("unaligned read differs")
	}
	if err := m.Zero(4096+1024, 4096); err != nil {
		t.Fatal(err)
	}
	want := append([]byte(nil), data...)
	clear(want[512 : 512+4096])
	if got := mustRead(t, m, len(data), 4096+512); !bytes.Equal(got, want) {
		t.Fatal("zeroed range does not read back zeros")
	}
}

func TestMemRejectsBadRequests(t *testing.T) {
	m := NewMem(1<<20, nil)
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"unaligned write", func() error { _, err := m.WriteAt(make([]byte, 100), 0); return err }()},
		{"unaligned offset", func() error { _, err := m.WriteAt(make([]byte, 512), 3); return err }()},
		{"write past end", func() error { _, err := m.WriteAt(make([]byte, 1024), 1<<20-512); return err }()},
		{"negative read", func() error { _, err := m.ReadAt(make([]byte, 1), -1); return err }()},
		{"read past end", func() error { _, err := m.ReadAt(make([]byte, 2), 1<<20-1); return err }()},
		{"zero past end", m.Zero(1<<20, 512)},
		{"zero negative length", m.Zero(0, -512)},
	} {
		if !errors.Is(tc.err, syscall.EINVAL) {
			t.Errorf("%s: got %v, want EINVAL", tc.name, tc.err)
		}
	}
	m.Close()
	if _, err := m.ReadAt(make([]byte, 512), 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("read after close: %v", err)
	}
	if _, err := m.WriteAt(make([]byte, 512), 0); !errors.Is(err, os.ErrClosed) {
		t.Errorf("write after close: %v", err)
	}
}

// crashSetup writes a flushed base, then unflushed overwrites of
// multi-sector regions, and returns the device with the expected
// contents of each.
func crashSetup(t *testing.T) (m *Mem, flushed, all []byte) {
	const size = 64 << 10
	m = NewMem(size, nil)
	flushed = make([]byte, size)
	for i := range 8 {
		p := fill(byte(0x10+i), 8192)
		mustWrite(t, m, p, int64(i)*8192)
		copy(flushed[i*8192:], p)
	}
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	all = append([]byte(nil), flushed...)
	for i := range 8 {
		// Each sector of an unflushed write has its own pattern, so a
		// torn image shows which sectors made it.
		p := make([]byte, 8192)
		for s := range 16 {
			copy(p[s*512:], fill(byte(0x80+i*16+s), 512))
		}
		mustWrite(t, m, p, int64(i)*8192)
		copy(all[i*8192:], p)
	}
	if err := m.Zero(7*8192, 8192); err != nil {
		t.Fatal(err)
	}
	clear(all[7*8192:])
	if got := mustRead(t, m, size, 0); !bytes.Equal(got, all) {
		t.Fatal("live device does not read the latest writes")
	}
	return m, flushed, all
}

func TestMemCrashDropAllAndKeepAll(t *testing.T) {
	m, flushed, all := crashSetup(t)
	if got := mustRead(t, m.CrashImage(CrashDropAll, nil), len(flushed), 0); !bytes.Equal(got, flushed) {
		t.Fatal("DropAll image is not exactly the flushed data")
	}
	if got := mustRead(t, m.CrashImage(CrashKeepAll, nil), len(all), 0); !bytes.Equal(got, all) {
		t.Fatal("KeepAll image is not exactly the written data")
	}
	// After a flush, every mode keeps everything.
	if err := m.Flush(); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(2))
	for _, mode := range []CrashMode{CrashDropAll, CrashKeepSubset, CrashTear, CrashKeepAll} {
		if got := mustRead(t, m.CrashImage(mode, rng), len(all), 0); !bytes.Equal(got, all) {
			t.Fatalf("%v after flush lost flushed data", mode)
		}
	}
}

// sectorStates classifies each 512-byte sector of the first 7 regions of
// an image of crashSetup (the 8th saw two writes) as old (flushed), new
// (last write), or invalid.
func sectorStates(t *testing.T, img, flushed, all []byte) (olds, news int) {
	t.Helper()
	for s := 0; s < 7*16; s++ {
		got := img[s*512 : (s+1)*512]
		switch {
		case bytes.Equal(got, all[s*512:(s+1)*512]):
			news++
		case bytes.Equal(got, flushed[s*512:(s+1)*512]):
			olds++
		default:
			t.Fatalf("sector %d holds neither its old nor its new contents (torn inside a sector?)", s)
		}
	}
	return olds, news
}

func TestMemCrashKeepSubset(t *testing.T) {
	m, flushed, all := crashSetup(t)
	rng := rand.New(rand.NewSource(3))
	sawMixed := false
	for range 50 {
		img := mustRead(t, m.CrashImage(CrashKeepSubset, rng), len(all), 0)
		sectorStates(t, img, flushed, all)
		// Whole writes only: each 8 KiB region is all old or all new.
		kept := 0
		for i := range 7 {
			r := img[i*8192 : (i+1)*8192]
			switch {
			case bytes.Equal(r, all[i*8192:(i+1)*8192]):
				kept++
			case bytes.Equal(r, flushed[i*8192:(i+1)*8192]):
			default:
				t.Fatalf("region %d partially applied under KeepSubset", i)
			}
		}
		if kept > 0 && kept < 7 {
			sawMixed = true
		}
	}
	if !sawMixed {
		t.Fatal("KeepSubset never produced a mix of kept and dropped writes")
	}
}

func TestMemCrashTear(t *testing.T) {
	m, flushed, all := crashSetup(t)
	rng := rand.New(rand.NewSource(4))
	tornRegions := 0
	for range 200 {
		img := mustRead(t, m.CrashImage(CrashTear, rng), len(all), 0)
		sectorStates(t, img, flushed, all) // fails on a torn sector
		for i := range 7 {                 // region 7 was zeroed; check the data regions
			r := img[i*8192 : (i+1)*8192]
			if !bytes.Equal(r, all[i*8192:(i+1)*8192]) && !bytes.Equal(r, flushed[i*8192:(i+1)*8192]) {
				tornRegions++
			}
		}
	}
	if tornRegions == 0 {
		t.Fatal("Tear never tore a multi-sector write")
	}
}

// A later unflushed write over an earlier one: an image may hold the
// earlier, the later, or the flushed version, but kept writes apply in
// order, so with both kept the later wins.
func TestMemCrashOrder(t *testing.T) {
	m := NewMem(4096, nil)
	mustWrite(t, m, fill(1, 512), 0)
	m.Flush()
	mustWrite(t, m, fill(2, 512), 0)
	mustWrite(t, m, fill(3, 512), 0)
	seen := map[byte]bool{}
	rng := rand.New(rand.NewSource(5))
	for range 100 {
		seen[mustRead(t, m.CrashImage(CrashKeepSubset, rng), 1, 0)[0]] = true
	}
	if !seen[1] || !seen[2] || !seen[3] || len(seen) != 3 {
		t.Fatalf("images held %v, want exactly {1,2,3}", seen)
	}
}

func TestMemCrashImagesIndependent(t *testing.T) {
	m, _, all := crashSetup(t)
	a := m.CrashImage(CrashKeepAll, nil)
	b := a.CrashImage(CrashKeepAll, nil)
	mustWrite(t, a, fill(0xEE, 4096), 0)
	mustWrite(t, m, fill(0xDD, 4096), 4096)
	if err := m.Zero(8192, 4096); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, b, len(all), 0); !bytes.Equal(got, all) {
		t.Fatal("image changed when its source or sibling was written")
	}
	if got := mustRead(t, a, len(all)-4096, 4096); !bytes.Equal(got, all[4096:]) {
		t.Fatal("image changed when the original was written")
	}
	if got := mustRead(t, m, 4096, 0); !bytes.Equal(got, all[:4096]) {
		t.Fatal("original changed when an image was written")
	}
	// An image starts fully durable.
	if got := mustRead(t, a.CrashImage(CrashDropAll, nil), 4096, 4096); !bytes.Equal(got, all[4096:8192]) {
		t.Fatal("an image's own contents are not durable")
	}
}

func TestPowerCrashAcrossDevices(t *testing.T) {
	pw := NewPower()
	a, b := NewMem(1<<20, pw), NewMem(1<<20, pw)
	mustWrite(t, a, fill(1, 512), 0)
	mustWrite(t, b, fill(1, 512), 0)
	if pw.Writes() != 2 || pw.Crashed() {
		t.Fatalf("writes %d crashed %v", pw.Writes(), pw.Crashed())
	}
	pw.CrashAfterWrites(2) // writes #2 and #3 succeed, #4 fails
	mustWrite(t, a, fill(2, 512), 512)
	if err := b.Zero(0, 512); err != nil {
		t.Fatal(err)
	}
	if err := a.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.WriteAt(fill(3, 512), 512); !errors.Is(err, ErrPowerLost) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("write at the crash point: %v", err)
	}
	if !pw.Crashed() {
		t.Fatal("not crashed")
	}
	if _, err := a.WriteAt(fill(4, 512), 1024); !errors.Is(err, ErrPowerLost) {
		t.Fatalf("write after crash: %v", err)
	}
	if err := a.Zero(0, 512); !errors.Is(err, ErrPowerLost) {
		t.Fatalf("zero after crash: %v", err)
	}
	if err := b.Flush(); !errors.Is(err, ErrPowerLost) {
		t.Fatalf("flush after crash: %v", err)
	}
	pw.CrashAfterWrites(5) // cannot restore power
	if _, err := a.WriteAt(fill(4, 512), 1024); !errors.Is(err, ErrPowerLost) {
		t.Fatalf("write after re-arm: %v", err)
	}
	// Reads still work and see the writes before the crash only.
	if got := mustRead(t, a, 1536, 0); !bytes.Equal(got, append(append(fill(1, 512), fill(2, 512)...), make([]byte, 512)...)) {
		t.Fatal("device a holds a write from after the crash")
	}
	if got := mustRead(t, b, 1024, 0); !bytes.Equal(got, make([]byte, 1024)) {
		t.Fatal("device b holds a write from after the crash")
	}
	// b's zero was never flushed; a's writes were.
	if got := mustRead(t, b.CrashImage(CrashDropAll, nil), 512, 0); !bytes.Equal(got, make([]byte, 512)) {
		t.Fatal("b's image holds its never-flushed first write")
	}
	if got := mustRead(t, a.CrashImage(CrashDropAll, nil), 1024, 0); !bytes.Equal(got, append(fill(1, 512), fill(2, 512)...)) {
		t.Fatal("a's image lost flushed writes")
	}
	if a.CrashImage(CrashDropAll, nil).Unflushed() != 0 {
		t.Fatal("image has pending writes")
	}
	// Images are on no power: they work.
	mustWrite(t, a.CrashImage(CrashDropAll, nil), fill(9, 512), 0)

	pw2 := NewPower()
	c := NewMem(4096, pw2)
	pw2.CrashAfterWrites(0)
	if _, err := c.WriteAt(fill(1, 512), 0); !errors.Is(err, ErrPowerLost) {
		t.Fatalf("k=0 did not fail the very next write: %v", err)
	}
}

func TestMemConcurrent(t *testing.T) {
	pw := NewPower()
	m := NewMem(1<<20, pw)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := fill(byte(g+1), 4096)
			q := make([]byte, 4096)
			for i := range 200 {
				off := int64((g*200+i)%256) * 4096
				m.WriteAt(p, off)
				m.ReadAt(q, off)
				if i%17 == 0 {
					m.Flush()
					m.CrashImage(CrashTear, rand.New(rand.NewSource(int64(i))))
				}
				if i%31 == 0 {
					m.Zero(off, 4096)
				}
			}
		}()
	}
	wg.Wait()
	if pw.Writes() != 4*200+4*7 {
		t.Fatalf("writes counted %d", pw.Writes())
	}
}

// Cloning a large sparse device is cheap: the image shares pages.
func BenchmarkMemCrashImage(b *testing.B) {
	m := NewMem(64<<20, nil)
	p := make([]byte, 4096)
	for i := range 1024 {
		m.WriteAt(p, int64(i)*64<<10)
	}
	m.Flush()
	for i := range 64 {
		m.WriteAt(p, int64(i)*4096)
	}
	rng := rand.New(rand.NewSource(1))
	b.ResetTimer()
	for range b.N {
		m.CrashImage(CrashTear, rng)
	}
}

// TestMemAgainstReference drives random writes, zeroes and flushes and
// compares the device and its crash images with a flat reference: live
// reads see the latest data; DropAll gives exactly the flushed state;
// KeepAll exactly the latest; KeepSubset and Tear give, per sector, the
// flushed contents or one of the versions written since.
func TestMemAgainstReference(t *testing.T) {
	const size = 256 << 10
	const sectors = size / SectorSize
	rng := rand.New(rand.NewSource(9))
	m := NewMem(size, nil)
	cur := make([]byte, size)
	durable := make([]byte, size)
	since := make([]map[string]bool, sectors) // versions written since the last flush
	for step := range 400 {
		off := rng.Int63n(sectors) * SectorSize
		n := min(int64(1+rng.Intn(40))*SectorSize, size-off)
		switch r := rng.Intn(10); {
		case r < 6:
			p := make([]byte, n)
			rng.Read(p)
			mustWrite(t, m, p, off)
			copy(cur[off:], p)
		case r < 8:
			if err := m.Zero(off, n); err != nil {
				t.Fatal(err)
			}
			clear(cur[off : off+n])
		default:
			if err := m.Flush(); err != nil {
				t.Fatal(err)
			}
			copy(durable, cur)
			clear(since)
		}
		for s := off / SectorSize; s < (off+n)/SectorSize; s++ {
			if since[s] == nil {
				since[s] = map[string]bool{}
			}
			since[s][string(cur[s*SectorSize:(s+1)*SectorSize])] = true
		}
		if step%10 != 0 {
			continue
		}
		if got := mustRead(t, m, size, 0); !bytes.Equal(got, cur) {
			t.Fatalf("step %d: live contents differ", step)
		}
		if got := mustRead(t, m.CrashImage(CrashDropAll, rng), size, 0); !bytes.Equal(got, durable) {
			t.Fatalf("step %d: DropAll differs from the flushed state", step)
		}
		if got := mustRead(t, m.CrashImage(CrashKeepAll, rng), size, 0); !bytes.Equal(got, cur) {
			t.Fatalf("step %d: KeepAll differs from the latest state", step)
		}
		for _, mode := range []CrashMode{CrashKeepSubset, CrashTear} {
			img := mustRead(t, m.CrashImage(mode, rng), size, 0)
			for s := range sectors {
				sec := img[s*SectorSize : (s+1)*SectorSize]
				if !bytes.Equal(sec, durable[s*SectorSize:(s+1)*SectorSize]) && !since[s][string(sec)] {
					t.Fatalf("step %d %v: sector %d holds data never written to it since the flush", step, mode, s)
				}
			}
		}
	}
}
