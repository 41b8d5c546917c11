package engine

import (
	"fmt"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// Discards (TRIM and WRITE_ZEROES) are ordered with the log. The backing
// device is zeroed first, while the index still points reads of the range
// at their cached copies; then, under the lock, a discard record is
// appended to the log and the range's cached copies are dropped. Writeback
// is kept off the range meanwhile (wbMu). After a crash, recovery replays
// the record: copies older than it are dropped and the range is zeroed on
// the backing device again, so a discarded range never shows data older
// than the discard, and a later write still wins. Partial blocks at the
// edges are written as zeros through the ordinary write path.

var zeroBlock = make([]byte, blockSize)

// Trim discards [off, off+length): it reads back as zeros afterwards.
func (e *Engine) Trim(off, length int64) error { return e.WriteZeroes(off, length) }

// WriteZeroes makes [off, off+length) read back as zeros.
func (e *Engine) WriteZeroes(off, length int64) error {
	if err := e.checkRange(off, length); err != nil {
		return err
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
	return e.discardBlocks(uint64(firstFull/blockSize), uint64(lastFull/blockSize))
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

// maxDiscardBlocks is the longest range one discard record describes.
const maxDiscardBlocks = 1 << 30

func (e *Engine) discardBlocks(from, to uint64) error {
	for from < to {
		n := min(to-from, maxDiscardBlocks)
		if err := e.discardRecord(from, n); err != nil {
			return err
		}
		from += n
	}
	return nil
}

func (e *Engine) discardRecord(blk, n uint64) error {
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

		e.wbMu.Lock()
		if err := e.backing.Zero(int64(blk)*blockSize, int64(n)*blockSize); err != nil {
			e.wbMu.Unlock()
			e.noteBackingError()
			return fmt.Errorf("%w: zero backing range: %v", ErrIO, err)
		}
		e.mu.Lock()
		if err := e.usableLocked(); err != nil {
			e.mu.Unlock()
			e.wbMu.Unlock()
			return err
		}
		if !e.roomLocked() {
			// Others filled the buffer meanwhile; zeroing again is harmless.
			e.mu.Unlock()
			e.wbMu.Unlock()
			continue
		}
		e.dropRangeLocked(blk, blk+n, e.mu.cur.id)
		clear(e.mu.cur.block(e.mu.cur.count))
		pos := e.commitLocked(blk, 0, flagDiscard, layout.KindDiscard, uint32(n))
		e.mu.discards[pos] = uint32(n)
		e.mu.Unlock()
		e.wbMu.Unlock()
		return nil
	}
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
