package engine

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"k8s.io/klog/v2"
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
//
// Gap filling (not in dm-writeboost): between two blocks of a batch that
// are close on the backing device, the blocks in between are written too
// when the cache holds a full, durable copy of every one of them (dirty or
// clean) and the gap is short or mostly dirty. On a disk, writing through
// a gap of up to maxFillGap blocks costs no more than the seek and
// rotation it replaces, and the dirty blocks it carries are done early:
// when random overwrites have dirtied most of a disk, the oldest segments'
// surviving blocks are sparse (one every few hundred blocks), and without
// filling every batch pays one seek per block while the newer segments
// wait their turn; with it, batches sweep the disk in long runs. A filled
// block keeps its place in the log: it is marked clean, so its own
// segment's batch skips it, and until the checkpoint passes that segment
// recovery still replays it (writing the same data back again is
// harmless). Only durable copies are used (flushedID), so that a crash
// never leaves on the backing device a write the cache device might not
// hold. A copy in a segment after the last written-back one cannot move
// while the batch runs (only this goroutine, holding wbMu, lets such slots
// be reused); a clean copy in an older segment can lose its slot to a new
// segment, so after reading it the slot's segment id is checked, as reads
// do (read.go), and if it changed the block is taken from the backing
// device instead, which holds the same data (the copy was clean, and
// nothing else writes the backing device while wbMu is held).

type wbItem struct {
	blk  uint64
	pos  uint32
	mask uint8
	data []byte
	// fill: a gap-filling copy; data is read from the cache device at
	// segment seg when the run is written.
	fill bool
	seg  uint64
}

// maxFillGap is the longest gap filled: 1 MiB takes about 6 ms to write at
// 180 MB/s, about one short seek plus the mean rotational latency of a
// 7,200 rpm disk.
const maxFillGap = 256

// shortFillGap is filled even when its blocks are clean: writing a few
// blocks costs far less than the rotation skipping them would.
const shortFillGap = 8

// maxFillBlocks bounds the filled blocks of one batch (128 MiB, under a
// second of transfer), so that a batch, and the trims and write-around
// writes that wait for it, stay short.
const maxFillBlocks = 32 << 10

// maxWritebackIO bounds one backing write.
const maxWritebackIO = 4 << 20

