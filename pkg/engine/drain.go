package engine

import (
	"context"
	"time"
)

// Drain writes back every dirty block, the RAM buffers included, and
// returns when nothing is dirty. progress, if set, is called as it goes.
func (e *Engine) Drain(ctx context.Context, progress func(DrainProgress)) error {
	e.mu.Lock()
	if err := e.usableLocked(); err != nil {
		e.mu.Unlock()
		return err
	}
	e.mu.drains++
	initial := e.mu.nrDirty
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.mu.drains--
		e.mu.Unlock()
	}()
	for {
		e.mu.Lock()
		if cur := e.mu.cur; cur != nil && cur.count > 0 {
			e.sealLocked()
		}
		e.cond.Broadcast()
		dirty := e.mu.nrDirty
		owed := e.owedLocked()
		err := e.mu.err
		if err == nil && e.mu.closed {
			err = ErrClosed
		}
		if err == nil && owed && e.mu.wbErr != nil {
			// Writeback keeps retrying in the background, but a drain
			// cannot finish while the backing device fails: say so
			// rather than wait for a device that may never come back.
			err = e.mu.wbErr
		}
		e.mu.Unlock()
		if progress != nil {
			progress(DrainProgress{DirtyBlocks: dirty, InitialDirty: initial, WrittenBlocks: initial - min(initial, dirty)})
		}
		if err != nil {
			return err
		}
		if !owed {
			return nil
		}
		if err := e.drainWait(ctx); err != nil {
			return err
		}
	}
}

// drainPoll is how often Drain looks at the dirty count.
const drainPoll = 200 * time.Millisecond

// drainWait waits for Drain's next look: a poll interval on the Clock, or
// in stepping mode one round of background work run here (step.go).
func (e *Engine) drainWait(ctx context.Context) error {
	if e.step != nil {
		e.mu.Lock()
		e.waitLocked()
		e.mu.Unlock()
		return ctx.Err()
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-e.clock.After(drainPoll):
		return nil
	}
}
