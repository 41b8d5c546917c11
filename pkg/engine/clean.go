package engine

import (
	"errors"
	"fmt"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// Cleaning: the log cleans itself, as an LFS cleaner or bcache's moving GC
// do. The ring frees its slots oldest first, and without cleaning a slot is
// free only once its segment's surviving dirty blocks have reached the
// backing device. A working set that fits in half the cache then runs at
// the HDD's pace once the log has wrapped: the oldest segments always hold
// some surviving blocks (about a fifth of them for a log twice the working
// set), scattered over the disk, one seek each.
//
// When the ring is pressed (more than three quarters of it not yet passed,
// the mark where writeback is urged) and the oldest segments hold few live
// dirty blocks, the cleaner copies those blocks forward into the head of
// the log instead: they stay dirty, on the cache device, and the old
// copies become superseded entries, exactly as if the foreground had
// rewritten them. The oldest segments are then passed without any backing
// I/O. Writeback runs on its own terms (sorted, batched, when the backing
// is idle and no cleaning ran for a while: cleanHold).
//
// Victims. A ring can only free its oldest slot, so the order of victims is
// fixed (oldest first, the "age" of Sprite LFS's cost-benefit rule always
// favours them); what cost and benefit decide is whether a victim is
// cleaned or written back. Cleaning a segment with u x nd live dirty
// blocks costs u x nd cache writes (plus a read of the segment) and frees
// nd entries: 1/(1-u) cache writes per new block. clean_threshold bounds u
// (50 %: at most 2 cache writes per new block); a victim above it, a
// working set as large as the cache, goes to writeback, whose cost is
// the backing device's. Under uniform random overwrites u is about 0.2 for
// a log twice the working set (DESIGN-NOTES section 6), 1.25 writes per
// new block.
//
// Room. The cleaner's copies need room at the head before the victims'
// slots are free, so the foreground may not take the last cleanReserve
// slots of the ring (fgLimitLocked); a batch takes victims only while
// their live blocks fit the room left, and a cleaner that runs out of room
// anyway stops after the last whole victim and lets writeback take over.
// The cleaner never waits for ring space (only it and writeback make
// some, under wbMu, which it holds); it does wait for the flusher to free
// a RAM buffer.
//
// Crash safety. An old copy is superseded only by a durable new one: the
// victims' slots are reused only once a checkpoint has passed them, and a
// checkpoint passes them only once the segments holding the copies are
// durable (ckptNeed, raised from supersede[] like writeback's, and
// makeDurable). Until then recovery replays both the old copy and the new
// one, the newer winning; the data is the same. A victim holding a zero
// record whose zeros are not yet on the backing device is left to
// writeback (discard.go); trim records owe the backing nothing. A partial
// write over a clean copy the log still replays merges it (engine.go), so
// that re-zeroing after a crash cannot take sectors the copy held.
// The on-disk format is unchanged: a cleaned copy is an ordinary data
// metablock, and last_writeback_id already meant "written back, or
// superseded by a copy in a later segment" (layout's package doc).
//
// Preemption. A background writeback batch over the HDD can take seconds;
// while it holds the tail, the foreground would fill the ring and stall.
// Between two backing writes of a batch, writeback yields to the cleaner
// when cleaning is wanted (writeItems): what it wrote is flushed and
// marked clean (so the cleaner need not copy it), the batch's segments
// stay where they are.

// cleanReserveDiv: the foreground leaves nseg/cleanReserveDiv slots (at
// least one) to the cleaner.
const cleanReserveDiv = 32

// cleanHold is how long background writeback stays off after cleaning
// ran: a write load that needs the cleaner would preempt every batch.
const cleanHold = time.Second

// errYield is writeItems' answer when it gave way to the cleaner.
var errYield = errors.New("engine: writeback yields to cleaning")

// CleaningStatus is the cleaner's part of Status.
type CleaningStatus struct {
	// CleanedBlocks counts live dirty blocks copied forward to the head of
	// the log; CleanedSegments the oldest segments passed that way, without
	// writing back.
	CleanedBlocks   uint64 `json:"cleaned_blocks"`
	CleanedSegments uint64 `json:"cleaned_segments"`
	// WrittenBackSegments counts segments passed by writeback.
	WrittenBackSegments uint64 `json:"written_back_segments"`
	// WritebackYields counts writeback batches cut short for the cleaner.
	WritebackYields uint64 `json:"writeback_yields"`
	// LogBlocks counts entries appended to the log (writes, cleaning,
	// discard records) since the open.
	LogBlocks uint64 `json:"log_blocks"`
	// CacheWriteAmplification is log blocks per block the volume's users
	// wrote to the log: 1 without cleaning.
	CacheWriteAmplification float64 `json:"cache_write_amplification"`
}

func (e *Engine) cleaningStatusLocked() CleaningStatus {
	c := e.mu.clean
	c.CacheWriteAmplification = 1
	if c.LogBlocks > c.CleanedBlocks {
		c.CacheWriteAmplification = float64(c.LogBlocks) / float64(c.LogBlocks-c.CleanedBlocks)
	}
	return c
}

// cleanReserveLocked is the number of ring slots the foreground leaves to
// the cleaner.
func (e *Engine) cleanReserveLocked() uint64 {
	if e.mu.tunables.CleanThreshold == 0 {
		return 0
	}
	return max(1, e.nseg/cleanReserveDiv)
}

// fgLimitLocked is the highest segment id the foreground may open.
func (e *Engine) fgLimitLocked() uint64 {
	return e.mu.ckptWbID + e.nseg - e.cleanReserveLocked()
}

// pressedLocked reports whether the ring needs its tail freed now: more
// than three quarters of it are not yet passed, or a writer waits.
func (e *Engine) pressedLocked() bool {
	return e.mu.urgent || e.mu.nextID-e.mu.wbDoneID > e.nseg*3/4
}

// liveDirtyLocked counts the live dirty entries of segment id, and
// reports whether it holds a pending zero record.
func (e *Engine) liveDirtyLocked(id uint64) (n int, zero bool) {
	slot := e.slotOf(id)
	base := uint32(slot * uint64(e.nd))
	for i := 0; i < int(e.mu.slotCount[slot]); i++ {
		f := metaFlags(e.mu.idx.meta[base+uint32(i)])
		if f&(flagValid|flagDirty) == flagValid|flagDirty {
			n++
		}
		if f&flagDiscard != 0 {
			zero = true
		}
	}
	return n, zero
}

// cleanableLocked reports whether the cleaner would take segment id. A
// pending zero record owes the backing device its zeros (discard.go), and
// only writeback pays that, so its segment is left to writeback.
func (e *Engine) cleanableLocked(id uint64) bool {
	if id > e.mu.writtenID {
		return false
	}
	n, zero := e.liveDirtyLocked(id)
	return !zero && n*100 <= e.mu.tunables.CleanThreshold*e.nd
}

// cleanWantedLocked reports whether the tail of the log should be cleaned
// rather than written back.
func (e *Engine) cleanWantedLocked() bool {
	t := e.mu.tunables
	if t.CleanThreshold == 0 || t.WriteAroundMode || e.mu.drains > 0 || e.mu.err != nil || e.mu.stop {
		return false
	}
	return e.pressedLocked() && e.cleanableLocked(e.mu.wbDoneID+1)
}

// bgHeldLocked reports whether background writeback waits for cleaning to
// have been quiet for cleanHold.
func (e *Engine) bgHeldLocked() bool {
	return !e.mu.cleanHold.IsZero() && e.clock.Now().Before(e.mu.cleanHold)
}

// cleanRoomLocked is how many entries the head of the log can still take,
// the cleaner's reserve included, without waiting for the tail.
func (e *Engine) cleanRoomLocked() int {
	room := 0
	if cur := e.mu.cur; cur != nil {
		room = e.nd - cur.count
	}
	if limit := e.mu.ckptWbID + e.nseg; limit >= e.mu.nextID {
		room += int(limit-e.mu.nextID+1) * e.nd
	}
	return room
}

type cleanItem struct {
	blk  uint64
	pos  uint32
	mask uint8
	data []byte
}

// cleanOnce cleans the oldest segments: at most maxSegs of them, each with
// live dirty blocks within clean_threshold, whose live blocks fit the room
// at the head. It reports whether it passed any segment.
func (e *Engine) cleanOnce(maxSegs int) (bool, error) {
	e.wbMu.Lock()
	defer e.wbMu.Unlock()
	began := e.clock.Now()
	e.mu.Lock()
	if !e.cleanWantedLocked() {
		e.mu.Unlock()
		return false, nil
	}
	from := e.mu.wbDoneID + 1
	room := e.cleanRoomLocked()
	var items []cleanItem
	var ends []int     // ends[k]: items of victims up to from+k end here
	var spans [][2]int // spans[k]: entries [lo, hi) of victim from+k to read
	to := from - 1
	for id := from; id < from+uint64(maxSegs) && id <= e.mu.wbDoneID+e.nseg/2 && e.cleanableLocked(id); id++ {
		slot := e.slotOf(id)
		base := uint32(slot * uint64(e.nd))
		n := len(items)
		lo, hi := 0, 0
		for i := 0; i < int(e.mu.slotCount[slot]); i++ {
			m := e.mu.idx.meta[base+uint32(i)]
			if metaFlags(m)&(flagValid|flagDirty) == flagValid|flagDirty {
				if len(items) == n {
					lo = i
				}
				hi = i + 1
				items = append(items, cleanItem{blk: metaBlock(m), pos: base + uint32(i), mask: metaMask(m)})
			}
		}
		if len(items) > room {
			items = items[:n]
			break
		}
		ends = append(ends, len(items))
		spans = append(spans, [2]int{lo, hi})
		to = id
	}
	e.mu.Unlock()
	if to < from {
		return false, nil
	}

	// Read the victims' live blocks: one I/O per victim, its span of live
	// entries (segments on the cache device never change in place, and
	// their slots cannot be reused while wbMu is held).
	need := 0
	for _, s := range spans {
		need += (s[1] - s[0]) * blockSize
	}
	buf := e.wbScratchBuf(need)
	at, k := 0, 0
	for v, s := range spans {
		if s[1] == s[0] {
			continue
		}
		id := from + uint64(v)
		b := buf[at : at+(s[1]-s[0])*blockSize]
		if _, err := e.cache.ReadAt(b, e.geo.DataBlockOffset(id, s[0])); err != nil {
			// The cache is dead from here on (health.go).
			return true, e.cacheFailed(fmt.Errorf("cleaning: read segment %d: %w", id, err))
		}
		for ; k < ends[v]; k++ {
			idx := int(uint64(items[k].pos) % uint64(e.nd))
			items[k].data = b[(idx-s[0])*blockSize:][:blockSize]
		}
		at += len(b)
	}

	// Copy them to the head, each only if it is still the newest copy.
	e.mu.Lock()
	done, copied := from-1, 0
	k = 0
copying:
	for v := range spans {
		for ; k < ends[v]; k++ {
			it := items[k]
			// Once Close has sealed the last buffer, nothing may enter the
			// log: the flusher writes no more, and a copy left in RAM
			// would be lost when Close's checkpoint passes its victim.
			if e.usableLocked() != nil || e.mu.stop {
				break copying
			}
			for !e.roomUpToLocked(e.mu.ckptWbID + e.nseg) {
				if e.usableLocked() != nil || e.mu.stop {
					break copying
				}
				if e.mu.nextID > e.mu.ckptWbID+e.nseg {
					break copying // no ring space left: writeback takes over
				}
				e.cond.Broadcast() // the flusher frees a RAM buffer
				e.waitLocked()
			}
			m := e.mu.idx.meta[it.pos]
			if metaFlags(m)&(flagValid|flagDirty) != flagValid|flagDirty || metaBlock(m) != it.blk {
				continue // rewritten (or written back) meanwhile
			}
			copy(e.mu.cur.block(e.mu.cur.count), it.data)
			e.commitLocked(it.blk, it.mask, flagValid|flagDirty, layout.KindData, 0)
			copied++
		}
		done = from + uint64(v)
	}
	e.mu.clean.CleanedBlocks += uint64(copied)
	if done < from {
		e.mu.Unlock()
		return false, nil
	}
	var needID uint64
	for id := from; id <= done; id++ {
		needID = max(needID, e.mu.supersede[e.slotOf(id)])
	}
	e.mu.wbDoneID = done
	e.mu.ckptNeed = max(e.mu.ckptNeed, needID)
	e.mu.clean.CleanedSegments += done - from + 1
	e.mu.cleanHold = e.clock.Now().Add(cleanHold)
	e.cond.Broadcast()
	e.mu.Unlock()

	err := e.makeDurable()
	if errors.Is(err, ErrClosed) {
		return true, nil // Close writes the last checkpoint
	}
	if err == nil {
		err = e.syncWithCheckpoint(done, false)
	}
	if err != nil {
		e.mu.Lock()
		e.failLocked(err)
		e.mu.Unlock()
		return true, err
	}
	e.mu.Lock()
	// The pace follows the ring space reclaimed (pace.go): a victim frees
	// its slot, its copies take some of the head back.
	e.noteBatchLocked(int(done-from+1)*e.nd-copied, e.clock.Now().Sub(began))
	e.mu.Unlock()
	return true, nil
}
