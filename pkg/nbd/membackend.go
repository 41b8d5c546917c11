package nbd

import (
	"fmt"
	"sync"
	"syscall"
)

// MemBackend is a RAM disk for tests and benchmarks. It is safe for
// concurrent use: the disk is cut into stripes, each guarded by one of a
// fixed set of locks, so requests on different stripes run in parallel and
// overlapping requests never interleave within a stripe.
type MemBackend struct {
	data  []byte
	locks [memLocks]paddedRWMutex
}

// paddedRWMutex keeps each lock on its own cache line, so requests on
// neighbouring stripes do not slow each other down.
type paddedRWMutex struct {
	sync.RWMutex
	_ [64 - 24]byte
}

const (
	memStripeShift = 16 // 64 KiB stripes
	memLocks       = 256
)

// NewMemBackend returns a zero-filled RAM disk of size bytes.
func NewMemBackend(size int64) *MemBackend {
	return &MemBackend{data: make([]byte, size)}
}

func (m *MemBackend) Size() int64 { return int64(len(m.data)) }

// lockRange locks the stripes of [off, off+n) in ascending lock order (so
// two requests can never wait for each other) and returns the unlock.
func (m *MemBackend) lockRange(off, n int64, write bool) func() {
	if n <= 0 {
		return func() {}
	}
	first := off >> memStripeShift
	last := (off + n - 1) >> memStripeShift
	var idx []int
	if last-first+1 >= memLocks {
		idx = make([]int, memLocks)
		for i := range idx {
			idx[i] = i
		}
	} else {
		a, b := int(first%memLocks), int(last%memLocks)
		if a <= b {
			if a == b {
				return m.lockOne(a, write)
			}
			for i := a; i <= b; i++ {
				idx = append(idx, i)
			}
		} else { // wraps: lower indexes first
			for i := 0; i <= b; i++ {
				idx = append(idx, i)
			}
			for i := a; i < memLocks; i++ {
				idx = append(idx, i)
			}
		}
	}
	for _, i := range idx {
		if write {
			m.locks[i].Lock()
		} else {
			m.locks[i].RLock()
		}
	}
	return func() {
		for _, i := range idx {
			if write {
				m.locks[i].Unlock()
			} else {
				m.locks[i].RUnlock()
			}
		}
	}
}

func (m *MemBackend) lockOne(i int, write bool) func() {
	if write {
		m.locks[i].Lock()
		return m.locks[i].Unlock
	}
	m.locks[i].RLock()
	return m.locks[i].RUnlock
}

func (m *MemBackend) check(off, n int64) error {
	if off < 0 || n < 0 || off > int64(len(m.data)) || n > int64(len(m.data))-off {
		return fmt.Errorf("membackend: range %d+%d outside %d bytes: %w", off, n, len(m.data), syscall.EINVAL)
	}
	return nil
}

func (m *MemBackend) ReadAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	unlock := m.lockRange(off, int64(len(p)), false)
	n := copy(p, m.data[off:])
	unlock()
	return n, nil
}

func (m *MemBackend) WriteAt(p []byte, off int64) (int, error) {
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	unlock := m.lockRange(off, int64(len(p)), true)
	n := copy(m.data[off:], p)
	unlock()
	return n, nil
}

// Flush is a no-op: RAM is as durable as this disk gets.
func (m *MemBackend) Flush() error { return nil }

// Trim zeroes the range (a RAM disk has nothing to deallocate).
func (m *MemBackend) Trim(off, length int64) error { return m.WriteZeroes(off, length) }

func (m *MemBackend) WriteZeroes(off, length int64) error {
	if err := m.check(off, length); err != nil {
		return err
	}
	unlock := m.lockRange(off, length, true)
	clear(m.data[off : off+length])
	unlock()
	return nil
}

// MultiConnSafe: one shared array, and Flush is global.
func (m *MemBackend) MultiConnSafe() bool { return true }
