package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Writeback copies dirty blocks of the oldest segments to the backing
// device, up to nr_max_batched_writeback segments at a time: only the
// newest copy of each block (the one the index points at), sorted by
// backing address, merged into large writes; partially dirty blocks are
// completed with a read of the backing block so that they merge too. The
// backing device is flushed before the blocks are marked clean and before a
// checkpoint lets their ring slots be reused, so a crash at any instant
// loses nothing: until the checkpoint is durable, recovery replays the
// segments and writes them back again.

type wbItem struct {
	blk  uint64
	pos  uint32
	mask uint8
	data []byte
}

// maxWritebackIO bounds one backing write.
const maxWritebackIO = 4 << 20

// writebackOnce writes back one batch. It reports whether there was
// anything to do.
func (e *Engine) writebackOnce(maxSegs int, checkpoint bool) (bool, error) {
	e.wbMu.Lock()
	defer e.wbMu.Unlock()
	e.mu.Lock()
	from := e.mu.wbDoneID + 1
	to := min(e.mu.writtenID, e.mu.wbDoneID+uint64(maxSegs))
	if from > to {
		// Nothing to write back; a full ring may still wait for the
		// checkpoint of what was written back before.
		pending := e.mu.ckptWbID < e.mu.wbDoneID && (checkpoint || e.mu.urgent)
		wb := e.mu.wbDoneID
		e.mu.Unlock()
		if pending {
			err := e.makeDurable()
			if errors.Is(err, ErrClosed) {
				return true, nil // Close writes the last checkpoint
			}
			if err == nil {
				err = e.syncWithCheckpoint(wb, false)
			}
			if err != nil {
				e.mu.Lock()
				e.failLocked(err)
				e.mu.Unlock()
				return true, err
			}
			return true, nil
		}
		return false, nil
	}
	var items []wbItem
	counts := make([]int, 0, to-from+1)
	var needID uint64
	for id := from; id <= to; id++ {
		slot := e.slotOf(id)
		// Dirty entries replaced by now are skipped below; their
		// replacements must be durable before a checkpoint passes them.
		// (Entries replaced later are written back with the rest.)
		needID = max(needID, e.mu.supersede[slot])
		n := int(e.mu.slotCount[slot])
		counts = append(counts, n)
		base := uint32(slot * uint64(e.nd))
		for i := 0; i < n; i++ {
			m := e.mu.idx.meta[base+uint32(i)]
			if metaFlags(m)&(flagValid|flagDirty) == flagValid|flagDirty {
				items = append(items, wbItem{blk: metaBlock(m), pos: base + uint32(i), mask: metaMask(m)})
			}
		}
	}
	e.mu.Unlock()

	began := e.clock.Now()
	e.mu.Lock()
	e.mu.batchBegan, e.mu.batchDone = began, 0
	e.mu.Unlock()
	// Read the segments' data: one I/O per segment holding a dirty block.
	need := 0
	for _, n := range counts {
		need += n * blockSize
	}
	if cap(e.wbScratch) < need {
		e.wbScratch = make([]byte, need)
	}
	segData := e.wbScratch[:need]
	segOff := make(map[uint64]int, len(counts))
	at := 0
	for k, id := range idRange(from, to) {
		segOff[id] = at
		at += counts[k] * blockSize
	}
	ii := 0
	for k, id := range idRange(from, to) {
		slot := e.slotOf(id)
		base := uint32(slot * uint64(e.nd))
		has := false
		for ii < len(items) && items[ii].pos < base+uint32(counts[k]) && items[ii].pos >= base {
			has = true
			ii++
		}
		if !has || counts[k] == 0 {
			continue
		}
		buf := segData[segOff[id] : segOff[id]+counts[k]*blockSize]
		if _, err := e.cache.ReadAt(buf, e.geo.DataBlockOffset(id, 0)); err != nil {
			return true, e.wbFail(fmt.Errorf("read segment %d from the cache device: %w", id, err))
		}
	}
	for i := range items {
		id := e.idOfPos(items[i].pos, from, to)
		idx := int(uint64(items[i].pos) % uint64(e.nd))
		items[i].data = segData[segOff[id]+idx*blockSize:][:blockSize]
	}

	slices.SortFunc(items, func(a, b wbItem) int {
		switch {
		case a.blk < b.blk:
			return -1
		case a.blk > b.blk:
			return 1
		}
		return 0
	})
	if err := e.writeItems(items); err != nil {
		return true, e.wbFail(err)
	}
	if err := e.backing.Flush(); err != nil {
		return true, e.wbFail(fmt.Errorf("flush backing device: %w", err))
	}

	e.mu.Lock()
	var written uint64
	for _, it := range items {
		m := e.mu.idx.meta[it.pos]
		if metaFlags(m)&(flagValid|flagDirty) == flagValid|flagDirty && metaBlock(m) == it.blk {
			e.mu.idx.meta[it.pos] = m &^ (uint64(flagDirty) << metaFlagShift)
			e.mu.nrDirty--
		}
		written += uint64(blockSize)
	}
	e.mu.wbDoneID = to
	e.noteBatchLocked(len(items), e.clock.Now().Sub(began))
	e.mu.ckptNeed = max(e.mu.ckptNeed, needID)
	e.mu.wbBytes += written
	e.mu.wbErr = nil
	t := e.mu.tunables
	pressed := e.mu.urgent || e.mu.drains > 0 || e.mu.nextID-e.mu.ckptWbID > e.nseg/2
	due := t.UpdateSbRecordInterval == 0 || e.clock.Now().Sub(e.mu.lastCkpt) >= time.Duration(t.UpdateSbRecordInterval)*time.Second
	e.cond.Broadcast()
	e.mu.Unlock()
	if checkpoint || pressed || due {
		err := e.makeDurable()
		if errors.Is(err, ErrClosed) {
			return true, nil // Close writes the last checkpoint
		}
		if err == nil {
			err = e.syncWithCheckpoint(to, false)
		}
		if err != nil {
			e.mu.Lock()
			e.failLocked(err)
			e.mu.Unlock()
			return true, err
		}
	}
	return true, nil
}

