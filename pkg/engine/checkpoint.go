package engine

import (
	"fmt"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
)

// syncWithCheckpoint writes a checkpoint record and flushes the cache
// device, making both it and every earlier write durable. The record
// claims only what was already durable before (last_flushed_id) and
// written back with the backing flushed (wb).
func (e *Engine) syncWithCheckpoint(wb uint64, clean bool) error {
	return e.writeCheckpoint(wb, 0, clean)
}

// checkpointUpTo is syncWithCheckpoint for a caller that knows segments
// up to flushed are durable before it has published that.
func (e *Engine) checkpointUpTo(wb, flushed uint64) error {
	return e.writeCheckpoint(wb, flushed, false)
}

func (e *Engine) writeCheckpoint(wb, flushedUpTo uint64, clean bool) error {
	e.ckptMu.Lock()
	defer e.ckptMu.Unlock()
	e.mu.Lock()
	// Callers read wb before taking ckptMu: a concurrent checkpoint may
	// have recorded a later one since. Never step back (restating a
	// durable checkpoint's wb is always safe), or recovery would look for
	// segments whose slots are reused already.
	wb = max(wb, e.mu.ckptWbID)
	flushed := max(e.mu.flushedID, flushedUpTo)
	if clean {
		// Close has made everything durable already: the log ends here.
		flushed = e.mu.writtenID
	}
	e.mu.Unlock()
	e.ckptSeq++
	c := layout.Checkpoint{UUID: e.uuid, Seq: e.ckptSeq, LastWritebackID: wb, LastFlushedID: flushed,
		Clean: clean, Epoch: e.epoch, Time: e.clock.Now().UnixNano()}
	buf := make([]byte, blockSize)
	c.Encode(buf)
	if _, err := e.cache.WriteAt(buf, layout.CheckpointOffsets[e.ckptSeq%2]); err != nil {
		return fmt.Errorf("write checkpoint: %w", err)
	}
	if err := e.cache.Flush(); err != nil {
		return fmt.Errorf("flush cache device: %w", err)
	}
	e.mu.Lock()
	if wb > e.mu.ckptWbID {
		e.mu.ckptWbID = wb
	}
	e.mu.ckptFlID = max(e.mu.ckptFlID, flushed)
	e.mu.lastCkpt = e.clock.Now()
	e.cond.Broadcast()
	e.mu.Unlock()
	return nil
}

// makeDurable makes the segments that replaced written-back entries
// durable on the cache device (ckptNeed), before a checkpoint lets
// recovery skip the replaced ones. Without it, a write flushed, then
// overwritten in a RAM buffer, then skipped by writeback (the overwrite is
// the newest copy) would be lost by a crash after the checkpoint: neither
// the backing device nor the log would hold it.
func (e *Engine) makeDurable() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	need := e.mu.ckptNeed
	if e.mu.flushedID >= need {
		return nil
	}
	if cur := e.mu.cur; cur != nil && cur.id <= need && cur.count > 0 {
		if cur.count < e.nd {
			e.mu.nrPartialFlushed++
		}
		e.sealLocked()
	}
	if e.mu.flushReq < need {
		e.mu.flushReq = need
		e.cond.Broadcast()
	}
	for e.mu.flushedID < need {
		if e.mu.err != nil {
			return e.mu.err
		}
		if e.mu.stop {
			return ErrClosed
		}
		e.waitLocked()
	}
	return nil
}