// writebackOnce writes back one batch. It reports whether there was
// anything to do.
func (e *Engine) writebackOnce(maxSegs int, checkpoint bool) (bool, error) {
	e.wbMu.Lock()
	defer e.wbMu.Unlock()
	e.mu.Lock()
	if err := e.mu.err; err != nil {
		// A dead cache is not read again (health.go).
		e.mu.Unlock()
		return false, err
	}
	from := e.mu.wbDoneID + 1
	to := min(e.mu.writtenID, e.mu.wbDoneID+uint64(maxSegs))
	if from <= to {
		to = e.extendBatchLocked(from, to, maxSegs)
	}
	if from > to {
		// Nothing to write back; a full ring may still wait for the
		// checkpoint of what was written back before.
		pending := e.mu.ckptWbID < e.mu.wbDoneID && (checkpoint || e.mu.urgent || e.catchUpDueLocked())
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
	// The batch's zero records, zeroed on the backing device before its
	// blocks are written (discard.go).
	var zeros []blockRange
	var zeroPos []uint32
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
			if metaFlags(m)&flagDiscard != 0 {
				if n, ok := e.mu.discards[base+uint32(i)]; ok {
					zeros = append(zeros, blockRange{metaBlock(m), metaBlock(m) + uint64(n)})
					zeroPos = append(zeroPos, base+uint32(i))
				}
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
	segData := e.wbScratchBuf(need)
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
			return true, e.cacheFailed(fmt.Errorf("writeback: read segment %d: %w", id, err))
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
	e.mu.Lock()
	items = e.fillGapsLocked(items, from-1)
	e.mu.Unlock()
	if err := e.zeroRuns(mergeRanges(nil, zeros)); err != nil {
		return true, e.wbFail(err)
	}
	n, err := e.writeItems(items)
	yielded := errors.Is(err, errYield)
	if errors.Is(err, errCacheDead) {
		return true, err
	}
	if err != nil && !yielded {
		return true, e.wbFail(err)
	}
	items = items[:n]
	if err := e.backing.Flush(); err != nil {
		return true, e.wbFail(fmt.Errorf("flush backing device: %w", err))
	}

	e.mu.Lock()
	var written uint64
	for _, it := range items {
		if it.fill {
			e.mu.wbFilled++
		}
		m := e.mu.idx.meta[it.pos]
		if metaFlags(m)&(flagValid|flagDirty) == flagValid|flagDirty && metaBlock(m) == it.blk {
			e.mu.idx.meta[it.pos] = m &^ (uint64(flagDirty) << metaFlagShift)
			e.mu.nrDirty--
		}
		written += uint64(blockSize)
	}
	for _, pos := range zeroPos {
		// Zeroed and flushed: reads may go to the backing device. The
		// record stays in the log until the checkpoint passes it.
		e.mu.idx.meta[pos] &^= uint64(flagDiscard) << metaFlagShift
		e.removeZeroLocked(pos)
	}
	if yielded {
		// The cleaner takes the tail (clean.go); what was written is
		// clean now, and the batch's segments stay where they are.
		e.mu.wbBytes += written
		e.mu.wbErr = nil
		e.mu.clean.WritebackYields++
		e.mu.cleanHold = e.clock.Now().Add(cleanHold)
		e.cond.Broadcast()
		e.mu.Unlock()
		return true, nil
	}
	e.mu.clean.WrittenBackSegments += to - from + 1
	e.mu.wbDoneID = to
	// The pace is set by ring space reclaimed, the resource the
	// foreground consumes (pace.go).
	e.noteBatchLocked(int(to-from+1)*e.nd, e.clock.Now().Sub(began))
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
// backing device's current data (read in runs as well). It returns how
// many items it wrote: all, or, with errYield, those before the point
// where it gave way to the cleaner (clean.go).
func (e *Engine) writeItems(items []wbItem) (int, error) {
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
				return i, fmt.Errorf("read backing blocks %d-%d to complete partial blocks: %w", items[i].blk, items[j-1].blk, err)
			}
		}
		var stretches [][2]int // filled blocks: [k, l) of one segment, consecutive positions
		for k := i; k < j; {
			if !items[k].fill {
				copySectors(run[(k-i)*blockSize:], items[k].data, items[k].mask)
				k++
				continue
			}
			l := k + 1
			for l < j && items[l].fill && items[l].seg == items[k].seg && items[l].pos == items[l-1].pos+1 {
				l++
			}
			stretches = append(stretches, [2]int{k, l})
			k = l
		}
		if err := e.readFills(items, stretches, run, i); err != nil {
			return i, err
		}
		if _, err := e.backing.WriteAt(run, int64(items[i].blk)*blockSize); err != nil {
			return i, fmt.Errorf("write back blocks %d-%d: %w", items[i].blk, items[j-1].blk, err)
		}
		e.mu.Lock()
		e.mu.batchDone += j - i // the pace's first estimate (pace.go)
		yield := j < len(items) && e.cleanWantedLocked()
		e.mu.Unlock()
		if yield {
			return j, errYield
		}
		i = j
	}
	return len(items), nil
}

// fillReaders bounds the cache reads of filled blocks in flight: they are
// scattered over newer segments, and a cache device (an NVMe drive) serves
// them in parallel far faster than one after another.
const fillReaders = 8

