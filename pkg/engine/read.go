package engine

import (
	"fmt"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// A read is planned under the lock and carried out without it: data in RAM
// buffers is copied at once, data on the cache or backing device is read
// afterwards, and the ring slots read from the cache are checked again
// under the lock (a slot reused meanwhile means the read is retried).

type cacheRead struct {
	blk  int    // block index within the request
	pos  uint32 // cache position
	sid  uint64 // segment id the slot held
	mask uint8
}

// ReadAt reads len(p) bytes at off: for every sector the newest
// acknowledged data.
func (e *Engine) ReadAt(p []byte, off int64) (int, error) {
	if err := e.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	for {
		if dead, _ := e.dead(); dead {
			if err := e.readDead(p, off); err != nil {
				return 0, err
			}
			return len(p), nil
		}
		retry, err := e.readOnce(p, off)
		if err != nil {
			return 0, err
		}
		if !retry {
			return len(p), nil
		}
	}
}

func (e *Engine) readOnce(p []byte, off int64) (retry bool, err error) {
	first := uint64(off / blockSize)
	last := uint64((off + int64(len(p)) - 1) / blockSize)
	nblk := int(last - first + 1)
	// backingMask[i]: sectors of block i to take from the backing device.
	backingMask := make([]uint8, nblk)
	var reads []cacheRead
	var stage []uint64 // full-block misses to stage into the read cache

	reqMask := func(i int) uint8 {
		lo, hi := 0, sectorsPerBlock
		if i == 0 {
			lo = int(off%blockSize) / sectorSize
		}
		if i == nblk-1 {
			hi = int((off+int64(len(p))-1)%blockSize)/sectorSize + 1
		}
		return sectorMask(lo, hi-lo)
	}
	// dst returns p's bytes for block i, as a view aligned to the block:
	// p starts at sector offset s0 of block 0.
	s0 := int(off%blockSize) / sectorSize
	copyIn := func(i int, src []byte, mask uint8) {
		for s := 0; s < sectorsPerBlock; s++ {
			if mask&(1<<s) == 0 {
				continue
			}
			at := (i*sectorsPerBlock + s - s0) * sectorSize
			copy(p[at:at+sectorSize], src[s*sectorSize:(s+1)*sectorSize])
		}
	}

	e.mu.Lock()
	if e.mu.closed {
		e.mu.Unlock()
		return false, ErrClosed
	}
	t := e.mu.tunables
	for i := 0; i < nblk; i++ {
		blk := first + uint64(i)
		want := reqMask(i)
		full := want == 0xff
		pos, ok := e.mu.idx.lookup(blk)
		if !ok {
			e.countRead(false, false, full)
			if e.zeroPendingLocked(blk) {
				// A zero record not yet on the backing device.
				copyIn(i, zeroBlock, want)
				continue
			}
			backingMask[i] = want
			if full && t.ReadCacheThreshold > 0 {
				stage = append(stage, blk)
			}
			continue
		}
		m := e.mu.idx.meta[pos]
		have := metaMask(m) & want
		backingMask[i] = want &^ have
		if backingMask[i] != 0 && e.zeroPendingLocked(blk) {
			// A copy newer than a pending zero record: its other
			// sectors are zeros.
			copyIn(i, zeroBlock, backingMask[i])
			backingMask[i] = 0
		}
		b, inRAM := e.inRAMLocked(pos)
		e.countRead(have == want, inRAM, full)
		if have == 0 {
			continue
		}
		if inRAM {
			copyIn(i, b.block(int(uint64(pos)%uint64(e.nd))), have)
		} else {
			reads = append(reads, cacheRead{blk: i, pos: pos, sid: e.mu.slotID[uint64(pos)/uint64(e.nd)], mask: have})
		}
	}
	// Sequential runs longer than the threshold are not cached.
	if len(stage) > 0 {
		if first == e.mu.seqEnd {
			e.mu.seqRun += uint64(nblk)
		} else {
			e.mu.seqRun = uint64(nblk)
		}
		if e.mu.seqRun > uint64(t.ReadCacheThreshold) {
			stage = nil
		}
		for _, blk := range stage {
			e.mu.cells[blk] = struct{}{}
		}
	}
	e.mu.seqEnd = last + 1
	e.mu.Unlock()

	scratch := make([]byte, blockSize*min(nblk, 256))
	// Backing reads, one I/O per run of blocks needing any sector.
	for i := 0; i < nblk; {
		if backingMask[i] == 0 {
			i++
			continue
		}
		j := i
		for j < nblk && backingMask[j] != 0 && j-i < 256 {
			j++
		}
		buf := scratch[:(j-i)*blockSize]
		if _, err := e.backing.ReadAt(buf, int64(first+uint64(i))*blockSize); err != nil {
			e.noteBackingError()
			e.cancelCells(stage)
			return false, fmt.Errorf("%w: backing device: %v", ErrIO, err)
		}
		for k := i; k < j; k++ {
			copyIn(k, buf[(k-i)*blockSize:], backingMask[k])
		}
		i = j
	}
	// Cache reads, one I/O per run of consecutive positions.
	for i := 0; i < len(reads); {
		j := i + 1
		for j < len(reads) && reads[j].pos == reads[j-1].pos+1 && reads[j].sid == reads[i].sid && j-i < 256 {
			j++
		}
		buf := scratch[:(j-i)*blockSize]
		idx := int(uint64(reads[i].pos) % uint64(e.nd))
		if _, err := e.cache.ReadAt(buf, e.geo.DataBlockOffset(reads[i].sid, idx)); err != nil {
			// The cache is dead from here on (health.go): the read is
			// served again as a dead cache allows (ReadAt).
			e.cancelCells(stage)
			_ = e.cacheFailed(fmt.Errorf("read segment %d: %w", reads[i].sid, err))
			return true, nil
		}
		for k := i; k < j; k++ {
			copyIn(reads[k].blk, buf[(k-i)*blockSize:], reads[k].mask)
		}
		i = j
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, r := range reads {
		if e.mu.slotID[uint64(r.pos)/uint64(e.nd)] != r.sid {
			for _, blk := range stage {
				delete(e.mu.cells, blk)
			}
			return true, nil
		}
	}
	for _, blk := range stage {
		i := int(blk - first)
		e.stageLocked(blk, p[(i*sectorsPerBlock-s0)*sectorSize:][:blockSize])
	}
	return false, nil
}

func (e *Engine) cancelCells(stage []uint64) {
	if len(stage) == 0 {
		return
	}
	e.mu.Lock()
	for _, blk := range stage {
		delete(e.mu.cells, blk)
	}
	e.mu.Unlock()
}

// stageLocked appends a clean copy of blk, read from the backing device
// into data, unless a write or discard touched blk since the read began
// (which removed its cell), or staging would have to wait for space.
func (e *Engine) stageLocked(blk uint64, data []byte) {
	if _, ok := e.mu.cells[blk]; !ok {
		return
	}
	delete(e.mu.cells, blk)
	if e.usableLocked() != nil {
		return
	}
	if _, ok := e.mu.idx.lookup(blk); ok {
		return
	}
	if !e.roomLocked() {
		return
	}
	copy(e.mu.cur.block(e.mu.cur.count), data)
	e.commitLocked(blk, 0xff, flagValid, layout.KindClean, 0)
}

func (e *Engine) countRead(hit, inBuffer, full bool) {
	s := &e.mu.stats
	switch {
	case hit && inBuffer && full:
		s.ReadHitBufferFull++
	case hit && inBuffer:
		s.ReadHitBufferPartial++
	case hit && full:
		s.ReadHitCacheFull++
	case hit:
		s.ReadHitCachePartial++
	case inBuffer && full:
		s.ReadMissBufferFull++
	case inBuffer:
		s.ReadMissBufferPartial++
	case full:
		s.ReadMissCacheFull++
	default:
		s.ReadMissCachePartial++
	}
}

func (e *Engine) noteBackingError() {
	e.mu.Lock()
	e.mu.backingErrors++
	e.mu.Unlock()
}
