package blockdev

import (
	"fmt"
	"math/rand"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
)

// ErrPowerLost is returned by every WriteAt, Zero and Flush of a device
// whose Power has been cut (see Power.CrashAfterWrites). It wraps
// syscall.EIO, which is what a real device reports once it is gone.
var ErrPowerLost = fmt.Errorf("blockdev: power lost: %w", syscall.EIO)

// Power is a power supply shared by several Mem devices, so that a crash
// hits all of them at the same instant (for example the cache and the
// backing store of one engine). It counts the writes (WriteAt and Zero)
// of all its devices in one sequence.
type Power struct {
	mu struct {
		sync.Mutex
		writes  int  // WriteAt and Zero calls seen so far
		armed   bool // a crash is scheduled at crashAt
		crashAt int  // index (in writes) of the first write that fails
		crashed bool
	}
}

// NewPower returns a Power that is on and has no crash scheduled.
func NewPower() *Power { return &Power{} }

// CrashAfterWrites schedules a power loss at the k-th write (WriteAt or
// Zero) from now, counted across all devices on this Power; k=0 means the
// very next write. That write and everything after it (writes, zeroes,
// flushes) fail with ErrPowerLost and have no effect; reads keep working.
// Once the power is lost it stays lost; a later call cannot undo it.
func (pw *Power) CrashAfterWrites(k int) {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	if k < 0 {
		k = 0
	}
	pw.mu.armed = true
	pw.mu.crashAt = pw.mu.writes + k
}

// Crashed reports whether the power has been lost.
func (pw *Power) Crashed() bool {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	return pw.mu.crashed
}

// Writes is the number of WriteAt and Zero calls seen so far on all
// devices of this Power, including those that failed because of the
// crash. A crash sweep runs a workload once to count its writes, then
// crashes it at each of them.
func (pw *Power) Writes() int {
	pw.mu.Lock()
	defer pw.mu.Unlock()
	return pw.mu.writes
}

