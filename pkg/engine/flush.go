package engine

import (
	"fmt"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// Flush returns once every write acknowledged before it was called is
// durable on the cache device. Concurrent calls share one segment write
// and one device flush.
func (e *Engine) Flush() error {
	if _, pass := e.dead(); pass {
		return e.flushPassThrough()
	}
	start := e.clock.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usableLocked(); err != nil {
		return err
	}
	// A part-full open buffer is written where it is and stays open
	// (partial write); a full one is sealed.
	var pid uint64
	var pcount int
	if cur := e.mu.cur; cur != nil && cur.count > 0 {
		if cur.count < e.nd {
			if cur.durable < cur.count {
				e.mu.nrPartialFlushed++
			}
			pid, pcount = cur.id, cur.count
			cur.want = max(cur.want, cur.count)
		} else {
			e.sealLocked()
		}
	}
	target := e.mu.sealedID
	if e.mu.flushReq < target {
		e.mu.flushReq = target
	}
	e.cond.Broadcast()
	for e.mu.flushedID < target || !e.partialDurableLocked(pid, pcount) {
		if e.mu.err != nil {
			return e.mu.err
		}
		e.waitLocked()
	}
	e.mu.flushCount++
	e.mu.flushLatency += e.clock.Now().Sub(start)
	return nil
}

// partialDurableLocked reports whether the first n entries of segment id,
// open when a Flush asked for them, are durable. If the segment has been
// sealed since, that Flush now waits for the sealed segment instead.
func (e *Engine) partialDurableLocked(id uint64, n int) bool {
	if id == 0 || e.mu.flushedID >= id {
		return true
	}
	b := e.bufFor(id)
	if b.id == id && !b.sealed {
		return b.durable >= n
	}
	if e.mu.flushReq < id {
		e.mu.flushReq = id
		e.cond.Broadcast()
	}
	return false
}

// partialWantedLocked reports whether a Flush waits for entries of the
// open buffer that are not on the device yet.
func (e *Engine) partialWantedLocked() bool {
	cur := e.mu.cur
	return cur != nil && cur.want > cur.frozen
}

// flusher writes sealed buffers to the cache device in id order, writes
// the open buffer's new entries when a Flush waits for them, and makes
// both durable when a Flush asks.
func (e *Engine) flusher() {
	defer e.wg.Done()
	e.mu.Lock()
	defer e.mu.Unlock()
	hdr := make([]byte, blockSize) // header of a partial write: writers keep adding metablocks to the buffer's
	for {
		for !e.flushWantedLocked() && e.mu.err == nil && !e.mu.stop {
			e.cond.Wait()
		}
		if e.mu.err != nil || (e.mu.stop && !e.flushWantedLocked()) {
			return
		}
		e.flushOnceLocked(hdr)
	}
}

// flushWantedLocked reports whether the flusher has work: sealed buffers
// to write, a requested flush to make durable, or entries of the open
// buffer a Flush waits for.
func (e *Engine) flushWantedLocked() bool {
	return e.mu.writtenID != e.mu.sealedID || e.mu.flushReq > e.mu.flushedID || e.partialWantedLocked()
}

// flushOnceLocked is one round of the flusher (the flusher goroutine, or
// a caller in stepping mode: step.go): it writes the sealed buffers, then
// the open buffer's new entries if a Flush waits for them, and makes them
// durable if asked. It releases mu during device I/O. hdr is the
// caller's scratch block for a partial write's header.
func (e *Engine) flushOnceLocked(hdr []byte) {
	from, to := e.mu.writtenID+1, e.mu.sealedID
	bufs := make([]*buffer, 0, to-from+1)
	for id := from; id <= to; id++ {
		bufs = append(bufs, e.bufFor(id))
	}
	e.mu.Unlock()
	var err error
	for _, b := range bufs {
		// Sealed: nothing changes the buffer any more.
		if _, err = e.writeSegment(b.id, b.seg[:blockSize], b.seg, b.frozen, b.count, b.copyNext, b.frozenCRC); err != nil {
			break
		}
	}
	e.mu.Lock()
	if err != nil {
		e.failLocked(err)
		return
	}
	e.mu.writtenID = to
	e.cond.Broadcast()

	// The open buffer follows the sealed ones in the log, so its
	// partial write goes after them, and is made durable (below)
	// before the buffer is written again: a header copy is rewritten
	// only when the other one is durable.
	var p *buffer
	var pFrom, pCount, pCopy int
	var pCRC uint32
	if cur := e.mu.cur; e.partialWantedLocked() && cur.id == to+1 {
		p, pFrom, pCount, pCopy, pCRC = cur, cur.frozen, cur.count, cur.copyNext, cur.frozenCRC
		cur.frozen = pCount // from now on writers leave these entries alone
		copy(hdr, cur.seg[:blockSize])
	}
	if e.mu.flushReq <= e.mu.flushedID && p == nil {
		return
	}
	wb := e.mu.wbDoneID
	if e.mu.ckptNeed > e.mu.flushedID {
		// Segments that replaced written-back entries are not durable
		// yet (they may be among those just written): this record
		// must not let recovery skip the replaced entries (makeDurable).
		wb = e.mu.ckptWbID
	}
	e.mu.Unlock()
	if p != nil {
		pCRC, err = e.writeSegment(p.id, hdr, p.seg, pFrom, pCount, pCopy, pCRC)
	}
	if err == nil {
		err = e.syncWithCheckpoint(wb, false)
	}
	e.mu.Lock()
	if err != nil {
		e.failLocked(err)
		return
	}
	// The record just written claims only what was durable before
	// this flush. After a burst of segments (a bulk write, then one
	// flush) that would leave a crash recovery checking the data of
	// all of them; a second record, before the waiters are released,
	// bounds that to a few segments. An fsync-heavy load, a segment
	// or less per flush, never pays for it.
	if to > e.mu.ckptFlID+max(8, e.nseg/64) {
		if e.mu.ckptNeed > to {
			wb = e.mu.ckptWbID
		}
		e.mu.Unlock()
		err = e.checkpointUpTo(wb, to)
		e.mu.Lock()
		if err != nil {
			e.failLocked(err)
			return
		}
	}
	e.mu.flushedID = to
	if p != nil {
		p.frozenCRC, p.copyNext, p.durable = pCRC, 1-pCopy, pCount
	}
	e.cond.Broadcast()
}

// writeSegment writes entries [from, count) of segment id from its image
// seg, then hdr, sealed to describe all count entries, into header copy c.
// Entries before from are on the device already, unchanged, and crc is
// their data checksum. hdr holds the segment's metablocks: seg's own
// header block, or a copy of it while writers still add entries. It
// returns the data checksum of all count entries.
func (e *Engine) writeSegment(id uint64, hdr, seg []byte, from, count, c int, crc uint32) (uint32, error) {
	for i := from; i < count; i++ {
		if layout.GetMetablock(hdr, i).Kind.HasData() {
			crc = layout.UpdateDataCRC(crc, seg[(1+i)*blockSize:(2+i)*blockSize])
		}
	}
	layout.SealSegmentHeader(hdr, id, e.tag, e.epoch, count, crc)
	if c == 0 && from == 0 && &hdr[0] == &seg[0] {
		// The common case, a segment written once: one write.
		if _, err := e.cache.WriteAt(seg[:(1+count)*blockSize], e.geo.SegmentOffset(id)); err != nil {
			return 0, fmt.Errorf("write segment %d: %w", id, err)
		}
		return crc, nil
	}
	if from < count {
		if _, err := e.cache.WriteAt(seg[(1+from)*blockSize:(1+count)*blockSize], e.geo.DataBlockOffset(id, from)); err != nil {
			return 0, fmt.Errorf("write segment %d: %w", id, err)
		}
	}
	if _, err := e.cache.WriteAt(hdr[:blockSize], e.geo.HeaderOffset(id, c)); err != nil {
		return 0, fmt.Errorf("write segment %d header copy %d: %w", id, c, err)
	}
	return crc, nil
}