// readFills reads the filled blocks of one run, items[s[0]:s[1]] for each
// stretch s, into run (which starts at items[first]), several at a time.
// A stretch whose slot was reused meanwhile is read from the backing
// device instead (see the top of this file).
func (e *Engine) readFills(items []wbItem, stretches [][2]int, run []byte, first int) error {
	if len(stretches) == 0 {
		return nil
	}
	errs := make([]error, len(stretches))
	next := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < min(fillReaders, len(stretches)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range next {
				k, l := stretches[n][0], stretches[n][1]
				idx := int(uint64(items[k].pos) % uint64(e.nd))
				if _, err := e.cache.ReadAt(run[(k-first)*blockSize:(l-first)*blockSize], e.geo.DataBlockOffset(items[k].seg, idx)); err != nil {
					errs[n] = fmt.Errorf("read blocks %d-%d from segment %d of the cache device: %w", items[k].blk, items[l-1].blk, items[k].seg, err)
				}
			}
		}()
	}
	for n := range stretches {
		next <- n
	}
	close(next)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return e.cacheFailed(err)
	}
	var moved [][2]int
	e.mu.Lock()
	for _, st := range stretches {
		if e.mu.slotID[uint64(items[st[0]].pos)/uint64(e.nd)] != items[st[0]].seg {
			moved = append(moved, st)
		}
	}
	e.mu.Unlock()
	for _, st := range moved {
		// The slot was reused while we read: the copy was clean, so the
		// backing device has the same data.
		k, l := st[0], st[1]
		if _, err := e.backing.Device.ReadAt(run[(k-first)*blockSize:(l-first)*blockSize], int64(items[k].blk)*blockSize); err != nil {
			return fmt.Errorf("read backing blocks %d-%d for a gap: %w", items[k].blk, items[l-1].blk, err)
		}
	}
	return nil
}

// extendBatchLocked lets a batch of segments [from, to] take in further
// written segments while their entries, with the batch's, stay within
// maxSegs full segments' worth. Segments are sealed part-full by drains,
// sync_data_interval, the ticker when a volume goes quiet, makeDurable and
// (before partial writes existed, and in dm-writeboost) every flush; a
// ring of small segments counted by segments would give batches a few
// dozen scattered blocks each, one seek apiece. Bounding a batch by its entries keeps its I/O and memory what
// nr_max_batched_writeback allows for full segments, and gives the sort
// (and gap filling) enough blocks to work with.
func (e *Engine) extendBatchLocked(from, to uint64, maxSegs int) uint64 {
	budget := maxSegs * e.nd
	for id := from; id <= to; id++ {
		budget -= int(e.mu.slotCount[e.slotOf(id)])
	}
	// Stay within half the ring: the checkpoint must be able to pass
	// the batch while new segments take the other half.
	for to < e.mu.writtenID && to-from+1 < e.nseg/2 {
		n := int(e.mu.slotCount[e.slotOf(to+1)])
		if n > budget {
			break
		}
		budget -= n
		to++
	}
	return to
}

// fillGapsLocked returns sorted items with the gaps between them filled
// where that saves the backing device a seek (see the top of this file).
// wbDone is the last written-back segment: only copies in later, durable
// segments are used.
func (e *Engine) fillGapsLocked(items []wbItem, wbDone uint64) []wbItem {
	if e.noFill {
		return items
	}
	budget := maxFillBlocks
	var out []wbItem
	var gap []wbItem
	for i := range items {
		if i > 0 && budget > 0 {
			a, b := items[i-1].blk, items[i].blk
			if n := b - a - 1; n > 0 && n <= maxFillGap && int(n) <= budget {
				gap = gap[:0]
				dirty := 0
				for blk := a + 1; blk < b; blk++ {
					it, isDirty, ok := e.fillCopyLocked(blk, wbDone)
					if !ok {
						gap = gap[:0]
						break
					}
					if isDirty {
						dirty++
					}
					gap = append(gap, it)
				}
				if len(gap) > 0 && (n <= shortFillGap || 2*dirty >= len(gap)) {
					if out == nil {
						out = make([]wbItem, 0, len(items)+len(gap))
						out = append(out, items[:i]...)
					}
					out = append(out, gap...)
					budget -= len(gap)
				}
			}
		}
		if out != nil {
			out = append(out, items[i])
		}
	}
	if out == nil {
		return items
	}
	return out
}