// write counts one write and reports whether it may take effect.
func (pw *Power) write() bool {
	if pw == nil {
		return true
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	n := pw.mu.writes
	pw.mu.writes++
	if pw.mu.armed && n >= pw.mu.crashAt {
		pw.mu.crashed = true
	}
	return !pw.mu.crashed
}

// on reports whether a flush may take effect.
func (pw *Power) on() bool {
	if pw == nil {
		return true
	}
	pw.mu.Lock()
	defer pw.mu.Unlock()
	return !pw.mu.crashed
}

// CrashMode says what a power loss does to the writes that were not yet
// flushed when it happened.
type CrashMode int

const (
	// CrashDropAll keeps only flushed data: every unflushed write is lost.
	CrashDropAll CrashMode = iota
	// CrashKeepSubset keeps each unflushed write, independently, whole or
	// not at all; kept writes are applied in the order they were issued.
	CrashKeepSubset
	// CrashTear is CrashKeepSubset where each kept write may also be torn:
	// an arbitrary subset of its sectors reaches the medium. A sector is
	// never torn internally.
	CrashTear
	// CrashKeepAll keeps every completed write, as after the serving
	// process is killed while the machine stays up (the page cache or the
	// device's cache survives).
	CrashKeepAll
)

func (m CrashMode) String() string {
	switch m {
	case CrashDropAll:
		return "drop-all"
	case CrashKeepSubset:
		return "keep-subset"
	case CrashTear:
		return "tear"
	case CrashKeepAll:
		return "keep-all"
	}
	return fmt.Sprintf("CrashMode(%d)", int(m))
}

// memPageSize is the granularity of Mem's sparse storage. Pages are
// immutable once stored in a pageMap, so the durable and the current image
// (and every crash image) share the pages they have in common and cloning
// a device costs one map copy, not a copy of its data.
const memPageSize = 4096

type memPage = [memPageSize]byte

// pageMap maps page index to contents; an absent page reads as zeros.
type pageMap map[int64]*memPage

func (pm pageMap) clone() pageMap {
	c := make(pageMap, len(pm))
	for k, v := range pm {
		c[k] = v
	}
	return c
}

// write stores p at off, copying each touched page (pages are shared).
// data == nil means zeros.
func (pm pageMap) write(p []byte, off, length int64) {
	for length > 0 {
		idx := off / memPageSize
		in := off % memPageSize
		n := min(length, memPageSize-in)
		old := pm[idx]
		if p == nil && (old == nil || n == memPageSize) {
			delete(pm, idx) // zeros: deallocate
		} else {
			np := new(memPage)
			if old != nil && n != memPageSize {
				*np = *old
			}
			if p != nil {
				copy(np[in:in+n], p[:n])
				p = p[n:]
			} else {
				clear(np[in : in+n])
			}
			pm[idx] = np
		}
		off += n
		length -= n
	}
}

func (pm pageMap) read(p []byte, off int64) {
	for len(p) > 0 {
		idx := off / memPageSize
		in := off % memPageSize
		n := min(int64(len(p)), memPageSize-in)
		if pg := pm[idx]; pg != nil {
			copy(p[:n], pg[in:in+n])
		} else {
			clear(p[:n])
		}
		p = p[n:]
		off += n
	}
}

// memWrite is one unflushed write; data == nil is a Zero of length bytes.
type memWrite struct {
	off, length int64
	data        []byte
}

// Mem is a crashable in-memory Device for tests. It keeps the durable
// image (what survived the last Flush) and the unflushed writes in issue
// order, so CrashImage can produce any state a power loss could leave
// (the model is pebble's vfs.MemFS CrashClone, at sector granularity).
// Storage is sparse: a large device holding little data is cheap, and so
// is taking thousands of crash images of it.
//
// WriteAt and Zero must be SectorSize-aligned (the Device contract), so
// that tearing can be modelled at sector boundaries; misaligned requests
// fail with EINVAL. Mem is safe for concurrent use.
type Mem struct {
	size atomic.Int64 // only goes up (Grow)
	mu   struct {
		sync.Mutex
		pw      *Power
		cur     pageMap // what reads see
		durable pageMap // what survives any crash
		pending []memWrite
		closed  bool
	}
}

// NewMem returns a zero-filled device of size bytes (rounded down to a
// multiple of SectorSize) on power supply pw, which may be nil (never
// crashes).
func NewMem(size int64, pw *Power) *Mem {
	if size < 0 {
		size = 0
	}
	m := &Mem{}
	m.size.Store(size / SectorSize * SectorSize)
	m.mu.pw = pw
	m.mu.cur = pageMap{}
	m.mu.durable = pageMap{}
	return m
}

// AttachPower puts the device on power supply pw (nil: never crashes),
// for example to crash a device again while it recovers from a crash
// image.
func (m *Mem) AttachPower(pw *Power) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.pw = pw
}

func (m *Mem) check(op string, off, length int64, aligned bool) error {
	if size := m.size.Load(); off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("blockdev: mem %s [%d, +%d) outside device of %d bytes: %w", op, off, length, size, syscall.EINVAL)
	}
	if aligned && (off%SectorSize != 0 || length%SectorSize != 0) {
		return fmt.Errorf("blockdev: mem %s [%d, +%d) not aligned to %d: %w", op, off, length, SectorSize, syscall.EINVAL)
	}
	return nil
}

// ReadAt implements Device. Reads work after a power loss (the test
// inspects what the device holds) but not after Close.
func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	if err := m.check("read", off, int64(len(p)), false); err != nil {
		return 0, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return 0, fmt.Errorf("blockdev: mem read: %w", os.ErrClosed)
	}
	m.mu.cur.read(p, off)
	return len(p), nil
}

// WriteAt implements Device.
func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	if err := m.check("write", off, int64(len(p)), true); err != nil {
		return 0, err
	}
	return m.write(p, off, int64(len(p)))
}

// Zero implements Device; the zeroed pages are deallocated.
func (m *Mem) Zero(off, length int64) error {
	if err := m.check("zero", off, length, true); err != nil {
		return err
	}
	_, err := m.write(nil, off, length)
	return err
}

func (m *Mem) write(p []byte, off, length int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return 0, fmt.Errorf("blockdev: mem write: %w", os.ErrClosed)
	}
	// The power decision and the write happen under m.mu, so a crash
	// image taken after the crash sees exactly the writes before it.
	if !m.mu.pw.write() {
		return 0, ErrPowerLost
	}
	if length == 0 {
		return 0, nil
	}
	w := memWrite{off: off, length: length}
	if p != nil {
		w.data = append([]byte(nil), p...)
	}
	m.mu.pending = append(m.mu.pending, w)
	m.mu.cur.write(p, off, length)
	return len(p), nil
}

