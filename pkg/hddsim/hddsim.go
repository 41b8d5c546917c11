// Package hddsim simulates a hard disk behind the blockdev.Device seam,
// for the tests, benchmarks and demos that must show what a log-structured
// write-back cache is for: a disk that is fast for sequential and sorted
// I/O and slow for random I/O.
//
// Fixed-delay emulators (dm-delay, nbdkit's delay filter, IOPS caps) charge
// the same for every request, so they cannot reward sequential or sorted
// writeback. This model has one actuator serving one request at a time;
// each request costs
//
//	seek       0 on the same track; else MinSeek + (FullSeek-MinSeek)*sqrt(d)
//	           with d the distance as a fraction of the full stroke
//	rotation   the wait until the request's first sector passes under the
//	           head: the platter turns continuously with the clock, and a
//	           sector's angle is its position on its track
//	transfer   length / TransferRate
//
// A request that starts exactly where the previous one ended costs only its
// transfer. Tracks hold TransferRate × rotation period bytes (1.5 MB at the
// defaults), laid out as one spiral, so the geometry and the clock agree:
// after transferring n bytes the platter has turned by exactly n bytes. The
// model is deterministic (no randomness: the rotational latency of a
// request follows from the clock and the address), so tests may assert
// simulated throughput in virtual time. At the defaults random 4 KiB I/O
// over the whole stroke runs at about 79 IOPS and sequential I/O at 180 MB/s.
//
// The data itself is stored by an underlying Device; the simulation only
// adds time. In Virtual mode time is a counter advanced by service times
// (nothing sleeps); in RealSleep mode each request also sleeps until the
// simulated disk would have finished it, for end-to-end runs.
package hddsim

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Model holds the parameters of the simulated disk. Zero fields take the
// value of DefaultModel.
type Model struct {
	// RPM is the spindle speed; 7200 gives a rotation of 8.33 ms, so a
	// random request waits 4.17 ms for its sector on average.
	RPM float64
	// TransferRate is the media rate in bytes per second (sequential
	// throughput).
	TransferRate float64
	// MinSeek is the track-to-track seek, including head settle.
	MinSeek time.Duration
	// FullSeek is the full-stroke seek.
	FullSeek time.Duration
	// StrokeBytes is the address span of a full stroke. 0 means the
	// device's size: a small test device behaves like a whole disk rather
	// than like a narrow band of a big one.
	StrokeBytes int64
	// FlushTime is the cost of a cache flush. The model has no write
	// cache (writes are charged when issued), so a flush only pays the
	// command.
	FlushTime time.Duration
	// DeallocateTime is the cost of a Zero when the underlying device
	// deallocates (blockdev.ZeroDeallocates): a metadata operation. Other
	// Zeroes are charged as writes of the whole range.
	DeallocateTime time.Duration
}

// DefaultModel is a 7200 rpm desktop or NAS disk: 1 ms track-to-track,
// 15 ms full stroke, 180 MB/s media rate.
func DefaultModel() Model {
	return Model{
		RPM:            7200,
		TransferRate:   180e6,
		MinSeek:        time.Millisecond,
		FullSeek:       15 * time.Millisecond,
		FlushTime:      500 * time.Microsecond,
		DeallocateTime: 500 * time.Microsecond,
	}
}

// withDefaults replaces zero or invalid fields by their defaults.
func (m Model) withDefaults() Model {
	d := DefaultModel()
	if !(m.RPM > 0) || math.IsInf(m.RPM, 0) {
		m.RPM = d.RPM
	}
	if !(m.TransferRate > 0) || math.IsInf(m.TransferRate, 0) {
		m.TransferRate = d.TransferRate
	}
	if m.MinSeek <= 0 {
		m.MinSeek = d.MinSeek
	}
	if m.FullSeek < m.MinSeek {
		m.FullSeek = max(d.FullSeek, m.MinSeek)
	}
	if m.StrokeBytes < 0 {
		m.StrokeBytes = 0
	}
	if m.FlushTime <= 0 {
		m.FlushTime = d.FlushTime
	}
	if m.DeallocateTime <= 0 {
		m.DeallocateTime = d.DeallocateTime
	}
	return m
}

// Period is the time of one rotation.
func (m Model) Period() time.Duration {
	m = m.withDefaults()
	return time.Duration(float64(time.Minute) / m.RPM)
}

// TrackBytes is the number of bytes on one track: what passes under the
// head in one rotation.
func (m Model) TrackBytes() int64 {
	m = m.withDefaults()
	return max(int64(math.Round(m.TransferRate*60/m.RPM)), blockdev.SectorSize)
}

// Clock selects how simulated time relates to wall time.
type Clock int

const (
	// Virtual: time advances only by service time; nothing sleeps.
	Virtual Clock = iota
	// RealSleep: each request sleeps until the simulated disk would have
	// finished it (idle wall time lets the platter turn, as on a real
	// disk).
	RealSleep
)

func (c Clock) String() string {
	switch c {
	case Virtual:
		return "virtual"
	case RealSleep:
		return "real-sleep"
	}
	return fmt.Sprintf("Clock(%d)", int(c))
}

// Stats counts what the simulated disk did since New or Reset.
type Stats struct {
	Requests     int64 // reads, writes and zeroes charged as transfers
	Flushes      int64
	Deallocates  int64 // zeroes charged as metadata operations
	Bytes        int64 // bytes transferred
	Seeks        int64 // requests that moved the head to another track
	Sequential   int64 // requests that continued where the last ended
	SeekTime     time.Duration
	RotationTime time.Duration
	TransferTime time.Duration
}

