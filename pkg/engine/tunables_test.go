package engine

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never happened: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func writeBlocks(t *testing.T, e *Engine, n int, stride int64) {
	t.Helper()
	p := make([]byte, blockSize)
	for i := 0; i < n; i++ {
		p[0] = byte(i)
		if _, err := e.WriteAt(p, int64(i)*stride*blockSize); err != nil {
			t.Fatal(err)
		}
	}
}

func TestWritebackThreshold(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(64), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	writeBlocks(t, e, 40, 3)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	dirty := e.Status().NrDirtyCacheBlocks
	time.Sleep(2500 * time.Millisecond) // two modulator ticks
	if got := e.Status().NrDirtyCacheBlocks; got != dirty || dirty != 40 {
		t.Fatalf("threshold 0: dirty %d -> %d, want 40 kept", dirty, got)
	}
	if err := e.SetTunable("writeback_threshold", "100"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "background writeback with threshold 100", func() bool { return e.Status().NrDirtyCacheBlocks == 0 })
	if err := e.SetTunable("writeback_threshold", "101"); err == nil {
		t.Fatal("writeback_threshold 101 accepted")
	}
}

func TestBatchSizeSetsBackingFlushes(t *testing.T) {
	for _, batch := range []int{1, 8} {
		cache := blockdev.NewMem(testCacheSize(64), nil)
		backing := blockdev.NewCounting(blockdev.NewMem(8<<20, nil))
		e := openTest(t, cache, backing, func(o *Options) {
			o.Tunables.WritebackThreshold = 0
			o.Tunables.NrMaxBatchedWriteback = batch
		})
		writeBlocks(t, e, e.nd*16, 1) // 16 full segments
		if err := e.Flush(); err != nil {
			t.Fatal(err)
		}
		before := backing.Snapshot().Flushes
		if err := e.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		flushes := backing.Snapshot().Flushes - before
		e.Close()
		want := int64((16 + batch - 1) / batch)
		if flushes < want || flushes > want+2 {
			t.Fatalf("batch %d: %d backing flushes to write back 16 segments, want about %d", batch, flushes, want)
		}
	}
}

func TestSyncDataInterval(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.SyncDataInterval = 1 })
	defer e.Close()
	writeBlocks(t, e, 1, 1)
	eventually(t, "sync_data_interval flush", func() bool {
		s := e.Status()
		return s.LastFlushedID == s.CurrentID && s.CurrentID > 0
	})
}

func TestReadCache(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(8<<20, nil)
	want := bytes.Repeat([]byte{7}, 64*blockSize)
	backing.WriteAt(want, 0)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.ReadCacheThreshold = 4 })
	defer e.Close()
	p := make([]byte, blockSize)
	for i := 0; i < 2; i++ { // random-looking single-block reads get staged
		for _, b := range []int64{9, 3, 17} {
			if _, err := e.ReadAt(p, b*blockSize); err != nil || !bytes.Equal(p, want[:blockSize]) {
				t.Fatalf("read %d: %v", b, err)
			}
		}
	}
	st := e.Status().Stat
	if hits := st.ReadHitBufferFull + st.ReadHitCacheFull; hits != 3 {
		t.Fatalf("second pass: %d full hits, want 3 (%+v)", hits, st)
	}
	// A long sequential read is not staged.
	e.ClearStat()
	big := make([]byte, 32*blockSize)
	for i := 0; i < 2; i++ {
		if _, err := e.ReadAt(big, 32*blockSize); err != nil || !bytes.Equal(big, want[:len(big)]) {
			t.Fatal("sequential read", err)
		}
	}
	if st := e.Status().Stat; st.ReadHitBufferFull+st.ReadHitCacheFull != 0 {
		t.Fatalf("sequential run was cached: %+v", st)
	}
	// A write to a staged block replaces it.
	q := bytes.Repeat([]byte{9}, blockSize)
	if _, err := e.WriteAt(q, 9*blockSize); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ReadAt(p, 9*blockSize); err != nil || !bytes.Equal(p, q) {
		t.Fatalf("read after write to a staged block: %v", err)
	}
}

