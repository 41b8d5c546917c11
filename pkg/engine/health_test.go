package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// deadCache is a cache device that can die: every operation the engine
// attempts is counted (attempts), then failed by faulty once killed.
type deadCache struct {
	mem      *blockdev.Mem
	faulty   *blockdev.Faulty
	attempts *blockdev.Counting
}

func newDeadCache(segs int) *deadCache {
	d := &deadCache{mem: blockdev.NewMem(testCacheSize(segs), nil)}
	d.faulty = blockdev.NewFaulty(d.mem)
	d.attempts = blockdev.NewCounting(d.faulty)
	return d
}

// kill makes every read, write and flush fail with EIO from now on.
func (d *deadCache) kill() {
	d.faulty.FailReadsAfter(0, syscall.EIO)
	d.faulty.FailWritesAfter(0, syscall.EIO)
	d.faulty.FailFlushesAfter(0, syscall.EIO)
}

func block(b byte) []byte { return bytes.Repeat([]byte{b}, blockSize) }

func readBlock(t *testing.T, e *Engine, blk int64) ([]byte, error) {
	t.Helper()
	p := make([]byte, blockSize)
	_, err := e.ReadAt(p, blk*blockSize)
	return p, err
}

func mustRead(t *testing.T, e *Engine, blk int64, want []byte, what string) {
	t.Helper()
	p, err := readBlock(t, e, blk)
	if err != nil {
		t.Fatalf("%s: read block %d: %v", what, blk, err)
	}
	if !bytes.Equal(p, want) {
		t.Fatalf("%s: block %d reads %#x..., want %#x...", what, blk, p[0], want[0])
	}
}