// Disk is a simulated HDD. It implements blockdev.Device; requests are
// served one at a time.
type Disk struct {
	under  blockdev.Device
	model  Model
	clock  Clock
	track  int64   // bytes per track
	period float64 // rotation period, ns
	stroke int64   // bytes of a full stroke

	// mu is the actuator: held for the whole service of a request, so
	// requests are serialised as on a disk without command queueing.
	mu struct {
		sync.Mutex
		now     time.Duration // simulated time at the end of the last request
		busy    time.Duration // total service time
		head    int64         // byte position under the head
		lastEnd int64         // end of the last transfer; -1 if none
		start   time.Time     // wall time of simulated time 0 (RealSleep)
		stats   Stats
	}
}

// New returns a simulated disk storing its data in under, with model m
// (zero fields take their defaults) and clock mode c.
func New(under blockdev.Device, m Model, c Clock) *Disk {
	m = m.withDefaults()
	d := &Disk{
		under:  under,
		model:  m,
		clock:  c,
		track:  m.TrackBytes(),
		period: float64(m.Period()),
		stroke: m.StrokeBytes,
	}
	if d.stroke == 0 {
		d.stroke = max(under.Size(), 1)
	}
	d.resetLocked()
	return d
}

func (d *Disk) resetLocked() {
	d.mu.now, d.mu.busy = 0, 0
	d.mu.head, d.mu.lastEnd = 0, -1
	d.mu.start = time.Now()
	d.mu.stats = Stats{}
}

// Reset sets the clock, the busy time and the statistics to zero and parks
// the head at offset 0, so a measurement starts from a known state.
func (d *Disk) Reset() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.resetLocked()
}

// Model returns the model in use, defaults filled in.
func (d *Disk) Model() Model { return d.model }

// Elapsed is the simulated time since New or Reset: in Virtual mode the
// sum of service times, in RealSleep mode the wall time.
func (d *Disk) Elapsed() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.clock == RealSleep {
		return time.Since(d.mu.start)
	}
	return d.mu.now
}

// Busy is the total service time since New or Reset.
func (d *Disk) Busy() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.busy
}

// Stats returns the counters since New or Reset.
func (d *Disk) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.stats
}

// beginLocked returns the simulated time at which a request issued now
// starts: the end of the previous one, or later if the disk sat idle in
// RealSleep mode.
func (d *Disk) beginLocked() time.Duration {
	t := d.mu.now
	if d.clock == RealSleep {
		t = max(t, time.Since(d.mu.start))
	}
	return t
}

// transferLocked charges a transfer of length bytes at off and returns
// its service time.
func (d *Disk) transferLocked(off, length int64) time.Duration {
	st := &d.mu.stats
	t := d.beginLocked()
	var seek, rot time.Duration
	if off == d.mu.lastEnd {
		st.Sequential++
	} else {
		if off/d.track != d.mu.head/d.track {
			dist := math.Abs(float64(off-d.mu.head)) / float64(d.stroke)
			seek = d.model.MinSeek + time.Duration(float64(d.model.FullSeek-d.model.MinSeek)*math.Sqrt(min(dist, 1)))
			st.Seeks++
		}
		// The platter's angle is the clock modulo the period; the
		// sector's angle is its position on its track.
		phase := math.Mod(float64(t+seek), d.period) / d.period
		target := float64(off%d.track) / float64(d.track)
		wait := target - phase
		if wait < 0 {
			wait++
		}
		rot = time.Duration(wait * d.period)
	}
	xfer := time.Duration(float64(length) / d.model.TransferRate * float64(time.Second))
	service := seek + rot + xfer
	st.Requests++
	st.Bytes += length
	st.SeekTime += seek
	st.RotationTime += rot
	st.TransferTime += xfer
	d.mu.head = off + length
	d.mu.lastEnd = off + length
	d.finishLocked(t, service)
	return service
}

// finishLocked advances the clock by a service starting at t and, in
// RealSleep mode, sleeps until the simulated end. The deadline comes from
// the simulated schedule, so oversleeping one request is absorbed by the
// next instead of accumulating.
func (d *Disk) finishLocked(t, service time.Duration) {
	d.mu.now = t + service
	d.mu.busy += service
	if d.clock == RealSleep {
		if wait := time.Until(d.mu.start.Add(d.mu.now)); wait > 0 {
			time.Sleep(wait)
		}
	}
}

// ReadAt implements blockdev.Device.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, err := d.under.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("hddsim: read: %w", err)
	}
	d.transferLocked(off, int64(len(p)))
	return n, nil
}

// WriteAt implements blockdev.Device.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, err := d.under.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("hddsim: write: %w", err)
	}
	d.transferLocked(off, int64(len(p)))
	return n, nil
}

// Zero implements blockdev.Device: a metadata operation when the
// underlying device deallocates, else a write of the whole range.
func (d *Disk) Zero(off, length int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.under.Zero(off, length); err != nil {
		return fmt.Errorf("hddsim: zero: %w", err)
	}
	if blockdev.ZeroDeallocates(d.under) {
		d.mu.stats.Deallocates++
		d.finishLocked(d.beginLocked(), d.model.DeallocateTime)
		return nil
	}
	d.transferLocked(off, length)
	return nil
}

// Flush implements blockdev.Device.
func (d *Disk) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.under.Flush(); err != nil {
		return fmt.Errorf("hddsim: flush: %w", err)
	}
	d.mu.stats.Flushes++
	d.finishLocked(d.beginLocked(), d.model.FlushTime)
	return nil
}

// Size implements blockdev.Device.
func (d *Disk) Size() int64 { return d.under.Size() }

// Close implements blockdev.Device; it closes the underlying device.
func (d *Disk) Close() error { return d.under.Close() }

// ZeroDeallocates implements blockdev.ZeroDeallocator.
func (d *Disk) ZeroDeallocates() bool { return blockdev.ZeroDeallocates(d.under) }
