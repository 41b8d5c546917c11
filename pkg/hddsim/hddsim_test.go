package hddsim

import (
	"bytes"
	"errors"
	"math/rand"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Calibration is asserted in virtual time, which is deterministic; wall
// time is never asserted.

// nullDev stores nothing: calibration runs move gigabytes of simulated
// data, which only the clock needs to see.
type nullDev struct{ size int64 }

func (n nullDev) ReadAt(p []byte, off int64) (int, error)  { return len(p), nil }
func (n nullDev) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (n nullDev) Flush() error                             { return nil }
func (n nullDev) Zero(off, length int64) error             { return nil }
func (n nullDev) Size() int64                              { return n.size }
func (n nullDev) Close() error                             { return nil }

func randomIOPS(t *testing.T, size int64, write bool) float64 {
	t.Helper()
	d := New(nullDev{size}, DefaultModel(), Virtual)
	rng := rand.New(rand.NewSource(1))
	buf := make([]byte, 4096)
	const n = 3000
	for range n {
		off := rng.Int63n(size/4096) * 4096
		var err error
		if write {
			_, err = d.WriteAt(buf, off)
		} else {
			_, err = d.ReadAt(buf, off)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if d.Busy() != d.Elapsed() {
		t.Fatalf("virtual clock: busy %v != elapsed %v", d.Busy(), d.Elapsed())
	}
	return n / d.Elapsed().Seconds()
}

func TestCalibrationRandom4K(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  int64
		write bool
	}{
		{"1TiB read", 1 << 40, false},
		{"1TiB write", 1 << 40, true},
		{"4GiB write", 4 << 30, true},
		{"64MiB write", 64 << 20, true},
	} {
		iops := randomIOPS(t, tc.size, tc.write)
		t.Logf("%s: random 4 KiB: %.1f IOPS", tc.name, iops)
		if iops < 70 || iops > 110 {
			t.Errorf("%s: random 4 KiB IOPS %.1f outside [70, 110]", tc.name, iops)
		}
	}
}

func TestCalibrationSequential(t *testing.T) {
	const size = 1 << 30
	for _, bs := range []int{4096, 128 << 10, 1 << 20} {
		d := New(nullDev{size}, DefaultModel(), Virtual)
		buf := make([]byte, bs)
		const total = 256 << 20
		start := int64(5 << 20) // not at the head's parking place: one seek first
		for off := start; off < start+total; off += int64(bs) {
			if _, err := d.WriteAt(buf, off); err != nil {
				t.Fatal(err)
			}
		}
		mbps := total / d.Elapsed().Seconds() / 1e6
		t.Logf("sequential %d KiB writes: %.1f MB/s", bs>>10, mbps)
		if mbps < 150 || mbps > 200 {
			t.Errorf("sequential %d KiB: %.1f MB/s outside [150, 200]", bs>>10, mbps)
		}
		if s := d.Stats(); s.Sequential != s.Requests-1 {
			t.Errorf("%d of %d requests counted sequential", s.Sequential, s.Requests)
		}
	}
}

// TestSortedCheaper: the point of a write-back cache's sorted writeback.
func TestSortedCheaper(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int64
		blocks   int
		minRatio float64
	}{
		// Dense: many dirty blocks per track, sorted order nearly streams.
		{"2048 blocks in 64MiB", 64 << 20, 2048, 10},
		// Sparse: blocks a third of a track apart; still well ahead.
		{"2048 blocks in 1GiB", 1 << 30, 2048, 2.5},
		// A dm-writeboost-sized batch of 128 in a small device.
		{"128 blocks in 16MiB", 16 << 20, 128, 3},
	} {
		rng := rand.New(rand.NewSource(2))
		seen := map[int64]bool{}
		var offs []int64
		for len(offs) < tc.blocks {
			off := rng.Int63n(tc.size/4096) * 4096
			if !seen[off] {
				seen[off] = true
				offs = append(offs, off)
			}
		}
		cost := func(order []int64) time.Duration {
			d := New(blockdev.NewMem(tc.size, nil), DefaultModel(), Virtual)
			buf := make([]byte, 4096)
			for _, off := range order {
				if _, err := d.WriteAt(buf, off); err != nil {
					t.Fatal(err)
				}
			}
			return d.Elapsed()
		}
		arrival := cost(offs)
		sorted := slices.Clone(offs)
		slices.Sort(sorted)
		ordered := cost(sorted)
		ratio := float64(arrival) / float64(ordered)
		t.Logf("%s: arrival order %v, sorted %v: sorted is %.1fx cheaper", tc.name, arrival, ordered, ratio)
		if ratio < tc.minRatio {
			t.Errorf("%s: sorted only %.2fx cheaper than arrival order, want >= %.1fx", tc.name, ratio, tc.minRatio)
		}
	}
}

func TestRotationGeometry(t *testing.T) {
	m := DefaultModel()
	d := New(blockdev.NewMem(1<<30, nil), m, Virtual)
	buf := make([]byte, 4096)
	// Continuation: transfer only.
	d.WriteAt(buf, 0)
	before := d.Elapsed()
	d.WriteAt(buf, 4096)
	if got, want := d.Elapsed()-before, time.Duration(4096/m.TransferRate*1e9); got != want {
		t.Fatalf("continuation cost %v, want transfer only %v", got, want)
	}
	// Skipping ahead on the same track: no seek, wait for the gap to
	// pass under the head.
	before = d.Elapsed()
	d.WriteAt(buf, 8192+64<<10)
	gap := time.Duration(float64(64<<10) / m.TransferRate * 1e9)
	if got := d.Elapsed() - before; got < gap || got > gap+time.Duration(4096/m.TransferRate*1e9)+time.Microsecond {
		t.Fatalf("same-track skip cost %v, want about %v", got, gap)
	}
	// Going back on the same track: nearly a full rotation.
	before = d.Elapsed()
	d.WriteAt(buf, 0)
	if got := d.Elapsed() - before; got < m.Period()*9/10 || got > m.Period()+time.Millisecond {
		t.Fatalf("same-track step back cost %v, want about a rotation %v", got, m.Period())
	}
	if s := d.Stats(); s.Seeks != 0 {
		t.Fatalf("%d seeks on one track", s.Seeks)
	}
	// Full stroke: at least the full-stroke seek.
	before = d.Elapsed()
	d.WriteAt(buf, 1<<30-4096)
	if got := d.Elapsed() - before; got < m.FullSeek-time.Microsecond || got > m.FullSeek+m.Period()+time.Millisecond {
		t.Fatalf("full stroke cost %v, want %v + rotation", got, m.FullSeek)
	}
}

func TestDeterministic(t *testing.T) {
	run := func() (time.Duration, Stats) {
		d := New(blockdev.NewMem(1<<30, nil), DefaultModel(), Virtual)
		rng := rand.New(rand.NewSource(3))
		buf := make([]byte, 8192)
		for range 500 {
			d.WriteAt(buf, rng.Int63n(1<<17)*8192)
		}
		return d.Elapsed(), d.Stats()
	}
	e1, s1 := run()
	e2, s2 := run()
	if e1 != e2 || s1 != s2 {
		t.Fatalf("two identical runs differ: %v %+v vs %v %+v", e1, s1, e2, s2)
	}
}

func TestFlushZeroAndData(t *testing.T) {
	m := DefaultModel()
	mem := blockdev.NewMem(16<<20, nil)
	d := New(mem, m, Virtual)
	data := bytes.Repeat([]byte{9}, 8192)
	if _, err := d.WriteAt(data, 4096); err != nil {
		t.Fatal(err)
	}
	if got := make([]byte, 8192); func() bool { d.ReadAt(got, 4096); return !bytes.Equal(got, data) }() {
		t.Fatal("data not stored")
	}
	before := d.Elapsed()
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := d.Elapsed() - before; got != m.FlushTime {
		t.Fatalf("flush cost %v, want %v", got, m.FlushTime)
	}
	if mem.Unflushed() != 0 {
		t.Fatal("flush did not reach the underlying device")
	}
	// Mem deallocates: Zero is a metadata op, whatever its length.
	before = d.Elapsed()
	if err := d.Zero(0, 16<<20); err != nil {
		t.Fatal(err)
	}
	if got := d.Elapsed() - before; got != m.DeallocateTime {
		t.Fatalf("deallocating zero cost %v, want %v", got, m.DeallocateTime)
	}
	// Without deallocation, zeroing 8 MiB costs at least its transfer.
	nd := New(noDealloc{mem}, m, Virtual)
	if err := nd.Zero(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	if got, min := nd.Elapsed(), time.Duration(float64(8<<20)/m.TransferRate*1e9); got < min {
		t.Fatalf("writing zeros cost %v, want >= %v", got, min)
	}
	if got := make([]byte, 8192); func() bool { d.ReadAt(got, 4096); return !bytes.Equal(got, make([]byte, 8192)) }() {
		t.Fatal("zero did not reach the underlying device")
	}
}

type noDealloc struct{ blockdev.Device }

func TestErrorsPassThroughAndCostNothing(t *testing.T) {
	f := blockdev.NewFaulty(blockdev.NewMem(1<<20, nil))
	d := New(f, DefaultModel(), Virtual)
	f.FailWritesAfter(0, syscall.EIO)
	f.FailFlushesAfter(0, syscall.EIO)
	f.FailReadsAfter(0, syscall.EIO)
	if _, err := d.WriteAt(make([]byte, 512), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write: %v", err)
	}
	if _, err := d.ReadAt(make([]byte, 512), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read: %v", err)
	}
	if err := d.Zero(0, 512); !errors.Is(err, syscall.EIO) {
		t.Fatalf("zero: %v", err)
	}
	if err := d.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush: %v", err)
	}
	if d.Elapsed() != 0 {
		t.Fatalf("failed requests cost %v", d.Elapsed())
	}
}

func TestResetAndDefaults(t *testing.T) {
	d := New(blockdev.NewMem(1<<20, nil), Model{RPM: -1, FullSeek: -5}, Virtual)
	if d.Model() != DefaultModel() {
		t.Fatalf("invalid fields not defaulted: %+v", d.Model())
	}
	d.WriteAt(make([]byte, 4096), 512<<10)
	if d.Elapsed() == 0 || d.Stats().Requests != 1 {
		t.Fatal("write not charged")
	}
	d.Reset()
	if d.Elapsed() != 0 || d.Busy() != 0 || d.Stats() != (Stats{}) {
		t.Fatal("Reset left state")
	}
	if DefaultModel().TrackBytes() != 1_500_000 {
		t.Fatalf("track bytes %d", DefaultModel().TrackBytes())
	}
}

// TestRealSleep checks only that RealSleep mode sleeps at least the
// service time (a lower bound is safe on a loaded machine) and keeps the
// same busy-time accounting.
func TestRealSleep(t *testing.T) {
	d := New(blockdev.NewMem(1<<30, nil), DefaultModel(), RealSleep)
	start := time.Now()
	buf := make([]byte, 4096)
	for i := range 5 {
		d.WriteAt(buf, int64(i)*200<<20)
	}
	if wall, busy := time.Since(start), d.Busy(); wall < busy || busy < 5*DefaultModel().MinSeek {
		t.Fatalf("wall %v busy %v", wall, busy)
	}
}

func TestConcurrentUse(t *testing.T) {
	d := New(blockdev.NewMem(64<<20, nil), DefaultModel(), Virtual)
	done := make(chan struct{})
	for g := range 4 {
		go func() {
			defer func() { done <- struct{}{} }()
			buf := make([]byte, 4096)
			for i := range 100 {
				d.WriteAt(buf, int64(g*100+i)*4096*7)
				d.ReadAt(buf, int64(i)*4096)
			}
			d.Flush()
		}()
	}
	for range 4 {
		<-done
	}
	if s := d.Stats(); s.Requests != 800 || s.Flushes != 4 {
		t.Fatalf("stats %+v", s)
	}
}
