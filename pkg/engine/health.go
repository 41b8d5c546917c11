package engine

import (
	"errors"
	"fmt"

	"k8s.io/klog/v2"
)

// A dead cache device (see the package doc, "A dead cache device"). The
// first error the cache device returns (a write, a flush or a read) makes
// the cache dead for the rest of the open: nothing is written to it any
// more, so it stays as it was for `writeboost check` and recovery, and the
// flusher, writeback and the cleaner stop. What the volume still serves
// is decided once, at that moment:
//
//   - pass-through: nothing was owed to the backing device (no dirty
//     block, no pending zero record) and the newest durable checkpoint
//     passes every segment that may be on the cache device, so no later
//     recovery of this cache can replay an older copy over the backing
//     device. Reads and writes go to the backing device, Flush flushes it.
//     This is bcache's stop_when_cache_set_failed=auto for a clean cache,
//     and Open CAS's fallback to the core device.
//   - failed: dirty data is stranded on the dead device (or in RAM
//     buffers it can no longer be made durable from). Reads of a sector
//     whose newest data is stranded fail with EIO: the backing device
//     holds an older copy, and serving it would hand a filesystem stale
//     metadata (bcache stops such a device; forcing it to run corrupts
//     the filesystem). Reads of every other sector pass through to the
//     backing device. Writes, trims, zeroes and flushes fail with EIO: a
//     write to the backing device could be undone by a later recovery of
//     the cache that replays an older copy, and a flush cannot make the
//     stranded writes durable.
//
// A cache that failed with dirty data was not lost yet: stop the volume,
// run `writeboost check --cache PATH` on the device, and if it reads, open
// it again (recovery replays the log, writeback then empties it); if it
// does not, the stranded writes are lost: format the cache afresh
// (--reformat) and check the filesystem on the volume.

// HealthState is the volume's state as a person would summarise it.
type HealthState string

const (
	// HealthOK: nothing to report.
	HealthOK HealthState = "ok"
	// HealthDegraded: the volume serves every request, but something
	// needs attention (see the causes).
	HealthDegraded HealthState = "degraded"
	// HealthPassThrough: the cache device failed with nothing dirty; the
	// volume is served from the backing device alone, uncached.
	HealthPassThrough HealthState = "pass-through"
	// HealthFailed: the cache device failed with dirty data on it; those
	// blocks and every write fail with EIO.
	HealthFailed HealthState = "failed"
)

// HealthStates lists every state, for metrics that report each.
var HealthStates = []HealthState{HealthOK, HealthDegraded, HealthPassThrough, HealthFailed}

// CauseKind names one reason the volume is not healthy; the names are
// stable (metrics labels).
type CauseKind string

const (
	// CauseCacheFailed: the cache device returned an I/O error and is no
	// longer used (pass-through or failed: see HealthState).
	CauseCacheFailed CauseKind = "cache_failed"
	// CauseBackingIOErrors: the backing device returned I/O errors since
	// the volume was opened.
	CauseBackingIOErrors CauseKind = "backing_io_errors"
	// CauseWritebackFailing: writeback to the backing device fails and is
	// being retried.
	CauseWritebackFailing CauseKind = "writeback_failing"
	// CauseLogFull: the cache's log is nearly full: writes are slowed to
	// the speed of writeback, or wait for it.
	CauseLogFull CauseKind = "log_full"
	// CauseLostFlushedSegments: recovery found segments the checkpoint
	// recorded as durable blank or corrupt: the cache device lost writes
	// it had acknowledged as flushed.
	CauseLostFlushedSegments CauseKind = "lost_flushed_segments"
)

// CauseKinds lists every cause, for metrics that report each.
var CauseKinds = []CauseKind{CauseCacheFailed, CauseBackingIOErrors, CauseWritebackFailing, CauseLogFull, CauseLostFlushedSegments}

// Cause is one reason the volume is not healthy, with a message for a
// person.
type Cause struct {
	Kind    CauseKind `json:"kind"`
	Message string    `json:"message"`
}

// Health is the volume's state and why.
type Health struct {
	State  HealthState `json:"state"`
	Causes []Cause     `json:"causes,omitempty"`
	// StrandedBlocks: blocks whose newest data was only on the cache
	// device (or in RAM buffers) when it failed; reads of them fail.
	StrandedBlocks uint64 `json:"stranded_blocks,omitempty"`
	// LostFlushedSegments: segments the checkpoint recorded as durable
	// that recovery found blank or corrupt when this volume was opened.
	LostFlushedSegments uint64 `json:"lost_flushed_segments,omitempty"`
}

