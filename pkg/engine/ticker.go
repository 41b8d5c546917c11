package engine

import (
	"sync"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// tickInterval is the modulator's period.
const tickInterval = time.Second

// ticker is the modulator: once a second it measures how busy the backing
// device is with foreground I/O and allows background writeback only below
// writeback_threshold; it also forces sync_data_interval flushes.
func (e *Engine) ticker() {
	defer e.wg.Done()
	s := e.newTickState()
	for {
		select {
		case <-e.clock.After(tickInterval):
		case <-e.stopCh:
			return
		}
		e.mu.Lock()
		e.tickLocked(&s)
		e.mu.Unlock()
	}
}

// tickState is what the modulator remembers from one tick to the next.
type tickState struct {
	lastBusy           time.Duration
	lastTime, lastSync time.Time
	lastWB             uint64
	idleID             uint64 // the open buffer and its count at the last tick
	idleCount          int
}

func (e *Engine) newTickState() tickState {
	busy := e.backing.busy()
	now := e.clock.Now()
	return tickState{lastBusy: busy, lastTime: now, lastSync: now}
}

// tickLocked is one tick of the modulator (the ticker goroutine, or a
// test in stepping mode: step.go).
func (e *Engine) tickLocked(s *tickState) {
	e.cond.Broadcast()
	now := e.clock.Now()
	busy := e.backing.busy()
	dt := now.Sub(s.lastTime)
	if dt > 0 {
		e.mu.util = float64(busy-s.lastBusy) / float64(dt)
		e.mu.wbRate = float64(e.mu.wbBytes-s.lastWB) / dt.Seconds()
	}
	s.lastBusy, s.lastTime, s.lastWB = busy, now, e.mu.wbBytes
	t := e.mu.tunables
	e.mu.bgAllow = t.WritebackThreshold > 0 && e.mu.util*100 < float64(t.WritebackThreshold)
	// Flushes no longer close the open buffer (partial writes), so a
	// volume that goes quiet would keep its last writes there, out of
	// writeback's reach. Seal it once it has taken no entry for a
	// whole tick and writeback may run.
	if cur := e.mu.cur; cur != nil && cur.count > 0 && cur.id == s.idleID && cur.count == s.idleCount && e.mu.bgAllow {
		e.sealLocked()
		e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
	}
	s.idleID, s.idleCount = 0, 0
	if cur := e.mu.cur; cur != nil {
		s.idleID, s.idleCount = cur.id, cur.count
	}
	if t.SyncDataInterval > 0 && now.Sub(s.lastSync) >= time.Duration(t.SyncDataInterval)*time.Second {
		s.lastSync = now
		if cur := e.mu.cur; cur != nil && cur.count > 0 {
			e.sealLocked()
		}
		e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
	}
	e.cond.Broadcast()
}

// meteredDevice measures how long the backing device is busy with
// foreground I/O (read misses, write-around), the utilisation the
// modulator compares with writeback_threshold. Writeback's own I/O is not
// counted, or background writeback would throttle itself.
type meteredDevice struct {
	blockdev.Device
	clock Clock

	mu        sync.Mutex
	inflight  int
	since     time.Time
	busyTotal time.Duration
}

func (d *meteredDevice) begin() {
	d.mu.Lock()
	if d.inflight == 0 {
		d.since = d.clock.Now()
	}
	d.inflight++
	d.mu.Unlock()
}

func (d *meteredDevice) end() {
	d.mu.Lock()
	d.inflight--
	if d.inflight == 0 {
		d.busyTotal += d.clock.Now().Sub(d.since)
	}
	d.mu.Unlock()
}

func (d *meteredDevice) busy() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.busyTotal
	if d.inflight > 0 {
		b += d.clock.Now().Sub(d.since)
	}
	return b
}

// ReadAt is a foreground read (misses and partial hits).
func (d *meteredDevice) ReadAt(p []byte, off int64) (int, error) {
	d.begin()
	defer d.end()
	return d.Device.ReadAt(p, off)
}