func idRange(from, to uint64) []uint64 {
	ids := make([]uint64, 0, to-from+1)
	for id := from; id <= to; id++ {
		ids = append(ids, id)
	}
	return ids
}

// idOfPos finds which segment of [from, to] a position belongs to.
func (e *Engine) idOfPos(pos uint32, from, to uint64) uint64 {
	slot := uint64(pos) / uint64(e.nd)
	first := e.slotOf(from)
	d := (slot + e.nseg - first) % e.nseg
	return from + d
}

// writeItems writes sorted items to the backing device, one I/O per run of
// consecutive blocks. Partially dirty blocks are first completed with the
// backing device's current data (read in runs as well).
func (e *Engine) writeItems(items []wbItem) error {
	for i := 0; i < len(items); {
		j := i + 1
		for j < len(items) && items[j].blk == items[j-1].blk+1 && (j-i)*blockSize < maxWritebackIO {
			j++
		}
		run := make([]byte, (j-i)*blockSize)
		partial := false
		for k := i; k < j; k++ {
			if items[k].mask != 0xff {
				partial = true
			}
		}
		if partial {
			if _, err := e.backing.Device.ReadAt(run, int64(items[i].blk)*blockSize); err != nil {
				return fmt.Errorf("read backing blocks %d-%d to complete partial blocks: %w", items[i].blk, items[j-1].blk, err)
			}
		}
		for k := i; k < j; k++ {
			copySectors(run[(k-i)*blockSize:], items[k].data, items[k].mask)
		}
		if _, err := e.backing.WriteAt(run, int64(items[i].blk)*blockSize); err != nil {
			return fmt.Errorf("write back blocks %d-%d: %w", items[i].blk, items[j-1].blk, err)
		}
		e.mu.Lock()
		e.mu.batchDone += j - i // the pace's first estimate (pace.go)
		e.mu.Unlock()
		i = j
	}
	return nil
}

