package engine

import (
	"errors"
	"fmt"
	"math/rand"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// TestGrowCrashSweep grows a live volume from crashSize to twice that in
// the middle of a seeded workload and crashes the devices at every device
// write from the start of the grow to the end of the workload after it
// (each crash mode in turn). After each crash the superblock must name
// the old size or the new one, the new one whenever Grow had returned;
// the old range must hold what the crash contract allows; the grown range
// must read zeros or what was written to it after the grow (never bytes
// from before it, nor garbage); and the engine must open at the new size
// once allowed to take the grown backing device.
func TestGrowCrashSweep(t *testing.T) {
	seeds := 6
	if stress() {
		seeds = 100
	}
	points, grewBefore, oldAfter := 0, 0, 0
	for seed := int64(0); seed < int64(seeds); seed++ {
		total := growCrashOnce(t, seed, -1, blockdev.CrashDropAll, nil)
		for j := 0; j <= total; j++ {
			mode := crashModes[(int(seed)+j)%len(crashModes)]
			growCrashOnce(t, seed, j, mode, func(grew, oldSize bool) {
				if grew {
					grewBefore++
				}
				if oldSize {
					oldAfter++
				}
			})
			points++
		}
	}
	t.Logf("%d crash points; Grow had returned at %d, the old size came back at %d", points, grewBefore, oldAfter)
	if oldAfter == 0 || grewBefore == 0 {
		t.Fatalf("the sweep never crashed before (%d) or after (%d) the grow took effect", oldAfter, grewBefore)
	}
}

// growCrashOnce runs one workload on seed, crashing at the j-th device
// write after the grow starts (j < 0: no crash), and returns the number
// of device writes from the grow to the end.
func growCrashOnce(t *testing.T, seed int64, j int, mode blockdev.CrashMode, seen func(grew, oldSize bool)) int {
	t.Helper()
	what := fmt.Sprintf("seed %d grow crash at write %d mode %v", seed, j, mode)
	const newSize = 2 * crashSize
	pw := blockdev.NewPower()
	cache, backing := blockdev.NewMem(testCacheSize(testSegments), pw), blockdev.NewMem(crashSize, pw)
	e := openTest(t, cache, backing, crashTunables(seed))
	rng := rand.New(rand.NewSource(seed))
	old, grown := newSectorModel(), newSectorModel()
	var id uint64
	if !crashWorkload(e, old, rng, 30, &id) {
		t.Fatalf("%s: workload before the grow failed: %v", what, e.Err())
	}
	start := pw.Writes()
	if j >= 0 {
		pw.CrashAfterWrites(j)
	}
	growErr := e.Grow(newSize) // the Mem backing grows through blockdev.Grower, as a pool's file does
	if j < 0 && growErr != nil {
		t.Fatalf("%s: grow: %v", what, growErr)
	}
	if growErr == nil {
		if e.Size() != newSize {
			t.Fatalf("%s: size %d after Grow, want %d", what, e.Size(), newSize)
		}
		growWorkload(e, old, grown, rng, 16, &id)
	}
	total := pw.Writes() - start
	if j < 0 {
		e.Close()
		return total
	}
	pw.CrashAfterWrites(0)
	e.Close()
	crng := rand.New(rand.NewSource(seed*7919 + int64(j)))
	c2, b2 := cache.CrashImage(mode, crng), backing.CrashImage(mode, crng)

	two := make([]byte, 2*layout.BlockSize)
	if _, err := c2.ReadAt(two, 0); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if sb, err := layout.DecodeSuperblock(two[i*layout.BlockSize:]); err == nil && sb.BackingSize != crashSize && sb.BackingSize != newSize {
			t.Fatalf("%s: superblock copy %d names a backing size of %d: neither old nor new", what, i, sb.BackingSize)
		}
	}
	sb, err := layout.ChooseSuperblock(two[:layout.BlockSize], two[layout.BlockSize:])
	if err != nil {
		t.Fatalf("%s: superblock after the crash: %v", what, err)
	}
	oldSize := sb.BackingSize == crashSize
	if growErr == nil && oldSize {
		t.Fatalf("%s: Grow returned, yet the crash brought back the old size", what)
	}
	if seen != nil {
		seen(growErr == nil, oldSize)
	}
	opts := Options{Cache: c2, Backing: b2, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()}
	e2, err := Open(opts)
	switch {
	case oldSize && !errors.Is(err, ErrBackingSize):
		t.Fatalf("%s: open at the old size with a grown backing device: %v, want ErrBackingSize", what, err)
	case oldSize:
		opts.AllowBackingGrowth = true // what pkg/volume does: the grow completes at open
		e2, err = Open(opts)
	}
	if err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	defer e2.Close()
	if e2.Size() != newSize {
		t.Fatalf("%s: reopened at %d bytes, want %d", what, e2.Size(), newSize)
	}
	old.check(t, e2, false, what+" (old range)")
	grown.checkAt(t, e2, crashSize, false, what+" (grown range)")
	return total
}

