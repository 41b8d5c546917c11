package engine

import (
	"sync"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// fakeClock advances only when slept on.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	slept time.Duration
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	c.slept += d
}

// After fires in real time, so that the goroutines' timers (the tick,
// retry backoff, Drain's poll) still run; Now stays where Sleep and
// advance put it. Stepping mode (step.go) starts no goroutines and calls
// none of them.
func (c *fakeClock) After(d time.Duration) <-chan time.Time { return time.After(d) }

// advance moves the clock forward by d.
func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// TestPaceSchedule: with the ring nearly full, writes are admitted at a
// rate tied to the measured writeback speed: none below the mark, the
// writeback rate at the midpoint, half of it with the ring full.
func TestPaceSchedule(t *testing.T) {
	clk := &fakeClock{now: time.Unix(1e9, 0)}
	e := openTest(t, blockdev.NewMem(testCacheSize(64), nil), blockdev.NewMem(8<<20, nil), func(o *Options) {
		o.Clock = clk
		o.Tunables.WritebackThreshold = 0
	})
	defer e.Close()
	for _, tc := range []struct {
		used      float64       // fraction of the ring in use
		perBlock  time.Duration // schedule time of one block at 100 blocks/s
		wantPaced bool
	}{
		{0.5, 0, false},
		{0.75, 0, false},
		{0.875, 10 * time.Millisecond, true},
		{1, 20 * time.Millisecond, true},
	} {
		e.mu.Lock()
		e.mu.wbBlocksPerSec = 100
		e.mu.ckptWbID = 1000
		e.mu.nextID = e.mu.ckptWbID + uint64(tc.used*float64(e.nseg))
		e.mu.paceNext = time.Time{}
		before := e.mu.pacedWrites
		e.mu.Unlock()
		clk.mu.Lock()
		clk.slept = 0
		clk.mu.Unlock()
		// 11 writes of 2 blocks: the first enters at once, each later one
		// waits for the blocks scheduled before it.
		for i := 0; i < 11; i++ {
			e.pace(2 * blockSize)
		}
		want := 10 * 2 * tc.perBlock
		if clk.slept != want {
			t.Errorf("ring %.3f used: slept %v for 11 writes of 2 blocks, want %v", tc.used, clk.slept, want)
		}
		e.mu.Lock()
		paced := e.mu.pacedWrites - before
		e.mu.nextID, e.mu.ckptWbID = 1, 0
		e.mu.Unlock()
		if (paced > 0) != tc.wantPaced {
			t.Errorf("ring %.3f used: %d paced writes", tc.used, paced)
		}
	}
}

// TestPaceWaitBounded: a wrong rate estimate costs at most maxPaceWait
// per write, never a hang.
func TestPaceWaitBounded(t *testing.T) {
	clk := &fakeClock{now: time.Unix(1e9, 0)}
	e := openTest(t, blockdev.NewMem(testCacheSize(64), nil), blockdev.NewMem(8<<20, nil), func(o *Options) { o.Clock = clk })
	defer e.Close()
	e.mu.Lock()
	e.mu.wbBlocksPerSec = 0.001
	e.mu.ckptWbID = 1000
	e.mu.nextID = e.mu.ckptWbID + e.nseg
	e.mu.Unlock()
	for i := 0; i < 3; i++ {
		e.pace(blockSize)
	}
	if clk.slept != 2*maxPaceWait {
		t.Fatalf("slept %v, want %v (two bounded waits)", clk.slept, 2*maxPaceWait)
	}
	e.mu.Lock()
	e.mu.nextID, e.mu.ckptWbID = 1, 0
	e.mu.Unlock()
}