func (e *Engine) wbFail(err error) error {
	e.mu.Lock()
	e.mu.backingErrors++
	e.mu.wbErr = fmt.Errorf("%w: writeback: %v", ErrIO, err)
	e.cond.Broadcast()
	e.mu.Unlock()
	klog.ErrorS(err, "writeback failed; will retry", "volume", e.name)
	return fmt.Errorf("%w: %v", ErrIO, err)
}

// writebackWanted says whether the writeback goroutine should run a batch.
func (e *Engine) writebackWantedLocked() bool {
	if e.mu.urgent && e.mu.ckptWbID < e.mu.wbDoneID {
		return true // only the checkpoint is missing
	}
	if e.mu.wbDoneID >= e.mu.writtenID {
		// Nothing on the cache device to write back; a drain or a full ring
		// waits for the flusher to write the RAM buffers.
		if e.mu.drains > 0 || e.mu.urgent {
			if e.mu.cur != nil && e.mu.cur.count > 0 && e.mu.drains > 0 {
				e.sealLocked()
			}
		}
		return false
	}
	if e.mu.urgent || e.mu.drains > 0 {
		return true
	}
	// Keep a quarter of the ring free so that bursts rarely wait.
	if e.mu.nextID-e.mu.wbDoneID > e.nseg*3/4 {
		return true
	}
	return e.mu.bgAllow
}

func (e *Engine) writebacker() {
	defer e.wg.Done()
	backoff := time.Duration(0)
	for {
		e.mu.Lock()
		for !e.mu.stop && !e.writebackWantedLocked() {
			e.cond.Wait()
		}
		if e.mu.stop {
			e.mu.Unlock()
			return
		}
		n := e.mu.tunables.NrMaxBatchedWriteback
		urgent := e.mu.urgent
		e.mu.Unlock()
		did, err := e.writebackOnce(n, urgent)
		e.mu.Lock()
		if did && err == nil && e.mu.nextID <= e.mu.ckptWbID+e.nseg {
			e.mu.urgent = false
		}
		e.mu.Unlock()
		if err != nil {
			// The backing device failed: retry with backoff rather than
			// spin; writes still land in the cache until the ring is full.
			backoff = min(max(backoff*2, 10*time.Millisecond), time.Second)
			select {
			case <-time.After(backoff):
			case <-e.stopCh:
			}
		} else {
			backoff = 0
		}
	}
}

// ticker is the modulator: once a second it measures how busy the backing
// device is with foreground I/O and allows background writeback only below
// writeback_threshold; it also forces sync_data_interval flushes.
func (e *Engine) ticker() {
	defer e.wg.Done()
	tk := time.NewTicker(time.Second)
	defer tk.Stop()
	lastBusy := e.backing.busy()
	lastTime := e.clock.Now()
	lastSync := lastTime
	lastWB := uint64(0)
	for {
		select {
		case <-tk.C:
		case <-e.stopCh:
			return
		}
		e.mu.Lock()
		e.cond.Broadcast()
		now := e.clock.Now()
		busy := e.backing.busy()
		dt := now.Sub(lastTime)
		if dt > 0 {
			e.mu.util = float64(busy-lastBusy) / float64(dt)
			e.mu.wbRate = float64(e.mu.wbBytes-lastWB) / dt.Seconds()
		}
		lastBusy, lastTime, lastWB = busy, now, e.mu.wbBytes
		t := e.mu.tunables
		e.mu.bgAllow = t.WritebackThreshold > 0 && e.mu.util*100 < float64(t.WritebackThreshold)
		if t.SyncDataInterval > 0 && now.Sub(lastSync) >= time.Duration(t.SyncDataInterval)*time.Second {
			lastSync = now
			if cur := e.mu.cur; cur != nil && cur.count > 0 {
				e.sealLocked()
			}
			e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
		}
		e.cond.Broadcast()
		e.mu.Unlock()
	}
}

