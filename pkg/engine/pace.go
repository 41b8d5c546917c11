package engine

import "time"

// Pacing: when the ring nears full, foreground writes are slowed smoothly
// to the speed of writeback instead of running at RAM speed until the
// ring is full and then stalling for a whole writeback batch (seconds on
// an HDD; dm-writeboost users saw throughput collapse there, its issue
// #239). One shared schedule admits blocks at a rate that falls as the
// ring fills: above paceStart of the ring in use, each block costs
// 2*f/writeback_rate of schedule time, f going from 0 to 1 between
// paceStart and a full ring. The foreground therefore settles where it
// matches writeback (f = 1/2), with every write waiting a little rather
// than a few writes waiting for a batch. Writes that need no new ring
// space (overwrites merged in a RAM buffer) are paced too: the schedule
// is cheap and the rule stays simple.
//
// The pace is set only by measured writeback speed (wbBlocksPerSec,
// updated by each batch, or the progress of the first batch); until
// writeback has written something, writes are not paced.

// paceStart is the fraction of the ring in use where pacing begins: the
// same mark where writeback is urged even when writeback_threshold is 0.
const paceStart = 0.75

// maxPaceWait bounds one write's wait, so that a wrong rate estimate
// costs latency, never a hang.
const maxPaceWait = 2 * time.Second

// pace waits for n bytes' turn on the schedule.
func (e *Engine) pace(n int) {
	e.mu.Lock()
	d := e.paceDelayLocked()
	if d == 0 {
		e.mu.Unlock()
		return
	}
	now := e.clock.Now()
	start := e.mu.paceNext
	if start.Before(now) {
		start = now
	}
	blocks := (n + blockSize - 1) / blockSize
	e.mu.paceNext = start.Add(time.Duration(blocks) * d)
	e.mu.pacedWrites++
	e.mu.Unlock()
	if wait := min(start.Sub(now), maxPaceWait); wait > 0 {
		e.clock.Sleep(wait)
	}
}

// paceDelayLocked is the schedule time of one block, 0 when not pacing.
func (e *Engine) paceDelayLocked() time.Duration {
	rate := e.mu.wbBlocksPerSec
	if rate <= 0 && e.mu.batchDone > 0 {
		// The first batch is still running: its progress so far is the
		// best estimate (a whole batch may take seconds on an HDD).
		if d := e.clock.Now().Sub(e.mu.batchBegan); d > 0 {
			rate = float64(e.mu.batchDone) / d.Seconds()
		}
	}
	if rate <= 0 || e.nseg < 8 {
		return 0 // no measurement yet, or a ring too small to have a margin
	}
	used := float64(e.mu.nextID-e.mu.ckptWbID) / float64(e.nseg)
	if used <= paceStart {
		return 0
	}
	f := min((used-paceStart)/(1-paceStart), 1)
	return time.Duration(2 * f / rate * float64(time.Second))
}

// noteBatchLocked records the speed of a writeback batch of n blocks that
// took d.
func (e *Engine) noteBatchLocked(n int, d time.Duration) {
	if n == 0 || d <= 0 {
		return
	}
	r := float64(n) / d.Seconds()
	if e.mu.wbBlocksPerSec == 0 {
		e.mu.wbBlocksPerSec = r
		return
	}
	e.mu.wbBlocksPerSec = 0.5*e.mu.wbBlocksPerSec + 0.5*r
}
