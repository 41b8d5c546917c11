package engine

import "fmt"

// writeBackingRLocked is a foreground write of p at off to the backing
// device: metered (backing utilisation counts it) and, when it fails,
// noted as a backing error. The caller holds wbMu for reading, so that a
// writeback batch in flight cannot write an older copy over it.
func (e *Engine) writeBackingRLocked(p []byte, off int64) error {
	e.backing.begin()
	_, err := e.backing.WriteAt(p, off)
	e.backing.end()
	if err != nil {
		e.noteBackingError()
	}
	return err
}

// writeAround writes straight to the backing device, durably, and drops
// cached copies of the blocks.
func (e *Engine) writeAround(p []byte, off int64) (int, error) {
	// A batch in flight may hold an older cached copy of these blocks; it
	// must not write it over this write (wbMu).
	e.wbMu.RLock()
	defer e.wbMu.RUnlock()
	if err := e.writeBackingRLocked(p, off); err != nil {
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
	if err := e.backing.Zero(from, to-from); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: zero backing range: %v", ErrIO, err)
	}
	// Write-around acknowledges only what is durable on the backing
	// device: a failed flush fails the request.
	if err := e.backing.Flush(); err != nil {
		e.noteBackingError()
		return fmt.Errorf("%w: flush backing device: %v", ErrIO, err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dropRangeLocked(uint64(from/blockSize), uint64(to/blockSize), 0)
	return nil
}
