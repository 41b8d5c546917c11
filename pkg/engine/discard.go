package engine

import (
	"fmt"
	"slices"
	"sort"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// TRIM and WRITE_ZEROES cost a request no backing I/O (layout: "Zero"
// and "Trim"). Both append a record to the log and drop the range's
// cached copies under the lock, so the log orders them with writes: a
// later write wins, an earlier one is dead, after a crash too.
//
// A trim owes the backing device nothing: its contents are unspecified
// until written again, so a filesystem's discard of a whole device (mkfs,
// fstrim) neither writes zeros to an HDD nor punches holes in a pool that
// promised the space. Only where the pool says the backing device is thin
// and asks for it (Options.BackingDiscard) is the discard passed down.
//
// A zero record is pending until writeback passes its segment: reads of
// blocks it covers that the cache holds no newer copy of are served as
// zeros, never from the backing device; writeback zeroes the ranges of its
// batch in sorted runs, without deallocating, before it writes the batch's
// blocks (later copies of the range may be among them) and before the
// backing flush and checkpoint that let the record go. Until a block's
// zeros are on the backing device no older copy of it may get there either
// by gap filling, which skips pending ranges.
//
// Partial blocks at the edges of a WRITE_ZEROES are written as zeros
// through the ordinary write path; those of a TRIM are left alone.

var zeroBlock = make([]byte, blockSize)

// Trim discards [off, off+length): its contents are unspecified until
// written again.
func (e *Engine) Trim(off, length int64) error {
	if err := e.checkRange(off, length); err != nil {
		return err
	}
	from := uint64((off + blockSize - 1) / blockSize)
	to := uint64((off + length) / blockSize)
	if dead, pass := e.dead(); dead {
		switch {
		case !pass:
			return e.deadErr()
		case e.backingDiscard != nil && from < to:
			return e.discardBacking(from, to-from)
		}
		return nil // nothing is owed for a trim
	}
	for from < to {
		n := min(to-from, maxDiscardBlocks)
		if err := e.rangeRecord(from, n, layout.KindTrim); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// WriteZeroes makes [off, off+length) read back as zeros.
func (e *Engine) WriteZeroes(off, length int64) error {
	if err := e.checkRange(off, length); err != nil {
		return err
	}
	if dead, pass := e.dead(); dead {
		if !pass {
			return e.deadErr()
		}
		return e.zeroPassThrough(off, length)
	}
	end := off + length
	firstFull := (off + blockSize - 1) / blockSize * blockSize
	lastFull := end / blockSize * blockSize
	if firstFull >= lastFull { // no whole block: plain zero writes
		return e.writeZeros(off, end)
	}
	if err := e.writeZeros(off, firstFull); err != nil {
		return err
	}
	if err := e.writeZeros(lastFull, end); err != nil {
		return err
	}
	if e.tunables().WriteAroundMode {
		return e.zeroAround(firstFull, lastFull)
	}
	for from, to := uint64(firstFull/blockSize), uint64(lastFull/blockSize); from < to; {
		n := min(to-from, maxDiscardBlocks)
		if err := e.rangeRecord(from, n, layout.KindZero); err != nil {
			return err
		}
		from += n
	}
	return nil
}

func (e *Engine) writeZeros(from, to int64) error {
	for from < to {
		n := min(to-from, blockSize-from%blockSize)
		if _, err := e.WriteAt(zeroBlock[:n], from); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// maxDiscardBlocks is the longest range one record describes.
const maxDiscardBlocks = 1 << 30

// rangeRecord appends a zero or trim record for blocks [blk, blk+n) and
// drops their cached copies.
func (e *Engine) rangeRecord(blk, n uint64, kind layout.Kind) error {
	passDown := kind == layout.KindTrim && e.backingDiscard != nil
	if e.tunables().WriteAroundMode && kind == layout.KindTrim {
		// Nothing is dirty in write-around mode and nothing goes through
		// the log: drop the copies, and pass the discard down if asked.
		if passDown {
			if err := e.discardBacking(blk, n); err != nil {
				return err
			}
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		if err := e.usableLocked(); err != nil {
			return err
		}
		e.dropRangeLocked(blk, blk+n, 0)
		return nil
	}
	for {
		// Make room first, without holding wbMu: waiting for a slot may
		// need a writeback batch.
		e.mu.Lock()
		for {
			if err := e.usableLocked(); err != nil {
				e.mu.Unlock()
				return err
			}
			if retry, err := e.reserveLocked(); err != nil {
				e.mu.Unlock()
				return err
			} else if !retry {
				break
			}
		}
		e.mu.Unlock()

		if passDown {
			// A batch in flight may hold older copies of the range: keep
			// it from writing them after the discard (wbMu).
			e.wbMu.Lock()
			if err := e.discardBacking(blk, n); err != nil {
				e.wbMu.Unlock()
				return err
			}
		}
		e.mu.Lock()
		err := e.usableLocked()
		if err == nil && !e.roomLocked() {
			// Others filled the buffer meanwhile; discarding again is harmless.
			e.mu.Unlock()
			if passDown {
				e.wbMu.Unlock()
			}
			continue
		}
		if err == nil {
			e.dropRangeLocked(blk, blk+n, e.mu.cur.id)
			clear(e.mu.cur.block(e.mu.cur.count))
			if kind == layout.KindZero {
				pos := e.commitLocked(blk, 0, flagDiscard, kind, uint32(n))
				e.addZeroLocked(pos, uint32(n))
			} else {
				e.commitLocked(blk, 0, 0, kind, uint32(n))
			}
		}
		e.mu.Unlock()
		if passDown {
			e.wbMu.Unlock()
		}
		return err
	}
}

// discardBacking passes a trim down to a thin backing device.
func (e *Engine) discardBacking(blk, n uint64) error {
	if err := e.backingDiscard.Discard(int64(blk)*blockSize, int64(n)*blockSize); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: discard backing range: %v", ErrIO, err)
	}
	return nil
}

// addZeroLocked records the zero record at pos (its block in the index's
// meta) as pending.
func (e *Engine) addZeroLocked(pos, n uint32) {
	e.mu.discards[pos] = n
	e.mu.zeroStale = true
}

// removeZeroLocked forgets a pending zero record: its slot is reused, or
// writeback has zeroed its range and flushed the backing device.
func (e *Engine) removeZeroLocked(pos uint32) {
	if _, ok := e.mu.discards[pos]; ok {
		delete(e.mu.discards, pos)
		e.mu.zeroStale = true
	}
}

// blockRange is blocks [from, to).
type blockRange struct{ from, to uint64 }

// zeroPendingLocked reports whether a pending zero record covers blk.
func (e *Engine) zeroPendingLocked(blk uint64) bool {
	if len(e.mu.discards) == 0 {
		return false
	}
	if e.mu.zeroStale {
		e.mu.zeroRuns = mergeRanges(e.mu.zeroRuns[:0], e.pendingZerosLocked(nil))
		e.mu.zeroStale = false
	}
	r := e.mu.zeroRuns
	i := sort.Search(len(r), func(i int) bool { return r[i].to > blk })
	return i < len(r) && r[i].from <= blk
}

// pendingZerosLocked appends the ranges of the pending zero records at
// positions for which keep is true (all when keep is nil).
func (e *Engine) pendingZerosLocked(keep func(pos uint32) bool) []blockRange {
	var out []blockRange
	for pos, n := range e.mu.discards {
		if keep != nil && !keep(pos) {
			continue
		}
		b := metaBlock(e.mu.idx.meta[pos])
		out = append(out, blockRange{b, b + uint64(n)})
	}
	return out
}

// mergeRanges sorts rs and merges overlapping and adjacent ranges into dst.
func mergeRanges(dst, rs []blockRange) []blockRange {
	slices.SortFunc(rs, func(a, b blockRange) int {
		switch {
		case a.from < b.from:
			return -1
		case a.from > b.from:
			return 1
		}
		return 0
	})
	for _, r := range rs {
		if k := len(dst) - 1; k >= 0 && r.from <= dst[k].to {
			dst[k].to = max(dst[k].to, r.to)
			continue
		}
		dst = append(dst, r)
	}
	return dst
}

// maxZeroIO bounds one backing Zero call of writeback.
const maxZeroIO = 64 << 20

// zeroRuns zeroes sorted, merged ranges on the backing device (writeback,
// holding wbMu). Zero never deallocates (blockdev.Device.Zero), so a pool
// that promised space keeps it.
func (e *Engine) zeroRuns(runs []blockRange) error {
	for _, r := range runs {
		for off, end := int64(r.from)*blockSize, int64(r.to)*blockSize; off < end; {
			n := min(end-off, maxZeroIO)
			if err := e.backing.Device.Zero(off, n); err != nil {
				return fmt.Errorf("zero backing blocks %d-%d: %w", off/blockSize, (off+n)/blockSize-1, err)
			}
			off += n
		}
	}
	return nil
}

// dropRangeLocked removes every cached copy of blocks [from, to).
// by is as for dropLocked.
func (e *Engine) dropRangeLocked(from, to, by uint64) {
	x := e.mu.idx
	if to-from <= uint64(x.n) {
		for blk := from; blk < to; blk++ {
			if pos, ok := x.lookup(blk); ok {
				x.remove(blk, pos)
				e.dropLocked(pos, by)
			}
			delete(e.mu.cells, blk)
		}
		return
	}
	for pos := range x.meta {
		m := x.meta[pos]
		if metaFlags(m)&flagValid != 0 && metaBlock(m) >= from && metaBlock(m) < to {
			x.remove(metaBlock(m), uint32(pos))
			e.dropLocked(uint32(pos), by)
		}
	}
	for blk := range e.mu.cells {
		if blk >= from && blk < to {
			delete(e.mu.cells, blk)
		}
	}
}
