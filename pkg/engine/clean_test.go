package engine

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// cleanRun overwrites random blocks of a working set of ws blocks until
// the log has wrapped laps times, with background writeback off, checking
// reads against a model as it goes; it returns the engine's status and the
// backing device's counters.
func cleanRun(t *testing.T, threshold, ws, laps int) (Status, blockdev.Counts) {
	t.Helper()
	const segs = 64
	backing := blockdev.NewCounting(blockdev.NewMem(4<<20, nil))
	e := openTest(t, blockdev.NewMem(testCacheSize(segs), nil), backing, func(o *Options) {
		o.Tunables.WritebackThreshold = 0
		o.Tunables.CleanThreshold = threshold
	})
	defer e.Close()
	rng := rand.New(rand.NewSource(int64(threshold*1000 + ws)))
	model := make([]byte, ws*blockSize)
	p := make([]byte, blockSize)
	for i := 0; e.Status().CurrentID < uint64(laps*segs); i++ {
		b := rng.Intn(ws)
		rng.Read(p)
		if _, err := e.WriteAt(p, int64(b)*blockSize); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		copy(model[b*blockSize:], p)
		if i%97 == 0 {
			b := rng.Intn(ws)
			if _, err := e.ReadAt(p, int64(b)*blockSize); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, model[b*blockSize:(b+1)*blockSize]) {
				t.Fatalf("write %d: block %d reads back other data", i, b)
			}
		}
	}
	got := make([]byte, len(model))
	if _, err := e.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("working set differs from the model at byte %d", firstDiff(got, model))
	}
	st, counts := e.Status(), backing.Snapshot()
	// The data reaches the backing device intact when asked to.
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := backing.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatalf("backing device after drain differs from the model at byte %d", firstDiff(got, model))
	}
	return st, counts
}

// TestCleaningKeepsWorkingSetInCache: a working set of a quarter of the
// cache, overwritten at random while the log wraps ten times, hardly
// touches the backing device when cleaning is on: the oldest segments are
// copied forward instead of written back, and the cache writes per new
// block stay within the bound clean_threshold sets. With cleaning off the
// same load writes back.
func TestCleaningKeepsWorkingSetInCache(t *testing.T) {
	ws := 64 * 6 / 4 // a quarter of the cache's 384 blocks
	off, offCounts := cleanRun(t, 0, ws, 10)
	t.Logf("cleaning off: %+v, backing writes %d", off.Cleaning, offCounts.WriteOps)
	if offCounts.WriteOps == 0 || off.Cleaning.CleanedBlocks != 0 || off.Cleaning.CacheWriteAmplification != 1 {
		t.Errorf("cleaning off: %+v with %d backing writes; want writeback only", off.Cleaning, offCounts.WriteOps)
	}

	st, counts := cleanRun(t, 50, ws, 10)
	c := st.Cleaning
	t.Logf("cleaning on: %+v, backing writes %d", c, counts.WriteOps)
	// A segment holds 6 blocks here, so now and then the oldest one is
	// more than half live and goes to writeback; the rest is cleaned.
	if c.CleanedSegments < 9*(c.CleanedSegments+c.WrittenBackSegments)/10 {
		t.Errorf("%d segments cleaned, %d written back: want at least 90 %% cleaned", c.CleanedSegments, c.WrittenBackSegments)
	}
	if counts.WriteOps*10 > offCounts.WriteOps {
		t.Errorf("%d backing writes with cleaning on, %d without: want at most a tenth", counts.WriteOps, offCounts.WriteOps)
	}
	if c.CacheWriteAmplification < 1 || c.CacheWriteAmplification > 2 {
		t.Errorf("cache write amplification %.3f, want within [1, 2] (clean_threshold 50 %%)", c.CacheWriteAmplification)
	}
}

// TestCleaningLeavesLargeWorkingSetToWriteback: when the working set is
// nearly the cache's size, the oldest segments are mostly live, cleaning
// them would multiply cache writes, and writeback frees the ring instead.
func TestCleaningLeavesLargeWorkingSetToWriteback(t *testing.T) {
	st, counts := cleanRun(t, 50, 64*6*9/10, 4)
	t.Logf("%+v, backing writes %d", st.Cleaning, counts.WriteOps)
	if st.Cleaning.WrittenBackSegments == 0 || counts.WriteOps == 0 {
		t.Errorf("no writeback for a working set of 0.9x the cache: %+v", st.Cleaning)
	}
	if st.Cleaning.CacheWriteAmplification > 2 {
		t.Errorf("cache write amplification %.3f beyond the 2x that clean_threshold 50 %% allows", st.Cleaning.CacheWriteAmplification)
	}
}

// TestCleaningSurvivesReopen: cleaned copies are ordinary log entries: a
// close and reopen (and a crash, in the crash sweep) finds the working set
// whole.
func TestCleaningSurvivesReopen(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(1<<20, nil)
	mut := func(o *Options) { o.Tunables.WritebackThreshold = 0; o.Tunables.CleanThreshold = 90 }
	e := openTest(t, cache, backing, mut)
	rng := rand.New(rand.NewSource(5))
	const ws = 16
	model := make([]byte, ws*blockSize)
	p := make([]byte, blockSize)
	for round := 0; round < 4; round++ {
		for i := 0; i < 16*6*3; i++ {
			b := rng.Intn(ws)
			rng.Read(p)
			if _, err := e.WriteAt(p, int64(b)*blockSize); err != nil {
				t.Fatal(err)
			}
			copy(model[b*blockSize:], p)
		}
		if err := e.Close(); err != nil {
			t.Fatal(err)
		}
		e = openTest(t, cache, backing, func(o *Options) { mut(o); o.Format = false })
		got := make([]byte, len(model))
		if _, err := e.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("round %d: after reopen the working set differs at byte %d", round, firstDiff(got, model))
		}
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCleanThresholdTunable(t *testing.T) {
	e := openTest(t, blockdev.NewMem(testCacheSize(8), nil), blockdev.NewMem(1<<20, nil), nil)
	defer e.Close()
	if got := e.Status().Tunables.CleanThreshold; got != 50 {
		t.Fatalf("default clean_threshold %d, want 50", got)
	}
	for _, v := range []string{"91", "-1", "x"} {
		if err := e.SetTunable("clean_threshold", v); err == nil {
			t.Errorf("clean_threshold=%s accepted", v)
		}
	}
	if err := e.SetTunable("clean_threshold", "0"); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(e.Status().Tunables.CleanThreshold); got != "0" {
		t.Fatalf("clean_threshold %s after set to 0", got)
	}
}
