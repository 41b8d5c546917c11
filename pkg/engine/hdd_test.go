package engine

import (
	"bytes"
	"context"
	"math/rand"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
)

// TestSortedWritebackBeatsArrivalOrder: on the virtual-clock HDD model,
// writing back N random dirty 4 KiB blocks costs at least 3x less disk
// time than writing the same blocks to the disk in arrival order (what an
// uncached volume does). dm-writeboost measured 2.4x with batches of 128.
// The clock is virtual, so the result is deterministic.
func TestSortedWritebackBeatsArrivalOrder(t *testing.T) {
	const (
		backingSize = 64 << 20
		n           = 2048 // an eighth of the blocks: dense enough to merge, sparse enough to seek
	)
	rng := rand.New(rand.NewSource(3))
	blocks := rng.Perm(backingSize / blockSize)[:n]
	p := make([]byte, blockSize)

	// Arrival order, straight to the disk.
	raw := hddsim.New(blockdev.NewMem(backingSize, nil), hddsim.DefaultModel(), hddsim.Virtual)
	for i, b := range blocks {
		p[0] = byte(i)
		if _, err := raw.WriteAt(p, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := raw.Flush(); err != nil {
		t.Fatal(err)
	}
	arrival := raw.Busy()

	// Through the cache, then drained by writeback.
	disk := hddsim.New(blockdev.NewMem(backingSize, nil), hddsim.DefaultModel(), hddsim.Virtual)
	e, err := Open(Options{Cache: blockdev.NewMem(64<<20, nil), Backing: disk, Format: true, Tunables: noWriteback()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for i, b := range blocks {
		p[0] = byte(i)
		if _, err := e.WriteAt(p, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := disk.Stats(); st.Requests != 0 {
		t.Fatalf("%d backing requests before the drain with writeback off", st.Requests)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	sorted := disk.Busy()
	st := disk.Stats()
	ratio := float64(arrival) / float64(sorted)
	t.Logf("%d random blocks: arrival order %v, sorted writeback %v (%d requests, %d flushes): %.1fx",
		n, arrival, sorted, st.Requests, st.Flushes, ratio)
	if ratio < 3 {
		t.Fatalf("sorted writeback only %.2fx faster than arrival order, want >= 3x", ratio)
	}
	// And the disk holds every block.
	got := make([]byte, blockSize)
	for i, b := range blocks {
		if _, err := disk.ReadAt(got, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
		if got[0] != byte(i) {
			t.Fatalf("block %d: got %d after writeback, want %d", b, got[0], byte(i))
		}
	}
}

// TestGapFillingSweepsADirtyDisk: when random overwrites have dirtied most
// of a disk whose every block is cached, the oldest segments' surviving
// blocks are sparse; writeback that fills the gaps between them from the
// cache (writeback.go) drains the disk in long runs. The test drains the
// same workload with and without filling on the virtual-clock HDD model,
// requires filling to cost at least 3x less disk time, and checks that
// both leave the disk with the newest data of every block.
func TestGapFillingSweepsADirtyDisk(t *testing.T) {
	const (
		backingSize = 128 << 20
		nblocks     = backingSize / blockSize
	)
	run := func(fill bool) (busy float64, requests int64) {
		disk := hddsim.New(blockdev.NewMem(backingSize, nil), hddsim.DefaultModel(), hddsim.Virtual)
		e, err := Open(Options{Cache: blockdev.NewMem(448<<20, nil), Backing: disk, Format: true, Tunables: noWriteback()})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		e.noFill = !fill
		want := make([]byte, backingSize)
		rng := rand.New(rand.NewSource(5))
		rng.Read(want)
		// Every block cached: a sequential fill, written back.
		for off := 0; off < backingSize; off += 1 << 20 {
			if _, err := e.WriteAt(want[off:off+1<<20], int64(off)); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		// Random overwrites dirty about 78 % of the blocks.
		for i := 0; i < 3*nblocks/2; i++ {
			b := rng.Intn(nblocks)
			p := want[b*blockSize : (b+1)*blockSize]
			rng.Read(p[:64])
			if _, err := e.WriteAt(p, int64(b)*blockSize); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
		before, st0 := disk.Busy(), disk.Stats()
		if err := e.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, backingSize)
		if _, err := disk.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		for b := 0; b < nblocks; b++ {
			if !bytes.Equal(got[b*blockSize:(b+1)*blockSize], want[b*blockSize:(b+1)*blockSize]) {
				t.Fatalf("fill=%v: block %d on the disk is not the newest data after the drain", fill, b)
			}
		}
		return (disk.Busy() - before).Seconds(), disk.Stats().Requests - st0.Requests
	}
	without, reqWithout := run(false)
	with, reqWith := run(true)
	ratio := without / with
	t.Logf("drain of a mostly dirty disk: without gap filling %.2f s of disk time (%d requests), with %.2f s (%d requests): %.1fx",
		without, reqWithout, with, reqWith, ratio)
	if ratio < 3 {
		t.Fatalf("gap filling only %.2fx faster, want >= 3x", ratio)
	}
}

// TestFlushesShareSegments: an fsync-heavy workload (one block, then a
// flush, over and over) fills segments instead of sealing one per flush:
// each flush writes its new blocks and a header copy into the open
// segment (dm-writeboost spends a whole segment per flush). The test
// writes N blocks, each followed by a flush, checks how many segments
// that took, drains, and checks the number of batches (one backing flush
// each), the disk time against arrival order on the virtual-clock HDD
// model, and the data.
func TestFlushesShareSegments(t *testing.T) {
	const (
		backingSize = 128 << 20
		segSize     = 64 << 10 // 14 data blocks
		n           = 2000
	)
	rng := rand.New(rand.NewSource(9))
	blocks := rng.Perm(backingSize / blockSize)[:n]
	raw := hddsim.New(blockdev.NewMem(backingSize, nil), hddsim.DefaultModel(), hddsim.Virtual)
	p := make([]byte, blockSize)
	for i, b := range blocks {
		p[0], p[1] = byte(i), byte(i>>8)
		if _, err := raw.WriteAt(p, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	arrival := raw.Busy()

	disk := hddsim.New(blockdev.NewMem(backingSize, nil), hddsim.DefaultModel(), hddsim.Virtual)
	tun := noWriteback()
	tun.NrMaxBatchedWriteback = 32
	cache := blockdev.NewCounting(blockdev.NewMem(1<<20+(n/14+64)*segSize, nil))
	e, err := Open(Options{Cache: cache, Backing: disk, Format: true, SegmentSize: segSize, Tunables: tun})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	before := cache.Snapshot()
	for i, b := range blocks {
		p[0], p[1] = byte(i), byte(i>>8)
		if _, err := e.WriteAt(p, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	st0 := e.Status()
	c := cache.Snapshot().Sub(before)
	t.Logf("%d flushed writes: %d segments, %d partial flushes, %d cache flushes, %d bytes written to the cache device",
		n, st0.CurrentID, st0.NrPartialFlushed, c.Flushes, c.WriteBytes)
	if want := uint64(n/14 + 1); st0.CurrentID > want {
		t.Fatalf("%d segments for %d flushed writes, want at most %d (14 blocks a segment)", st0.CurrentID, n, want)
	}
	if c.Flushes < n {
		t.Fatalf("%d cache device flushes for %d flushes", c.Flushes, n)
	}
	// Each flush writes its block, a header copy and a checkpoint record.
	if got, max := c.WriteBytes, int64(n)*3*blockSize; got > max {
		t.Fatalf("%d bytes written to the cache device for %d one-block flushes, want at most %d", got, n, max)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	st := disk.Stats()
	perBatch := 32 * 14
	want := (n + perBatch - 1) / perBatch
	ratio := float64(arrival) / float64(disk.Busy())
	t.Logf("%d blocks: %d batches (backing flushes), disk time %v vs %v in arrival order: %.1fx",
		n, st.Flushes, disk.Busy(), arrival, ratio)
	if int(st.Flushes) > want+1 {
		t.Fatalf("%d backing flushes for %d blocks, want at most %d (batches of %d entries)", st.Flushes, n, want+1, perBatch)
	}
	if ratio < 3 {
		t.Fatalf("writeback only %.2fx faster than arrival order, want >= 3x", ratio)
	}
	got := make([]byte, blockSize)
	for i, b := range blocks {
		if _, err := disk.ReadAt(got, int64(b)*blockSize); err != nil {
			t.Fatal(err)
		}
		if got[0] != byte(i) || got[1] != byte(i>>8) {
			t.Fatalf("block %d: wrong data after writeback", b)
		}
	}
}