// fillCopyLocked finds a copy of blk usable to fill a gap: the newest copy,
// whole, in a durable segment; in a segment at or before wbDone only a
// clean one.
func (e *Engine) fillCopyLocked(blk, wbDone uint64) (it wbItem, dirty, ok bool) {
	pos, found := e.mu.idx.lookup(blk)
	if !found {
		return wbItem{}, false, false
	}
	m := e.mu.idx.meta[pos]
	if metaFlags(m)&flagValid == 0 || metaMask(m) != 0xff || e.zeroPendingLocked(blk) {
		// (A pending zero must reach the backing device before any
		// copy of its range does: discard.go.)
		return wbItem{}, false, false
	}
	dirty = metaFlags(m)&flagDirty != 0
	id := e.mu.slotID[uint64(pos)/uint64(e.nd)]
	if id > e.mu.flushedID || (id <= wbDone && dirty) {
		return wbItem{}, false, false
	}
	return wbItem{blk: blk, pos: pos, mask: 0xff, fill: true, seg: id}, dirty, true
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
	if e.mu.err != nil {
		return false // a dead cache is not read again (health.go)
	}
	if e.mu.urgent && e.mu.ckptWbID < e.mu.wbDoneID {
		return true // only the checkpoint is missing
	}
	if e.mu.wbDoneID >= e.mu.writtenID {
		if e.catchUpDueLocked() {
			return true // only the checkpoint is missing
		}
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
	return e.mu.bgAllow && !e.bgHeldLocked()
}

// catchUpDueLocked reports whether writeback has caught up with
// everything on the cache device, but no checkpoint says so yet and
// update_sb_record_interval has passed since the last one. A batch writes
// a checkpoint only when one is due, and flushes write one, so an idle
// volume would otherwise keep a stale last_writeback_id for ever: a
// recovery would replay segments already written back, and a cache device
// failing meanwhile could not fall back to pass-through (health.go).
func (e *Engine) catchUpDueLocked() bool {
	iv := e.mu.tunables.UpdateSbRecordInterval
	return iv > 0 && e.mu.ckptWbID < e.mu.wbDoneID && e.mu.wbDoneID >= e.mu.writtenID &&
		e.clock.Now().Sub(e.mu.lastCkpt) >= time.Duration(iv)*time.Second
}

func (e *Engine) writebacker() {
	defer e.wg.Done()
	backoff := time.Duration(0)
	for {
		e.mu.Lock()
		for !e.mu.stop && !e.writebackWantedLocked() {
			e.releaseWbScratch() // idle: hold no batch buffer (memory.go)
			e.cond.Wait()
		}
		if e.mu.stop {
			e.mu.Unlock()
			return
		}
		_, err := e.writebackStepLocked(true)
		e.mu.Unlock()
		if err != nil {
			// The backing device failed: retry with backoff rather than
			// spin; writes still land in the cache until the ring is full.
			backoff = min(max(backoff*2, 10*time.Millisecond), time.Second)
			select {
			case <-e.clock.After(backoff):
			case <-e.stopCh:
			}
		} else {
			backoff = 0
		}
	}
}

// writebackStepLocked is one round of the writebacker (its goroutine, or a
// caller in stepping mode: step.go): a cleaning batch if cleaning is
// wanted, else (or if cleaning found nothing) a writeback batch. It
// releases mu while the batch runs, and reports whether there was
// anything to do. mayClean false leaves cleaning out (step.go).
func (e *Engine) writebackStepLocked(mayClean bool) (bool, error) {
	n := e.mu.tunables.NrMaxBatchedWriteback
	urgent := e.mu.urgent
	clean := mayClean && e.cleanWantedLocked()
	e.mu.Unlock()
	did, err := false, error(nil)
	if clean {
		did, err = e.cleanOnce(n)
	}
	if !did && err == nil {
		did, err = e.writebackOnce(n, urgent)
	}
	e.mu.Lock()
	if did && err == nil && e.mu.nextID <= e.fgLimitLocked() {
		e.mu.urgent = false
	}
	return did, err
}