// growWorkload runs ops operations after a grow: writes, FUA writes and
// zeroes in the grown range (modelled by grown, sector numbers counted
// from the old end), writes in the old range, and flushes.
func growWorkload(e *Engine, old, grown *sectorModel, rng *rand.Rand, ops int, nextID *uint64) {
	for i := 0; i < ops; i++ {
		switch op := rng.Intn(10); {
		case op < 6:
			m, base := grown, int64(crashSize)
			if op == 0 {
				m, base = old, 0
			}
			first := rng.Intn(nsect)
			n := 1 + rng.Intn(min(64, nsect-first))
			*nextID++
			id := *nextID
			p := make([]byte, n*512)
			for s := 0; s < n; s++ {
				sectorPattern(id, first+s, p[s*512:])
			}
			fua := rng.Intn(4) == 0
			var err error
			if fua {
				err = e.WriteFUA(p, base+int64(first)*512)
			} else {
				_, err = e.WriteAt(p, base+int64(first)*512)
			}
			m.write(first, n, id, err == nil)
			if err != nil {
				return
			}
			if fua {
				m.durable(first, n)
			}
		case op < 7:
			first := rng.Intn(nsect)
			n := 1 + rng.Intn(min(128, nsect-first))
			err := e.WriteZeroes(crashSize+int64(first)*512, int64(n)*512)
			grown.write(first, n, 0, err == nil)
			if err != nil {
				return
			}
		default:
			if err := e.Flush(); err != nil {
				return
			}
			old.durable(0, nsect)
			grown.durable(0, nsect)
		}
	}
}

// TestGrowLive: a grow on a live engine with I/O around it; the grown
// range reads zeros, requests beyond the old end are refused before and
// served after, a repeated Grow is a no-op, a smaller size and a backing
// device that cannot grow are refused, and a closed engine refuses.
func TestGrowLive(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(testSegments), nil), blockdev.NewMem(crashSize, nil)
	e := openTest(t, cache, backing, nil)
	p := make([]byte, 4096)
	for i := range p {
		p[i] = 0xAB
	}
	if _, err := e.WriteAt(p, crashSize-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := e.WriteAt(p, crashSize); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write past the end before the grow: %v, want ErrOutOfRange", err)
	}
	if err := e.Grow(crashSize + 1000); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("unaligned grow: %v", err)
	}
	done := make(chan error)
	go func() { // I/O in the old range while the volume grows
		for i := 0; i < 200; i++ {
			if _, err := e.WriteAt(p, int64(i%16)*4096); err != nil {
				done <- err
				return
			}
		}
		done <- e.Flush()
	}()
	if err := e.Grow(4 * crashSize); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := e.Grow(4 * crashSize); err != nil {
		t.Fatalf("repeated grow: %v", err)
	}
	if err := e.Grow(2 * crashSize); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("shrink: %v, want ErrOutOfRange", err)
	}
	got := make([]byte, 3*crashSize)
	if _, err := e.ReadAt(got, crashSize); err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		if b != 0 {
			t.Fatalf("grown range byte %d is %#x, want zero", i, b)
		}
	}
	if _, err := e.WriteAt(p, 4*crashSize-4096); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	if st := e.Status(); st.BackingSize != 4*crashSize {
		t.Fatalf("status backing size %d", st.BackingSize)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.Grow(8 * crashSize); !errors.Is(err, ErrClosed) {
		t.Fatalf("grow after close: %v, want ErrClosed", err)
	}
	// Reopen: the size and the data persist, with no growth allowed.
	e2, err := Open(Options{Cache: cache, Backing: backing, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	if e2.Size() != 4*crashSize {
		t.Fatalf("reopened at %d", e2.Size())
	}
	if _, err := e2.ReadAt(got[:4096], 4*crashSize-4096); err != nil || got[0] != 0xAB {
		t.Fatalf("data at the new end: %v %#x", err, got[0])
	}

	// A backing device that cannot grow is refused with ErrCannotGrow.
	e3 := openTest(t, blockdev.NewMem(testCacheSize(testSegments), nil), fixedSize{blockdev.NewMem(crashSize, nil)}, nil)
	defer e3.Close()
	if err := e3.Grow(2 * crashSize); !errors.Is(err, ErrCannotGrow) {
		t.Fatalf("grow on a fixed backing device: %v, want ErrCannotGrow", err)
	}
}

// fixedSize hides a device's Grow.
type fixedSize struct{ blockdev.Device }
