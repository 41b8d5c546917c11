package engine

import (
	"fmt"
	"math/bits"
	"sync/atomic"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

func sectorMask(first, n int) uint8 {
	return uint8((1<<n - 1) << first)
}

// copySectors copies the sectors in mask from src to dst (whole blocks).
func copySectors(dst, src []byte, mask uint8) {
	if mask == 0xff {
		copy(dst[:blockSize], src[:blockSize])
		return
	}
	for mask != 0 {
		s := bits.TrailingZeros8(mask)
		n := bits.TrailingZeros8(^(mask >> s))
		copy(dst[s*sectorSize:(s+n)*sectorSize], src[s*sectorSize:(s+n)*sectorSize])
		mask &^= sectorMask(s, n)
	}
}

// WriteAt writes p at off. It returns once the data is in a RAM buffer;
// Flush (or WriteFUA) makes it durable.
func (e *Engine) WriteAt(p []byte, off int64) (int, error) {
	if err := e.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	if dead, pass := e.dead(); dead {
		if pass {
			return e.writePassThrough(p, off)
		}
		return 0, e.deadErr()
	}
	if e.tunables().WriteAroundMode {
		return e.writeAround(p, off)
	}
	e.pace(len(p))
	e.mu.Lock()
	defer e.mu.Unlock()
	done := 0
	for done < len(p) {
		o := off + int64(done)
		blk := uint64(o / blockSize)
		first := int(o%blockSize) / sectorSize
		n := min(len(p)-done, blockSize-int(o%blockSize))
		if err := e.writeBlockLocked(blk, first, p[done:done+n]); err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// WriteFUA writes p at off and returns once it is durable.
func (e *Engine) WriteFUA(p []byte, off int64) error {
	if _, err := e.WriteAt(p, off); err != nil {
		return err
	}
	if _, pass := e.dead(); pass {
		return e.flushPassThrough()
	}
	if e.tunables().WriteAroundMode {
		return nil // write-around writes are durable on return
	}
	return e.Flush()
}

// writeBlockLocked writes sectors [first, first+len(data)/512) of blk.
func (e *Engine) writeBlockLocked(blk uint64, first int, data []byte) error {
	mask := sectorMask(first, len(data)/sectorSize)
	full := mask == 0xff
	var old []byte // a copy of an older dirty version read from the cache device
	var oldPos uint32
	var oldSid uint64
	for {
		if err := e.usableLocked(); err != nil {
			return err
		}
		if len(e.mu.cells) > 0 {
			delete(e.mu.cells, blk)
		}
		pos, ok := e.mu.idx.lookup(blk)
		var m uint64
		if ok {
			m = e.mu.idx.meta[pos]
		}
		// Overwrite in place when the block is already in the open buffer
		// and not yet on the device.
		if ok && e.mu.cur != nil && e.mu.slotID[uint64(pos)/uint64(e.nd)] == e.mu.cur.id &&
			int(uint64(pos)%uint64(e.nd)) >= e.mu.cur.frozen {
			i := int(uint64(pos) % uint64(e.nd))
			b := e.mu.cur.block(i)
			copy(b[first*sectorSize:], data)
			newMask := metaMask(m) | mask
			if metaFlags(m)&flagDirty == 0 {
				newMask = 0xff // a staged clean block holds every sector
				e.mu.nrDirty++
			}
			e.mu.idx.meta[pos] = packMeta(blk, newMask, flagValid|flagDirty)
			layout.PutMetablock(e.mu.cur.seg[:blockSize], i, layout.Metablock{Block: blk, Mask: newMask, Kind: layout.KindData})
			e.countWrite(true, true, full)
			return nil
		}
		var merge uint8
		var src []byte
		if ok && (metaFlags(m)&flagDirty != 0 || e.mu.slotID[uint64(pos)/uint64(e.nd)] > e.mu.ckptWbID) {
			// A clean copy the log still replays is merged too: it was
			// marked clean by writeback (a gap fill, a batch that
			// yielded to the cleaner) while an older discard record of
			// the block may still be in the log, and recovery re-applies
			// that discard to the backing device, zeroing the sectors
			// this partial write leaves out.
			merge = metaMask(m) &^ mask
		}
		if merge != 0 {
			if b, inRAM := e.inRAMLocked(pos); inRAM {
				src = b.block(int(uint64(pos) % uint64(e.nd)))
			} else if old != nil && pos == oldPos && e.mu.slotID[uint64(pos)/uint64(e.nd)] == oldSid {
				src = old // entries on the cache device never change in place
			} else {
				// Read the older copy without the lock, then check that
				// nothing moved while we were away.
				slot := uint64(pos) / uint64(e.nd)
				sid := e.mu.slotID[slot]
				off := e.geo.DataBlockOffset(sid, int(uint64(pos)%uint64(e.nd)))
				if old == nil {
					old = make([]byte, blockSize)
				}
				e.mu.Unlock()
				_, err := e.cache.ReadAt(old, off)
				e.mu.Lock()
				if err != nil {
					e.failLocked(err)
					return fmt.Errorf("%w: read cached block %d for a partial overwrite: %v", ErrIO, blk, err)
				}
				oldPos, oldSid = pos, sid
				continue // re-validate everything under the lock
			}
		}
		if retry, err := e.reserveLocked(); err != nil {
			return err
		} else if retry {
			continue
		}
		b := e.mu.cur.block(e.mu.cur.count)
		if !full && merge|mask != 0xff {
			clear(b) // sectors valid in neither copy: keep the segment deterministic
		}
		if merge != 0 {
			copySectors(b, src, merge)
		}
		copy(b[first*sectorSize:], data)
		e.commitLocked(blk, mask|merge, flagValid|flagDirty, layout.KindData, 0)
		e.countWrite(ok && metaFlags(m)&flagDirty != 0, false, full)
		return nil
	}
}

// dropLocked forgets the (already replaced or removed) entry at pos. by
// is the id of the segment whose entry replaces it, 0 when the replacement
// is durable on the backing device already (write-around).
func (e *Engine) dropLocked(pos uint32, by uint64) {
	m := e.mu.idx.meta[pos]
	if metaFlags(m)&flagDirty != 0 {
		e.mu.nrDirty--
		if slot := uint64(pos) / uint64(e.nd); by > e.mu.supersede[slot] {
			e.mu.supersede[slot] = by
		}
	}
	e.mu.idx.meta[pos] = m &^ (uint64(flagValid|flagDirty) << metaFlagShift)
}

func (e *Engine) countWrite(hit, inBuffer, full bool) {
	s := &e.mu.stats
	switch {
	case hit && inBuffer && full:
		s.WriteHitBufferFull++
	case hit && inBuffer:
		s.WriteHitBufferPartial++
	case hit && full:
		s.WriteHitCacheFull++
	case hit:
		s.WriteHitCachePartial++
	case full:
		s.WriteMissCacheFull++
	default:
		s.WriteMissCachePartial++
	}
}

// reserveLocked makes sure the open buffer has a free entry. retry means
// it had to wait (the lock was released), so the caller must look again.
func (e *Engine) reserveLocked() (retry bool, err error) {
	if e.roomLocked() {
		return false, nil
	}
	if e.mu.nextID > e.fgLimitLocked() {
		e.mu.urgent = true // the ring is full: writeback or cleaning must free a slot
		if e.mu.wbErr != nil {
			// Only writeback can free a slot and the backing device is
			// failing: surface the error instead of waiting for a device
			// that may never come back. Writes that fit keep succeeding;
			// a successful writeback clears wbErr.
			return false, e.mu.wbErr
		}
	}
	e.cond.Broadcast()
	e.waitLocked()
	return true, e.usableLocked()
}

// roomLocked makes room in the open buffer if that needs no waiting.
// The foreground leaves the cleaner its reserve of the ring (clean.go).
func (e *Engine) roomLocked() bool { return e.roomUpToLocked(e.fgLimitLocked()) }

// roomUpToLocked is roomLocked for a writer that may open segments up to
// id limit.
func (e *Engine) roomUpToLocked(limit uint64) bool {
	if cur := e.mu.cur; cur != nil && cur.count < e.nd {
		return true
	}
	e.sealLocked()
	id := e.mu.nextID
	if id-e.mu.writtenID > uint64(len(e.mu.bufs)) || id > limit {
		return false
	}
	e.openBufferLocked(id)
	return true
}

// commitLocked publishes the next entry of the open buffer, whose data
// block the caller has filled: metablock, then count (see buffer.go), then
// the index.
func (e *Engine) commitLocked(blk uint64, mask, flags uint8, kind layout.Kind, length uint32) uint32 {
	cur := e.mu.cur
	i := cur.count
	pos := uint32(e.slotOf(cur.id)*uint64(e.nd) + uint64(i))
	e.mu.idx.meta[pos] = packMeta(blk, mask, flags)
	layout.PutMetablock(cur.seg[:blockSize], i, layout.Metablock{Block: blk, Mask: mask, Kind: kind, Length: length})
	cur.count++
	atomic.StoreUint32(ctrlCount(cur.ctrl), uint32(cur.count))
	e.mu.clean.LogBlocks++
	if flags&flagValid != 0 {
		if oldPos, replaced := e.mu.idx.insert(pos); replaced {
			e.dropLocked(oldPos, cur.id)
		}
		if flags&flagDirty != 0 {
			e.mu.nrDirty++
		}
	}
	return pos
}

// openBufferLocked starts segment id in its RAM buffer, evicting the clean
// blocks its ring slot still caches from the previous lap.
func (e *Engine) openBufferLocked(id uint64) {
	slot := e.slotOf(id)
	base := uint32(slot * uint64(e.nd))
	for i := 0; i < int(e.mu.slotCount[slot]); i++ {
		pos := base + uint32(i)
		m := e.mu.idx.meta[pos]
		if metaFlags(m)&flagValid != 0 {
			if metaFlags(m)&flagDirty != 0 {
				panic(fmt.Sprintf("engine: reusing slot %d with dirty block %d (segment %d, written back to %d)", slot, metaBlock(m), e.mu.slotID[slot], e.mu.ckptWbID))
			}
			e.mu.idx.remove(metaBlock(m), pos)
		}
		if metaFlags(m)&flagDiscard != 0 {
			e.removeZeroLocked(pos)
		}
		e.mu.idx.meta[pos] = 0
	}
	e.mu.slotID[slot] = id
	e.mu.slotCount[slot] = 0
	e.mu.supersede[slot] = 0
	b := e.bufFor(id)
	setCtrl(b.ctrl, e.uuid, e.boot, id)
	clear(b.seg[:blockSize])
	b.id, b.count, b.sealed = id, 0, false
	b.frozen, b.frozenCRC, b.durable, b.want, b.copyNext = 0, 0, 0, 0, 0
	e.mu.cur = b
	e.mu.nextID = id + 1
}

// sealLocked closes the open buffer and hands it to the flusher.
func (e *Engine) sealLocked() {
	cur := e.mu.cur
	if cur == nil {
		return
	}
	cur.sealed = true
	e.mu.slotCount[e.slotOf(cur.id)] = uint16(cur.count)
	e.mu.sealedID = cur.id
	e.mu.cur = nil
	e.cond.Broadcast()
}