// TestDeadCacheCleanPassesThrough: a cache device that dies with nothing
// dirty (drained, checkpointed) leaves the volume in pass-through: the
// read that met the error and every later one is served from the backing
// device, writes go there and are durable after Flush, the dead device
// is not touched again, and a later open of the same cache (the device
// came back) replays nothing over the writes passed through.
func TestDeadCacheCleanPassesThrough(t *testing.T) {
	cache := newDeadCache(testSegments)
	backing := blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache.attempts, backing, nil)
	for blk := int64(0); blk < 4; blk++ {
		if _, err := e.WriteAt(block(byte(0x10+blk)), blk*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if h := e.Health(); h.State != HealthOK {
		t.Fatalf("healthy volume: %+v", h)
	}
	// A written-back block is still cached (clean): its read goes to the
	// cache device, which is now dead.
	cache.kill()
	mustRead(t, e, 1, block(0x11), "the read that meets the dead cache")
	h := e.Health()
	if h.State != HealthPassThrough || !h.Has(CauseCacheFailed) {
		t.Fatalf("after the cache died with nothing dirty: %+v", h)
	}
	if st := e.Status(); st.Health.State != HealthPassThrough || st.CacheIOErrors == 0 {
		t.Fatalf("status: health %+v, cache_io_errors %d", st.Health, st.CacheIOErrors)
	}
	dead := cache.attempts.Snapshot()

	for blk := int64(0); blk < 4; blk++ {
		mustRead(t, e, blk, block(byte(0x10+blk)), "pass-through read")
	}
	if _, err := e.WriteAt(block(0xa1), 1*blockSize); err != nil {
		t.Fatalf("pass-through write: %v", err)
	}
	if err := e.WriteFUA(block(0xa5), 5*blockSize); err != nil {
		t.Fatalf("pass-through FUA write: %v", err)
	}
	if err := e.WriteZeroes(2*blockSize, 2*blockSize); err != nil {
		t.Fatalf("pass-through write zeroes: %v", err)
	}
	if err := e.Trim(6*blockSize, blockSize); err != nil {
		t.Fatalf("pass-through trim: %v", err)
	}
	if err := e.Flush(); err != nil {
		t.Fatalf("pass-through flush: %v", err)
	}
	mustRead(t, e, 1, block(0xa1), "after a pass-through write")
	mustRead(t, e, 2, block(0), "after pass-through zeroes")
	mustRead(t, e, 5, block(0xa5), "after a pass-through FUA write")
	if err := e.Close(); !errors.Is(err, ErrIO) {
		t.Fatalf("close of a volume whose cache died: %v, want the cache's error", err)
	}
	if got := cache.attempts.Snapshot().Sub(dead); got.WriteOps+got.Flushes+got.ReadOps+got.Zeroes != 0 {
		t.Fatalf("the dead cache device was used again: %+v", got)
	}

	// Everything passed through is on the backing device, durably.
	img := backing.CrashImage(blockdev.CrashDropAll, nil)
	for blk, want := range map[int64][]byte{0: block(0x10), 1: block(0xa1), 2: block(0), 3: block(0), 5: block(0xa5)} {
		p := make([]byte, blockSize)
		if _, err := img.ReadAt(p, blk*blockSize); err != nil || !bytes.Equal(p, want) {
			t.Fatalf("backing block %d after a power cut: %#x... (%v), want %#x...", blk, p[0], err, want[0])
		}
	}
	// The device comes back: opening it again must not put cached copies
	// back over what was passed through.
	cache.faulty.Reset()
	e2, err := Open(Options{Cache: cache.mem.CrashImage(blockdev.CrashDropAll, nil), Backing: img, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	mustRead(t, e2, 1, block(0xa1), "reopened cache")
	mustRead(t, e2, 2, block(0), "reopened cache")
}

// TestDeadCacheDirtyFailsStrandedBlocks: a cache device that dies with
// dirty data on it fails reads of the dirty blocks with EIO (never the
// stale copy on the backing device), passes reads of clean blocks through,
// refuses writes and flushes, reports the stranded blocks, and is not
// touched again.
func TestDeadCacheDirtyFailsStrandedBlocks(t *testing.T) {
	cache := newDeadCache(testSegments)
	backing := blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache.attempts, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	// Blocks 0 and 1 are written back (version 1); then block 0 is
	// overwritten (version 2, dirty, flushed to the cache) and block 3 is
	// written into a RAM buffer only.
	for blk := int64(0); blk < 2; blk++ {
		if _, err := e.WriteAt(block(0x01), blk*blockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteFUA(block(0x02), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := e.WriteAt(block(0x03), 3*blockSize); err != nil {
		t.Fatal(err)
	}
	cache.kill()
	if err := e.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush on a dead cache: %v", err)
	}
	dead := cache.attempts.Snapshot()

	h := e.Health()
	if h.State != HealthFailed || !h.Has(CauseCacheFailed) || h.StrandedBlocks != 2 {
		t.Fatalf("after the cache died with 2 dirty blocks: %+v", h)
	}
	for _, blk := range []int64{0, 3} {
		p, err := readBlock(t, e, blk)
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read of dirty block %d on a dead cache: %v (reads %#x...), want EIO", blk, err, p[0])
		}
	}
	// A partial read of a dirty block fails too; the clean block and a
	// block never written pass through to the backing device.
	if _, err := e.ReadAt(make([]byte, 512), 512); !errors.Is(err, syscall.EIO) {
		t.Fatalf("partial read of a dirty block: %v", err)
	}
	mustRead(t, e, 1, block(0x01), "clean block on a dead cache")
	mustRead(t, e, 7, block(0), "never-written block on a dead cache")
	if _, err := e.WriteAt(block(0x04), 7*blockSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write on a dead cache with dirty data: %v", err)
	}
	if err := e.WriteZeroes(0, 8*blockSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write zeroes on a dead cache with dirty data: %v", err)
	}
	if err := e.Drain(context.Background(), nil); !errors.Is(err, syscall.EIO) {
		t.Fatalf("drain on a dead cache: %v", err)
	}
	if got := cache.attempts.Snapshot().Sub(dead); got.WriteOps+got.Flushes+got.ReadOps+got.Zeroes != 0 {
		t.Fatalf("the dead cache device was used again: %+v", got)
	}
	p := make([]byte, blockSize)
	if _, err := backing.ReadAt(p, 7*blockSize); err != nil || !bytes.Equal(p, block(0)) {
		t.Fatalf("a refused write reached the backing device: %#x... (%v)", p[0], err)
	}
}

// TestLostFlushedSegmentsReported: a cache device that acknowledged
// flushes it did not do leaves segments the checkpoint records as durable
// blank; recovery opens (the log ends before them) but reports the loss
// in Health and Status instead of opening as if all were well.
func TestLostFlushedSegmentsReported(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	// Three flushes of a segment and more each: the checkpoint written
	// by the last one records the earlier ones as durable.
	nd := int64(e.nd)
	for round := int64(0); round < 3; round++ {
		for i := int64(0); i < nd+1; i++ {
			if _, err := e.WriteAt(block(byte(1+round)), (round*(nd+1)+i)*blockSize); err != nil {
				t.Fatal(err)
			}
		}
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	geo := e.geo
	halt(e) // a crash: no clean checkpoint
	two := make([]byte, 2*blockSize)
	if _, err := cache.ReadAt(two, layout.CheckpointOffsets[0]); err != nil {
		t.Fatal(err)
	}
	ck, err := layout.ChooseCheckpoint(two[:blockSize], two[blockSize:], e.uuid)
	if err != nil {
		t.Fatal(err)
	}
	if ck.LastFlushedID < 2 || ck.Clean {
		t.Fatalf("checkpoint %+v: want an unclean one recording segments as durable", ck)
	}
	// The device lost the last segment the checkpoint calls durable: both
	// of its header copies read blank.
	lostID := ck.LastFlushedID
	for c := 0; c < 2; c++ {
		if _, err := cache.WriteAt(make([]byte, blockSize), geo.HeaderOffset(lostID, c)); err != nil {
			t.Fatal(err)
		}
	}
	if h := healthOfClean(t); h.Has(CauseLostFlushedSegments) {
		t.Fatalf("a cache that lost nothing reports lost segments: %+v", h)
	}
	log := captureLog(t)
	e2, err := Open(Options{Cache: cache, Backing: backing, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatalf("open of a cache that lost flushed segments: %v", err)
	}
	defer e2.Close()
	if out := log(); !strings.Contains(out, "\nE") || !strings.Contains(out, "log segments recorded as durable are blank or corrupt") ||
		!strings.Contains(out, fmt.Sprintf("fromID=%d", lostID)) {
		t.Fatalf("the loss is not logged at error level with the segment ids:\n%s", out)
	}
	h := e2.Health()
	if h.State != HealthDegraded || !h.Has(CauseLostFlushedSegments) || h.LostFlushedSegments != 1 {
		t.Fatalf("after recovery found segment %d (recorded durable) blank: %+v", lostID, h)
	}
	if st := e2.Status(); !st.Health.Has(CauseLostFlushedSegments) {
		t.Fatalf("status does not show the lost segments: %+v", st.Health)
	}
}

// captureLog sends klog's output to a buffer until the test ends, and
// returns what it holds so far, the preceding newline included.
func captureLog(t *testing.T) func() string {
	b := &testenv.SyncBuffer{}
	b.Write([]byte{'\n'})
	klog.LogToStderr(false)
	klog.SetOutput(b)
	t.Cleanup(func() {
		klog.SetOutput(os.Stderr)
		klog.LogToStderr(true)
	})
	return func() string {
		klog.Flush()
		return b.String()
	}
}

// healthOfClean is the health of a cache crashed after flushed writes,
// losing nothing: no lost segments.
func healthOfClean(t *testing.T) Health {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	for i := int64(0); i < 20; i++ {
		if _, err := e.WriteAt(block(1), i*blockSize); err != nil {
			t.Fatal(err)
		}
		if i%7 == 0 {
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	halt(e)
	e2, err := Open(Options{Cache: cache.CrashImage(blockdev.CrashDropAll, nil), Backing: backing, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	return e2.Health()
}

// TestHealthCauses: writeback failing, backing I/O errors and a full,
// paced log are each reported with a cause, the volume degraded.
func TestHealthCauses(t *testing.T) {
	backing := blockdev.NewFaulty(blockdev.NewMem(8<<20, nil))
	e := openTest(t, blockdev.NewMem(testCacheSize(64), nil), backing, func(o *Options) { stepping(o) })
	defer e.Close()
	if _, err := e.WriteAt(block(1), 0); err != nil {
		t.Fatal(err)
	}
	backing.FailWritesAfter(0, syscall.EIO)
	if err := e.Drain(context.Background(), nil); !errors.Is(err, syscall.EIO) {
		t.Fatalf("drain with a failing backing device: %v", err)
	}
	h := e.Health()
	if h.State != HealthDegraded || !h.Has(CauseWritebackFailing) || !h.Has(CauseBackingIOErrors) {
		t.Fatalf("writeback failing: %+v", h)
	}
	backing.Reset()
	e.mu.Lock()
	_, err := e.writebackStepLocked(false) // writeback's retry
	e.mu.Unlock()
	if err != nil {
		t.Fatalf("writeback retried on a working backing device: %v", err)
	}
	if err := e.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if h := e.Health(); h.Has(CauseWritebackFailing) || !h.Has(CauseBackingIOErrors) {
		t.Fatalf("writeback recovered: %+v (the errors seen stay counted)", h)
	}

	// A log seven-eighths full with writeback measured: writes are paced.
	e.mu.Lock()
	e.mu.backingErrors = 0
	next, ckpt := e.mu.nextID, e.mu.ckptWbID
	e.mu.wbBlocksPerSec = 100
	e.mu.ckptWbID = 1000
	e.mu.nextID = e.mu.ckptWbID + e.nseg*7/8
	h = e.healthLocked()
	e.mu.nextID, e.mu.ckptWbID = next, ckpt
	e.mu.Unlock()
	if h.State != HealthDegraded || !h.Has(CauseLogFull) {
		t.Fatalf("log 7/8 full and paced: %+v", h)
	}
	if h := e.Health(); h.State != HealthOK || len(h.Causes) != 0 {
		t.Fatalf("healthy again: %+v", h)
	}
}

// TestIdleVolumeCheckpointCatchesUp: once writeback has written back
// everything and update_sb_record_interval has passed, a checkpoint
// records it, so that a cache device failing afterwards finds nothing
// the log could replay and the volume falls back to pass-through.
func TestIdleVolumeCheckpointCatchesUp(t *testing.T) {
	cache := newDeadCache(testSegments)
	backing := blockdev.NewMem(8<<20, nil)
	var clk *fakeClock
	e := openTest(t, cache.attempts, backing, func(o *Options) {
		stepping(o)
		clk = o.Clock.(*fakeClock)
		o.Tunables.WritebackThreshold = 100
		o.Tunables.UpdateSbRecordInterval = 1
	})
	defer e.Close()
	if _, err := e.WriteAt(block(0x42), 0); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	// Two ticks seal the quiet buffer; the flusher writes it, a batch
	// writes it back. No time has passed: the batch writes no checkpoint.
	e.mu.Lock()
	e.tickLocked(&e.step.tick)
	e.tickLocked(&e.step.tick)
	e.stepFlushLocked()
	e.stepWritebackLocked(false)
	behind := e.mu.ckptWbID < e.mu.wbDoneID && e.mu.wbDoneID == e.mu.sealedID && e.mu.nrDirty == 0
	e.mu.Unlock()
	if !behind {
		t.Fatal("setup: want everything written back and the checkpoint behind")
	}
	clk.advance(2 * time.Second)
	e.mu.Lock()
	e.stepWritebackLocked(false)
	caughtUp := e.mu.ckptWbID == e.mu.wbDoneID
	e.mu.Unlock()
	if !caughtUp {
		t.Fatal("an idle volume's checkpoint did not catch up with writeback after update_sb_record_interval")
	}
	cache.kill()
	mustRead(t, e, 0, block(0x42), "read after the cache of an idle, written-back volume died")
	if h := e.Health(); h.State != HealthPassThrough {
		t.Fatalf("the cache of an idle, written-back volume died: %+v, want pass-through", h)
	}
}
