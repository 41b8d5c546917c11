package engine

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"sync/atomic"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// Small geometries make the ring wrap, writeback run and slots get reused
// within a few operations.
const (
	testSegSize  = 32 << 10 // 6 data blocks a segment
	testSegments = 8
)

func testCacheSize(segs int) int64 { return layout.RingOffset + int64(segs)*testSegSize }

// halt stops an engine's goroutines without Close: no flush and no clean
// checkpoint, as a power cut or a kill of the process would leave it (RAM
// buffers stay where they are).
func halt(e *Engine) {
	e.mu.Lock()
	e.mu.stop, e.mu.closed = true, true
	e.cond.Broadcast()
	e.mu.Unlock()
	close(e.stopCh)
	e.wg.Wait()
}

func stress() bool { return os.Getenv("WRITEBOOST_STRESS") == "1" }

func openTest(t testing.TB, cache, backing blockdev.Device, mut func(*Options)) *Engine {
	t.Helper()
	o := Options{Cache: cache, Backing: backing, Format: true, SegmentSize: testSegSize, RAMBuffers: 2}
	o.Tunables = DefaultTunables()
	if mut != nil {
		mut(&o)
	}
	e, err := Open(o)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return e
}

// TestReferenceModel runs long seeded sequences of random writes (512 B to
// 1 MiB), reads, flushes, FUA writes, discards, tunable changes, drains and
// close/reopen cycles, comparing every read with a plain byte slice.
func TestReferenceModel(t *testing.T) {
	seeds := 12
	ops := 400
	if stress() {
		seeds, ops = 200, 3000
	}
	var cleaned atomic.Int32
	t.Run("seeds", func(t *testing.T) {
		for seed := 0; seed < seeds; seed++ {
			t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
				t.Parallel()
				if runModel(t, int64(seed), ops) > 0 {
					cleaned.Add(1)
				}
			})
		}
	})
	// The model must cover cleaning (clean.go), not only allow it.
	t.Logf("cleaning ran in %d of %d seeds", cleaned.Load(), seeds)
	if int(cleaned.Load()) < seeds/4 {
		t.Errorf("cleaning ran in only %d of %d seeds", cleaned.Load(), seeds)
	}
}

// runModel returns how many segments the cleaner passed.
func runModel(t *testing.T, seed int64, ops int) (cleanedSegs uint64) {
	rng := rand.New(rand.NewSource(seed))
	const size = 4 << 20
	backing := blockdev.NewMem(size, nil)
	cache := blockdev.NewMem(testCacheSize(testSegments+rng.Intn(8)), nil)
	model := make([]byte, size)
	// unknown[s]: sector s was trimmed and not written since, so any
	// content is right (TRIM leaves it unspecified).
	unknown := make([]bool, size/512)
	known := func(off int64, n int, k bool) {
		for s := off / 512; s < (off+int64(n))/512; s++ {
			unknown[s] = !k
		}
	}
	// same compares p, read at off, with the model where it is known.
	same := func(p []byte, off int64) int {
		for s := int64(0); s < int64(len(p))/512; s++ {
			if !unknown[off/512+s] && !bytes.Equal(p[s*512:(s+1)*512], model[off+s*512:off+(s+1)*512]) {
				return int(s*512) + firstDiff(p[s*512:], model[off+s*512:])
			}
		}
		return -1
	}
	mut := func(o *Options) {
		o.Tunables.ReadCacheThreshold = []int{0, 0, 4, 127}[seed%4]
		o.Tunables.WritebackThreshold = []int{0, 70, 100}[seed%3]
		o.Tunables.NrMaxBatchedWriteback = 1 + int(seed%4)
		o.RAMBuffers = 1 + int(seed%3)
		o.Tunables.CleanThreshold = []int{50, 90, 0}[(seed/4)%3]
	}
	e := openTest(t, cache, backing, mut)
	defer func() { e.Close() }()
	randRange := func(maxLen int) (int64, int) {
		n := (1 + rng.Intn(maxLen/512)) * 512
		if rng.Intn(4) == 0 {
			n = (1 + rng.Intn(8)) * 512 // many small ones
		}
		off := int64(rng.Intn((size-n)/512+1)) * 512
		return off, n
	}
	for i := 0; i < ops; i++ {
		switch op := rng.Intn(100); {
		case op < 45:
			off, n := randRange(1 << 20)
			p := make([]byte, n)
			rng.Read(p)
			var err error
			if rng.Intn(10) == 0 {
				err = e.WriteFUA(p, off)
			} else {
				_, err = e.WriteAt(p, off)
			}
			if err != nil {
				t.Fatalf("op %d write %d@%d: %v", i, n, off, err)
			}
			copy(model[off:], p)
			known(off, n, true)
		case op < 80:
			off, n := randRange(256 << 10)
			p := make([]byte, n)
			if _, err := e.ReadAt(p, off); err != nil {
				t.Fatalf("op %d read: %v", i, err)
			}
			if d := same(p, off); d >= 0 {
				t.Fatalf("op %d: read %d@%d differs from the model at byte %d", i, n, off, d)
			}
		case op < 85:
			if err := e.Flush(); err != nil {
				t.Fatalf("op %d flush: %v", i, err)
			}
		case op < 90:
			off, n := randRange(512 << 10)
			if rng.Intn(2) == 0 {
				if err := e.Trim(off, int64(n)); err != nil {
					t.Fatalf("op %d trim: %v", i, err)
				}
				// Whole blocks only; the edges keep their data.
				lo := (off + blockSize - 1) / blockSize * blockSize
				if hi := (off + int64(n)) / blockSize * blockSize; lo < hi {
					known(lo, int(hi-lo), false)
				}
			} else {
				if err := e.WriteZeroes(off, int64(n)); err != nil {
					t.Fatalf("op %d write zeroes: %v", i, err)
				}
				clear(model[off : off+int64(n)])
				known(off, n, true)
			}
		case op < 93:
			cleanedSegs += e.Status().Cleaning.CleanedSegments
			if err := e.Close(); err != nil {
				t.Fatalf("op %d close: %v", i, err)
			}
			e = openTest(t, cache, backing, func(o *Options) { mut(o); o.Format = false })
		case op < 95:
			if err := e.Drain(context.Background(), nil); err != nil {
				t.Fatalf("op %d drain: %v", i, err)
			}
			if d := e.Status().NrDirtyCacheBlocks; d != 0 {
				t.Fatalf("op %d: %d dirty blocks after drain", i, d)
			}
		case op < 97:
			if err := e.SetTunable("read_cache_threshold", fmt.Sprint(rng.Intn(128))); err != nil {
				t.Fatal(err)
			}
		case op < 99:
			if err := e.SetTunable("writeback_threshold", fmt.Sprint(rng.Intn(101))); err != nil {
				t.Fatal(err)
			}
		default:
			if err := e.SetTunable("clean_threshold", fmt.Sprint(rng.Intn(91))); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Everything reads back, and after a drain the backing device alone
	// holds the data.
	p := make([]byte, size)
	if _, err := e.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if d := same(p, 0); d >= 0 {
		t.Fatalf("final read differs from the model at byte %d", d)
	}
	cleanedSegs += e.Status().Cleaning.CleanedSegments
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := backing.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	if d := same(p, 0); d >= 0 {
		t.Fatalf("backing device after drain differs from the model at byte %d", d)
	}
	if z := e.Status().PendingZeroBlocks; z != 0 {
		t.Fatalf("%d zero blocks still pending after a drain", z)
	}
	return cleanedSegs
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			return i
		}
	}
	return -1
}
