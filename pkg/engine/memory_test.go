package engine

import (
	"context"
	"errors"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// TestEstimateMemoryMatchesOpen: the figure a budget reserves before
// opening is what an open engine holds for its index and buffers, and its
// writeback scratch never exceeds the estimate.
func TestEstimateMemoryMatchesOpen(t *testing.T) {
	for _, segs := range []int{8, 64, 300} {
		size := testCacheSize(segs) + 12345 // a tail the ring does not use
		est, err := EstimateMemory(size, testSegSize, 2)
		if err != nil {
			t.Fatal(err)
		}
		e := openTest(t, blockdev.NewMem(size, nil), blockdev.NewMem(64<<20, nil), nil)
		writeBlocks(t, e, 3*segs, 5)
		if err := e.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		m := e.Status().Memory
		e.Close()
		if m.Index != est.Index || m.Buffers != est.Buffers {
			t.Fatalf("%d segments: open engine holds %+v, estimate %+v", segs, m, est)
		}
		if m.Index != int64(e.Status().IndexBytes) {
			t.Fatalf("index %d, IndexBytes %d", m.Index, e.Status().IndexBytes)
		}
		if m.Scratch > est.Scratch {
			t.Fatalf("%d segments: scratch %d above the estimate %d", segs, m.Scratch, est.Scratch)
		}
		perBlock := float64(est.Index) / float64(uint64(segs)*uint64(testSegSize/blockSize-2))
		if perBlock < 12 || perBlock > 14 {
			t.Fatalf("index costs %.1f bytes per cache block", perBlock)
		}
	}
}

// TestWritebackScratchReleasedWhenIdle: after writeback has run, an idle
// engine holds no batch buffer. Before, the buffer of the largest batch
// (up to 16 MiB) was kept for the life of the engine.
func TestWritebackScratchReleasedWhenIdle(t *testing.T) {
	e := openTest(t, blockdev.NewMem(testCacheSize(64), nil), blockdev.NewMem(64<<20, nil), nil)
	defer e.Close()
	writeBlocks(t, e, 500, 7)
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if e.Status().WritebackBytes == 0 {
		t.Fatal("nothing was written back")
	}
	eventually(t, "writeback scratch released when idle", func() bool { return e.Status().Memory.Scratch == 0 })
}

// TestFormatRefusesUnaddressable: a cache of more blocks than 32-bit
// positions address is refused before anything is written to it; so is a
// budget estimate for it. Before, formatting went ahead and the index
// tried to allocate tens of GiB (positions wrap at 2^32).
func TestFormatRefusesUnaddressable(t *testing.T) {
	const tib = int64(1) << 40
	nd := int64(layout.DefaultSegmentSize/blockSize - 2)
	fits := layout.RingOffset + MaxCachePositions/nd*int64(layout.DefaultSegmentSize)
	if _, err := EstimateMemory(fits, 0, 0); err != nil {
		t.Fatalf("largest addressable cache (%d bytes) refused: %v", fits, err)
	}
	if _, err := EstimateMemory(fits+int64(layout.DefaultSegmentSize), 0, 0); !errors.Is(err, ErrUnaddressable) {
		t.Fatalf("one segment more: %v", err)
	}
	cache := blockdev.NewMem(17*tib, nil)
	_, err := Open(Options{Cache: cache, Backing: blockdev.NewMem(64<<20, nil), Format: true})
	if !errors.Is(err, ErrUnaddressable) {
		t.Fatalf("17 TiB cache: %v", err)
	}
	two := make([]byte, 2*blockSize)
	if _, err := cache.ReadAt(two, 0); err != nil {
		t.Fatal(err)
	}
	for i, c := range two {
		if c != 0 {
			t.Fatalf("refused cache was written to (byte %d)", i)
		}
	}
	if m, err := EstimateMemory(tib, 0, 0); err != nil || m.Index < 3<<30 || m.Index > 4<<30 {
		t.Fatalf("1 TiB cache: index %d bytes, %v (want about 13 bytes per 4 KiB block)", m.Index, err)
	}
}

// TestOpenRefusesUnaddressableBacking: backing block numbers live in 48
// bits of the index; a larger backing device is refused, not wrapped.
func TestOpenRefusesUnaddressableBacking(t *testing.T) {
	huge := blockdev.NewMem((maxBackingBlock+2)*blockSize, nil)
	_, err := Open(Options{Cache: blockdev.NewMem(testCacheSize(16), nil), Backing: huge, Format: true, SegmentSize: testSegSize, RAMBuffers: 2})
	if !errors.Is(err, ErrUnaddressable) {
		t.Fatalf("backing of 2^48+1 blocks: %v, want ErrUnaddressable", err)
	}
}

// TestDefaultBuffersFollowTheRing: with no RAMBuffers asked for, a cache
// gets 16 buffers, or a quarter of a smaller ring (never fewer than the 4
// of earlier versions where the ring has room), and EstimateMemory agrees.
// 16 at any size refused small caches (the 8 MiB minimum slice has 14
// segments).
func TestDefaultBuffersFollowTheRing(t *testing.T) {
	for _, c := range []struct{ segs, want int }{{2, 1}, {3, 2}, {8, 4}, {14, 4}, {40, 10}, {64, 16}, {300, 16}} {
		size := testCacheSize(c.segs)
		e := openTest(t, blockdev.NewMem(size, nil), blockdev.NewMem(64<<20, nil), func(o *Options) { o.RAMBuffers = 0 })
		got := e.Status().Memory.Buffers
		e.Close()
		if want := int64(BufferBytes(testSegSize, c.want)); got != want {
			t.Errorf("%d segments: %d bytes of RAM buffers, want %d buffers (%d bytes)", c.segs, got, c.want, want)
		}
		est, err := EstimateMemory(size, testSegSize, 0)
		if err != nil {
			t.Fatal(err)
		}
		if est.Buffers != got {
			t.Errorf("%d segments: estimate %d bytes of buffers, open engine %d", c.segs, est.Buffers, got)
		}
	}
}