// Has reports whether kind is among h's causes.
func (h Health) Has(kind CauseKind) bool {
	for _, c := range h.Causes {
		if c.Kind == kind {
			return true
		}
	}
	return false
}

// Message joins the causes' messages, for a one-line report.
func (h Health) Message() string {
	if len(h.Causes) == 0 {
		return "healthy"
	}
	s := ""
	for i, c := range h.Causes {
		if i > 0 {
			s += "; "
		}
		s += c.Message
	}
	return s
}

// Health returns the volume's state and its causes.
func (e *Engine) Health() Health {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.healthLocked()
}

func (e *Engine) healthLocked() Health {
	h := Health{State: HealthOK, LostFlushedSegments: e.mu.lost.n}
	add := func(k CauseKind, format string, args ...any) {
		h.Causes = append(h.Causes, Cause{Kind: k, Message: fmt.Sprintf(format, args...)})
	}
	if e.mu.err != nil {
		if e.mu.passThrough {
			h.State = HealthPassThrough
			add(CauseCacheFailed, "the cache device failed (%v) with nothing dirty: the volume is served from the backing device alone, uncached; the cache device is no longer written (replace it, see the recovery notes)", e.mu.cacheCause)
		} else {
			h.State, h.StrandedBlocks = HealthFailed, e.mu.stranded
			add(CauseCacheFailed, "the cache device failed (%v) with %d dirty blocks not yet written back: reads of those blocks and every write fail with I/O errors; the cache device is left untouched for `writeboost check` and recovery", e.mu.cacheCause, e.mu.stranded)
		}
	}
	if e.mu.lost.n > 0 {
		add(CauseLostFlushedSegments, "recovery found %d log segments (ids %d-%d) that the cache had recorded as durable blank or corrupt: the cache device lost writes it acknowledged as flushed (does it ignore flushes?); data written shortly before the last crash may be lost: check the filesystem", e.mu.lost.n, e.mu.lost.from, e.mu.lost.to)
	}
	if e.mu.wbErr != nil && e.mu.err == nil {
		add(CauseWritebackFailing, "writeback to the backing device is failing and being retried (%v): dirty data stays in the cache, and writes will fail once the cache's log is full", e.mu.wbErr)
	}
	if e.mu.backingErrors > 0 {
		add(CauseBackingIOErrors, "%d I/O errors on the backing device since the volume was opened", e.mu.backingErrors)
	}
	if e.mu.err == nil {
		used := 100 * float64(e.mu.nextID-1-min(e.mu.ckptWbID, e.mu.nextID-1)) / float64(e.nseg)
		switch {
		case e.mu.urgent && e.mu.nextID > e.fgLimitLocked():
			add(CauseLogFull, "the cache's log is full (%.0f%% of it not yet written back): writes wait for writeback to the backing device", used)
		case e.paceDelayLocked() > 0:
			add(CauseLogFull, "the cache's log is %.0f%% full: writes are slowed to the speed of writeback to the backing device", used)
		}
	}
	if h.State == HealthOK && len(h.Causes) > 0 {
		h.State = HealthDegraded
	}
	return h
}

// ErrCacheFailed is wrapped by every error that comes of the cache
// device's failure (with ErrIO): requests refused since, and Close, which
// cannot record a clean shutdown on a dead device. Callers that stop a
// volume use it to tell that retrying the close cannot do better.
var ErrCacheFailed = errors.New("cache device failed")

// errCacheDead is ErrCacheFailed inside the engine, where it also tells
// writeback that an error was the cache device's, not the backing's.
var errCacheDead = ErrCacheFailed

// cacheFailed records err, returned by the cache device, as the failure
// of the cache and returns an error for the caller.
func (e *Engine) cacheFailed(err error) error {
	e.mu.Lock()
	e.failLocked(err)
	e.mu.Unlock()
	return fmt.Errorf("%w: %w: %v", ErrIO, errCacheDead, err)
}