// Drain writes back every dirty block, the RAM buffers included, and
// returns when nothing is dirty. progress, if set, is called as it goes.
func (e *Engine) Drain(ctx context.Context, progress func(DrainProgress)) error {
	e.mu.Lock()
	if err := e.usableLocked(); err != nil {
		e.mu.Unlock()
		return err
	}
	e.mu.drains++
	initial := e.mu.nrDirty
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.mu.drains--
		e.mu.Unlock()
	}()
	tk := time.NewTicker(200 * time.Millisecond)
	defer tk.Stop()
	for {
		e.mu.Lock()
		if cur := e.mu.cur; cur != nil && cur.count > 0 {
			e.sealLocked()
		}
		e.cond.Broadcast()
		dirty := e.mu.nrDirty
		err := e.mu.err
		if err == nil && e.mu.closed {
			err = ErrClosed
		}
		e.mu.Unlock()
		if progress != nil {
			progress(DrainProgress{DirtyBlocks: dirty, InitialDirty: initial, WrittenBlocks: initial - min(initial, dirty)})
		}
		if err != nil {
			return err
		}
		if dirty == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tk.C:
		}
	}
}

// writeAround writes straight to the backing device, durably, and drops
// cached copies of the blocks.
func (e *Engine) writeAround(p []byte, off int64) (int, error) {
	// A batch in flight may hold an older cached copy of these blocks; it
	// must not write it over this write (wbMu).
	e.wbMu.RLock()
	defer e.wbMu.RUnlock()
	e.backing.begin()
	_, err := e.backing.WriteAt(p, off)
	e.backing.end()
	if err != nil {
		e.noteBackingError()
		return 0, fmt.Errorf("%w: backing device: %v", ErrIO, err)
	}
	if err := e.backing.Flush(); err != nil {
		e.noteBackingError()
		return 0, fmt.Errorf("%w: flush backing device: %v", ErrIO, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usableLocked(); err != nil {
		return 0, err
	}
	e.dropRangeLocked(uint64(off/blockSize), uint64((off+int64(len(p))+blockSize-1)/blockSize), 0)
	e.mu.stats.WriteMissCacheFull++
	return len(p), nil
}

func (e *Engine) zeroAround(from, to int64) error {
	e.wbMu.RLock()
	defer e.wbMu.RUnlock()
	if err := e.backing.Zero(from, to-from); err == nil {
		err = e.backing.Flush()
	} else {
		e.noteBackingError()
		return fmt.Errorf("%w: backing device: %v", ErrIO, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dropRangeLocked(uint64(from/blockSize), uint64(to/blockSize), 0)
	return nil
}

// meteredDevice measures how long the backing device is busy with
// foreground I/O (read misses, write-around), the utilisation the
// modulator compares with writeback_threshold. Writeback's own I/O is not
// counted, or background writeback would throttle itself.
type meteredDevice struct {
	blockdev.Device
	clock Clock

	mu        sync.Mutex
	inflight  int
	since     time.Time
	busyTotal time.Duration
}

func (d *meteredDevice) begin() {
	d.mu.Lock()
	if d.inflight == 0 {
		d.since = d.clock.Now()
	}
	d.inflight++
	d.mu.Unlock()
}

func (d *meteredDevice) end() {
	d.mu.Lock()
	d.inflight--
	if d.inflight == 0 {
		d.busyTotal += d.clock.Now().Sub(d.since)
	}
	d.mu.Unlock()
}

func (d *meteredDevice) busy() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.busyTotal
	if d.inflight > 0 {
		b += d.clock.Now().Sub(d.since)
	}
	return b
}

// ReadAt is a foreground read (misses and partial hits).
func (d *meteredDevice) ReadAt(p []byte, off int64) (int, error) {
	d.begin()
	defer d.end()
	return d.Device.ReadAt(p, off)
}
