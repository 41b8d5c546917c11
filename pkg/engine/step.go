package engine

import "fmt"

// Stepping mode (Options.stepping, for tests): Open starts none of the
// three goroutines. Their rounds run only when a test steps them (the
// helpers in step_test.go: a flusher round, a writeback or cleaning batch,
// a modulator tick), or inline when an operation would wait for one: where
// the engine waits on its cond for background work (a Flush for the
// flusher, a writer for room, a cleaning batch for a RAM buffer, a batch's
// makeDurable for the flusher, Drain for writeback), it runs the pending
// round itself instead (waitLocked). Close runs the flusher's last rounds.
//
// Nothing then runs concurrently with the caller, so a workload driven
// from one goroutine, with a Clock that moves only when told (tests'
// fakeClock), issues the same device writes in the same order on every
// run: the k-th device write of a seed is the same write in every replay,
// which is what lets the crash sweep pick crash points from a seed and
// replay any failing one exactly.
type stepper struct {
	hdr   []byte    // the flusher's scratch header block
	tick  tickState // the modulator's state between ticks
	depth int       // writeback batches in progress (one may wait for the flusher, never for another batch)
	idle  int       // consecutive waits that found no background work
}

// maxIdleWaits bounds the waits in a row that find nothing to run: past
// it the engine would hang in production too (nothing but a tick could
// end the wait), and a test is better told so than left hanging.
const maxIdleWaits = 1000

// waitLocked waits on the cond for background work to change the state;
// in stepping mode it runs one pending round of that work instead. Either
// way mu is released meanwhile and the caller must look again.
func (e *Engine) waitLocked() {
	if e.step == nil {
		e.cond.Wait()
		return
	}
	if e.stepFlushLocked() || e.stepWritebackLocked(false) {
		e.step.idle = 0
		return
	}
	// Nothing pending: a tick is the only other source of change (it
	// seals a quiet buffer, re-allows background writeback).
	e.tickLocked(&e.step.tick)
	if e.step.idle++; e.step.idle > maxIdleWaits {
		panic(fmt.Sprintf("engine: stepping mode: %d waits in a row with no background work to run (written %d sealed %d flushed %d flushReq %d wbDone %d next %d)",
			e.step.idle, e.mu.writtenID, e.mu.sealedID, e.mu.flushedID, e.mu.flushReq, e.mu.wbDoneID, e.mu.nextID))
	}
}

// stepFlushLocked runs a flusher round if the flusher has work.
func (e *Engine) stepFlushLocked() bool {
	if e.mu.err != nil || !e.flushWantedLocked() {
		return false
	}
	e.flushOnceLocked(e.step.hdr)
	return true
}

// stepWritebackLocked runs a writeback (or, if mayClean, cleaning) batch
// if the writebacker would, and reports whether it did anything. A batch
// in progress (waiting for the flusher) does not start another.
//
// A wait runs writeback only, never cleaning: a writer waiting for room
// while a cleaning batch runs gets into the open buffer the cleaner copies
// into (in the goroutines' interleaving, while the batch waits for the
// flusher); run inline, the whole batch would seal that buffer first, and
// cleaning a nearly full ring into sealed part-full segments gains the
// writer nothing, pass after pass. Cleaning runs when a test steps it.
func (e *Engine) stepWritebackLocked(mayClean bool) bool {
	if e.step.depth > 0 || e.mu.stop || !e.writebackWantedLocked() {
		return false
	}
	e.step.depth++
	did, _ := e.writebackStepLocked(mayClean) // a failure is in wbErr, as the goroutine leaves it
	e.step.depth--
	if !did {
		e.releaseWbScratch() // idle, as the goroutine would be
	}
	return did
}

// finishStepsLocked is Close's part of the flusher in stepping mode: the
// flusher's rounds until it would exit (every sealed buffer written and
// flushed), as the goroutine does once stop is set.
func (e *Engine) finishStepsLocked() {
	if e.step == nil {
		return
	}
	for e.stepFlushLocked() {
	}
}