func TestWriteAroundMode(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(16), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WriteAroundMode = false })
	writeBlocks(t, e, 5, 1) // dirty blocks from before the mode change
	e.Close()
	e = openTest(t, cache, backing, func(o *Options) { o.Format = false; o.Tunables.WriteAroundMode = true })
	defer e.Close()
	if d := e.Status().NrDirtyCacheBlocks; d != 0 {
		t.Fatalf("write-around open left %d dirty blocks", d)
	}
	p := bytes.Repeat([]byte{5}, blockSize)
	if _, err := e.WriteAt(p, 100*blockSize); err != nil {
		t.Fatal(err)
	}
	q := make([]byte, blockSize)
	backing.ReadAt(q, 100*blockSize)
	if !bytes.Equal(p, q) {
		t.Fatal("write-around write is not on the backing device")
	}
	img := backing.CrashImage(blockdev.CrashDropAll, nil)
	img.ReadAt(q, 100*blockSize)
	if !bytes.Equal(p, q) {
		t.Fatal("write-around write is not durable on the backing device")
	}
	if err := e.SetTunable("write_around_mode", "0"); !errors.Is(err, ErrStaticTunable) {
		t.Fatalf("changing write_around_mode online: %v, want ErrStaticTunable", err)
	}
}

func TestDrainWritesEverything(t *testing.T) {
	cache, backing := blockdev.NewMem(testCacheSize(32), nil), blockdev.NewMem(8<<20, nil)
	e := openTest(t, cache, backing, func(o *Options) { o.Tunables.WritebackThreshold = 0 })
	defer e.Close()
	writeBlocks(t, e, 50, 2) // some still in the RAM buffer, unflushed
	var last DrainProgress
	calls := 0
	if err := e.Drain(context.Background(), func(p DrainProgress) { last = p; calls++ }); err != nil {
		t.Fatal(err)
	}
	if last.DirtyBlocks != 0 || last.InitialDirty != 50 || last.WrittenBlocks != 50 || calls < 1 {
		t.Fatalf("drain progress %+v after %d calls", last, calls)
	}
	p := make([]byte, blockSize)
	for i := 0; i < 50; i++ {
		backing.ReadAt(p, int64(i)*2*blockSize)
		if p[0] != byte(i) {
			t.Fatalf("block %d not written back", i*2)
		}
	}
	// The checkpoint on the device records the written-back position.
	two := make([]byte, 2*blockSize)
	cache.ReadAt(two, layout.CheckpointOffsets[0])
	ck, err := layout.ChooseCheckpoint(two[:blockSize], two[blockSize:], e.uuid)
	if err != nil || ck.LastWritebackID != e.Status().LastWritebackID {
		t.Fatalf("checkpoint %+v (%v), status last_writeback_id %d", ck, err, e.Status().LastWritebackID)
	}
}

// TestIOErrors: device errors surface as EIO, never hang, never panic.
func TestIOErrors(t *testing.T) {
	cache := blockdev.NewFaulty(blockdev.NewMem(testCacheSize(16), nil))
	backing := blockdev.NewFaulty(blockdev.NewMem(8<<20, nil))
	e := openTest(t, cache, backing, nil)
	defer e.Close()
	backing.FailReadsAfter(0, errors.New("injected"))
	p := make([]byte, blockSize)
	if _, err := e.ReadAt(p, 0); !errors.Is(err, ErrIO) {
		t.Fatalf("read miss with a failing backing device: %v", err)
	}
	backing.Reset()
	cache.FailWritesAfter(0, errors.New("injected"))
	if _, err := e.WriteAt(p, 0); err != nil {
		t.Fatalf("write into the RAM buffer: %v", err)
	}
	if err := e.Flush(); !errors.Is(err, ErrIO) {
		t.Fatalf("flush with a failing cache device: %v", err)
	}
	if _, err := e.WriteAt(p, 0); !errors.Is(err, ErrIO) {
		t.Fatalf("write after the cache device failed: %v", err)
	}
	if e.Err() == nil {
		t.Fatal("Err() is nil after a cache device failure")
	}
}
