package blockdev

import (
	"fmt"
	"sync"
	"sync/atomic"
)

// Faulty wraps a Device and injects errors, so tests can check that every
// device error reaches the caller (pebble's error_test.go sweep: fail at
// operation 0, 1, 2, ... until a run succeeds). A failed operation does
// not reach the wrapped device. Faults are sticky until Reset.
type Faulty struct {
	d  Device
	mu struct {
		sync.Mutex
		read, write, flush fault
	}
}

// fault fails every operation of one kind after left more successes.
type fault struct {
	armed bool
	left  int
	err   error
}

// hit counts one operation and returns the injected error, if any.
func (f *fault) hit(op string) error {
	if !f.armed {
		return nil
	}
	if f.left > 0 {
		f.left--
		return nil
	}
	return fmt.Errorf("blockdev: injected %s fault: %w", op, f.err)
}

// NewFaulty wraps d with no faults armed.
func NewFaulty(d Device) *Faulty { return &Faulty{d: d} }

// FailReadsAfter lets n more reads succeed, then fails every read with an
// error wrapping err.
func (f *Faulty) FailReadsAfter(n int, err error) { f.arm(&f.mu.read, n, err) }

// FailWritesAfter lets n more writes (WriteAt and Zero) succeed, then
// fails every write with an error wrapping err.
func (f *Faulty) FailWritesAfter(n int, err error) { f.arm(&f.mu.write, n, err) }

// FailFlushesAfter lets n more flushes succeed, then fails every flush
// with an error wrapping err.
func (f *Faulty) FailFlushesAfter(n int, err error) { f.arm(&f.mu.flush, n, err) }

func (f *Faulty) arm(ft *fault, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	*ft = fault{armed: true, left: max(n, 0), err: err}
}

// Reset disarms every fault.
func (f *Faulty) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.mu.read, f.mu.write, f.mu.flush = fault{}, fault{}, fault{}
}

func (f *Faulty) check(ft *fault, op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return ft.hit(op)
}

// ReadAt implements Device.
func (f *Faulty) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check(&f.mu.read, "read"); err != nil {
		return 0, err
	}
	return f.d.ReadAt(p, off)
}

// WriteAt implements Device.
func (f *Faulty) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check(&f.mu.write, "write"); err != nil {
		return 0, err
	}
	return f.d.WriteAt(p, off)
}

// Zero implements Device; it counts as a write.
func (f *Faulty) Zero(off, length int64) error {
	if err := f.check(&f.mu.write, "zero"); err != nil {
		return err
	}
	return f.d.Zero(off, length)
}

// Flush implements Device.
func (f *Faulty) Flush() error {
	if err := f.check(&f.mu.flush, "flush"); err != nil {
		return err
	}
	return f.d.Flush()
}

// Size implements Device.
func (f *Faulty) Size() int64 { return f.d.Size() }

// Close implements Device.
func (f *Faulty) Close() error { return f.d.Close() }

// Counting wraps a Device and counts its operations and bytes, for tests
// and benchmarks that measure I/O (how much a recovery reads, how many
// flushes a writeback issues).
type Counting struct {
	d                              Device
	readOps, readBytes             atomic.Int64
	writeOps, writeBytes           atomic.Int64
	flushes, zeroes, zeroBytes     atomic.Int64
	discards, discardBytes         atomic.Int64
	readErrs, writeErrs, flushErrs atomic.Int64
}

// Counts is a snapshot of a Counting device's counters. Ops count every
// call; bytes count what the wrapped device reported transferred (for
// Zero: the length of successful calls).
type Counts struct {
	ReadOps, ReadBytes     int64
	WriteOps, WriteBytes   int64
	Flushes                int64
	Zeroes, ZeroBytes      int64
	Discards, DiscardBytes int64
	// Errors returned, by kind (writes include Zero and Discard).
	ReadErrors, WriteErrors, FlushErrors int64
}

// NewCounting wraps d with all counters at zero.
func NewCounting(d Device) *Counting { return &Counting{d: d} }

// Snapshot returns the counters now.
func (c *Counting) Snapshot() Counts {
	return Counts{
		ReadOps: c.readOps.Load(), ReadBytes: c.readBytes.Load(),
		WriteOps: c.writeOps.Load(), WriteBytes: c.writeBytes.Load(),
		Flushes: c.flushes.Load(),
		Zeroes:  c.zeroes.Load(), ZeroBytes: c.zeroBytes.Load(),
		Discards: c.discards.Load(), DiscardBytes: c.discardBytes.Load(),
		ReadErrors: c.readErrs.Load(), WriteErrors: c.writeErrs.Load(), FlushErrors: c.flushErrs.Load(),
	}
}

// Sub returns the counts accumulated between before and c.
func (c Counts) Sub(before Counts) Counts {
	return Counts{
		ReadOps: c.ReadOps - before.ReadOps, ReadBytes: c.ReadBytes - before.ReadBytes,
		WriteOps: c.WriteOps - before.WriteOps, WriteBytes: c.WriteBytes - before.WriteBytes,
		Flushes: c.Flushes - before.Flushes,
		Zeroes:  c.Zeroes - before.Zeroes, ZeroBytes: c.ZeroBytes - before.ZeroBytes,
		Discards: c.Discards - before.Discards, DiscardBytes: c.DiscardBytes - before.DiscardBytes,
		ReadErrors: c.ReadErrors - before.ReadErrors, WriteErrors: c.WriteErrors - before.WriteErrors,
		FlushErrors: c.FlushErrors - before.FlushErrors,
	}
}

// ReadAt implements Device.
func (c *Counting) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.d.ReadAt(p, off)
	c.readOps.Add(1)
	c.readBytes.Add(int64(n))
	if err != nil {
		c.readErrs.Add(1)
	}
	return n, err
}

// WriteAt implements Device.
func (c *Counting) WriteAt(p []byte, off int64) (int, error) {
	n, err := c.d.WriteAt(p, off)
	c.writeOps.Add(1)
	c.writeBytes.Add(int64(n))
	if err != nil {
		c.writeErrs.Add(1)
	}
	return n, err
}

// Zero implements Device.
func (c *Counting) Zero(off, length int64) error {
	err := c.d.Zero(off, length)
	c.zeroes.Add(1)
	if err != nil {
		c.writeErrs.Add(1)
	} else {
		c.zeroBytes.Add(length)
	}
	return err
}

// Flush implements Device.
func (c *Counting) Flush() error {
	err := c.d.Flush()
	c.flushes.Add(1)
	if err != nil {
		c.flushErrs.Add(1)
	}
	return err
}

// Size implements Device.
func (c *Counting) Size() int64 { return c.d.Size() }

// Close implements Device.
func (c *Counting) Close() error { return c.d.Close() }