// failLocked records a cache device failure. The first one decides what
// the volume still serves (above); later ones are only counted.
func (e *Engine) failLocked(err error) {
	e.mu.cacheErrors++
	defer e.cond.Broadcast()
	if e.mu.err != nil {
		return
	}
	e.mu.err = fmt.Errorf("%w: %w: %v", ErrIO, ErrCacheFailed, err)
	e.mu.cacheCause = err
	// Segments that may be on the device: every sealed one, and the open
	// one once a partial write of it has started.
	onDevice := e.mu.sealedID
	if cur := e.mu.cur; cur != nil && cur.frozen > 0 {
		onDevice = max(onDevice, cur.id)
	}
	e.mu.passThrough = !e.owedLocked() && e.mu.ckptWbID >= onDevice
	if e.mu.passThrough {
		// No RAM buffer holds anything owed: make sure a later open
		// does not replay one over writes passed through meanwhile.
		for _, b := range e.mu.bufs {
			clear(b.ctrl[:8])
		}
		klog.ErrorS(err, "cache device failed with nothing dirty; serving the volume from the backing device alone (pass-through), the cache device is no longer written",
			"volume", e.name)
		return
	}
	e.mu.stranded = e.mu.nrDirty
	for _, n := range e.mu.discards {
		e.mu.stranded += uint64(n)
	}
	klog.ErrorS(err, "cache device failed with dirty data on it; reads of the dirty blocks and all writes fail with EIO, the cache device is left untouched for writeboost check and recovery",
		"volume", e.name, "dirtyBlocks", e.mu.nrDirty, "pendingZeroRecords", len(e.mu.discards), "lastWritebackID", e.mu.wbDoneID, "checkpointWritebackID", e.mu.ckptWbID)
}

// deadLocked reports whether the cache device failed, and if so whether
// the volume passes I/O through to the backing device.
func (e *Engine) deadLocked() (dead, passThrough bool) {
	return e.mu.err != nil, e.mu.err != nil && e.mu.passThrough
}

func (e *Engine) dead() (dead, passThrough bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.mu.closed {
		return false, false // callers see ErrClosed on their own path
	}
	return e.deadLocked()
}

// readDead serves a read after the cache failed: from the backing
// device, unless a sector asked for has its newest data stranded.
func (e *Engine) readDead(p []byte, off int64) error {
	first := uint64(off / blockSize)
	last := uint64((off + int64(len(p)) - 1) / blockSize)
	e.mu.Lock()
	if e.mu.closed {
		e.mu.Unlock()
		return ErrClosed
	}
	for blk := first; blk <= last; blk++ {
		lo, hi := 0, sectorsPerBlock
		if blk == first {
			lo = int(off%blockSize) / sectorSize
		}
		if blk == last {
			hi = int((off+int64(len(p))-1)%blockSize)/sectorSize + 1
		}
		want := sectorMask(lo, hi-lo)
		stranded := e.zeroPendingLocked(blk)
		if pos, ok := e.mu.idx.lookup(blk); ok {
			m := e.mu.idx.meta[pos]
			stranded = stranded || (metaFlags(m)&flagDirty != 0 && metaMask(m)&want != 0)
		}
		if stranded {
			err := e.mu.err
			e.mu.Unlock()
			return fmt.Errorf("%w: block %d: its newest data is only on the failed cache device (not written back), and the backing device's copy is stale: %v", ErrIO, blk, err)
		}
	}
	e.mu.Unlock()
	if _, err := e.backing.ReadAt(p, off); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: backing device: %v", ErrIO, err)
	}
	return nil
}

// writePassThrough writes p to the backing device after the cache failed
// with nothing dirty. As with any disk, Flush makes it durable.
func (e *Engine) writePassThrough(p []byte, off int64) (int, error) {
	// A batch that was in flight when the cache failed must not write an
	// older copy over this write.
	e.wbMu.RLock()
	defer e.wbMu.RUnlock()
	if err := e.writeBackingRLocked(p, off); err != nil {
		return 0, fmt.Errorf("%w: backing device (cache failed, pass-through): %v", ErrIO, err)
	}
	return len(p), nil
}

// zeroPassThrough zeroes [off, off+length) of the backing device after
// the cache failed with nothing dirty.
func (e *Engine) zeroPassThrough(off, length int64) error {
	e.wbMu.RLock()
	defer e.wbMu.RUnlock()
	if err := e.backing.Zero(off, length); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: zero backing range (cache failed, pass-through): %v", ErrIO, err)
	}
	return nil
}

// flushPassThrough flushes the backing device after the cache failed with
// nothing dirty.
func (e *Engine) flushPassThrough() error {
	if err := e.backing.Flush(); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: flush backing device (cache failed, pass-through): %v", ErrIO, err)
	}
	return nil
}

// deadErr is the error of a request refused because the cache failed
// with dirty data on it.
func (e *Engine) deadErr() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return fmt.Errorf("%w (%d dirty blocks stranded on it: writes are refused so that no later recovery of the cache can undo them)", e.mu.err, e.mu.stranded)
}