// Flush implements Device: every completed write becomes durable.
func (m *Mem) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mu.closed {
		return fmt.Errorf("blockdev: mem flush: %w", os.ErrClosed)
	}
	if !m.mu.pw.on() {
		return ErrPowerLost
	}
	// Only the pages the pending writes touched differ between the two
	// images; copy their current version.
	for _, w := range m.mu.pending {
		for idx := w.off / memPageSize; idx*memPageSize < w.off+w.length; idx++ {
			if pg, ok := m.mu.cur[idx]; ok {
				m.mu.durable[idx] = pg
			} else {
				delete(m.mu.durable, idx)
			}
		}
	}
	m.mu.pending = nil
	return nil
}

// Size implements Device.
func (m *Mem) Size() int64 { return m.size.Load() }

// Grow implements Grower: the device becomes size bytes (rounded down to
// a multiple of SectorSize), the new range reading as zeros, as a pool's
// grown file or volume does. The size is not subject to power: a crash
// image keeps it, as a pool's allocation is durable before it returns.
func (m *Mem) Grow(size int64) error {
	size = size / SectorSize * SectorSize
	m.mu.Lock()
	defer m.mu.Unlock()
	if size < m.size.Load() {
		return fmt.Errorf("blockdev: mem grow to %d bytes: smaller than %d: %w", size, m.size.Load(), syscall.EINVAL)
	}
	m.size.Store(size)
	return nil
}

// Close implements Device. A closed Mem can still produce crash images.
func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.mu.closed = true
	return nil
}

// Unflushed returns the number of writes not yet made durable by Flush.
func (m *Mem) Unflushed() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.mu.pending)
}

// CrashImage returns a new, independent Mem (on no Power) holding what a
// power loss at this instant could leave on the device, per mode. rng
// chooses which unflushed writes (and sectors) survive; nil means a fixed
// seed. Flushed data is always in the image.
func (m *Mem) CrashImage(mode CrashMode, rng *rand.Rand) *Mem {
	if rng == nil {
		rng = rand.New(rand.NewSource(1))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	img := NewMem(m.size.Load(), nil)
	if mode == CrashKeepAll {
		img.mu.cur = m.mu.cur.clone()
		img.mu.durable = m.mu.cur.clone()
		return img
	}
	pm := m.mu.durable.clone()
	switch mode {
	case CrashKeepSubset:
		for _, w := range m.mu.pending {
			if rng.Intn(2) == 0 {
				pm.write(w.data, w.off, w.length)
			}
		}
	case CrashTear:
		for _, w := range m.mu.pending {
			if rng.Intn(2) == 0 {
				tear(pm, w, rng)
			}
		}
	}
	img.mu.cur = pm
	img.mu.durable = pm.clone()
	return img
}

// tear applies a subset of w's sectors to pm. The subsets favour the
// shapes real devices produce (a prefix reaching the medium before the
// power went) but also cover arbitrary ones, since the contract allows
// any.
func tear(pm pageMap, w memWrite, rng *rand.Rand) {
	sectors := w.length / SectorSize
	if sectors <= 1 {
		pm.write(w.data, w.off, w.length)
		return
	}
	sector := func(i int64) {
		var d []byte
		if w.data != nil {
			d = w.data[i*SectorSize : (i+1)*SectorSize]
		}
		pm.write(d, w.off+i*SectorSize, SectorSize)
	}
	switch rng.Intn(4) {
	case 0: // whole
		pm.write(w.data, w.off, w.length)
	case 1: // a prefix
		n := rng.Int63n(sectors)
		for i := int64(0); i < n; i++ {
			sector(i)
		}
	case 2: // a suffix
		n := rng.Int63n(sectors)
		for i := sectors - n; i < sectors; i++ {
			sector(i)
		}
	default: // each sector independently
		for i := int64(0); i < sectors; i++ {
			if rng.Intn(2) == 0 {
				sector(i)
			}
		}
	}
}
