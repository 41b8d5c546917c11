package engine

import (
	"sync"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// ticker is the modulator: once a second it measures how busy the backing
// device is with foreground I/O and allows background writeback only below
// writeback_threshold; it also forces sync_data_interval flushes.
func (e *Engine) ticker() {
	defer e.wg.Done()
	tk := time.NewTicker(time.Second)
	defer tk.Stop()
	lastBusy := e.backing.busy()
	lastTime := e.clock.Now()
	lastSync := lastTime
	lastWB := uint64(0)
	var idleID uint64 // the open buffer and its count at the last tick
	idleCount := 0
	for {
		select {
		case <-tk.C:
		case <-e.stopCh:
			return
		}
		e.mu.Lock()
		e.cond.Broadcast()
		now := e.clock.Now()
		busy := e.backing.busy()
		dt := now.Sub(lastTime)
		if dt > 0 {
			e.mu.util = float64(busy-lastBusy) / float64(dt)
			e.mu.wbRate = float64(e.mu.wbBytes-lastWB) / dt.Seconds()
		}
		lastBusy, lastTime, lastWB = busy, now, e.mu.wbBytes
		t := e.mu.tunables
		e.mu.bgAllow = t.WritebackThreshold > 0 && e.mu.util*100 < float64(t.WritebackThreshold)
		// Flushes no longer close the open buffer (partial writes), so a
		// volume that goes quiet would keep its last writes there, out of
		// writeback's reach. Seal it once it has taken no entry for a
		// whole tick and writeback may run.
		if cur := e.mu.cur; cur != nil && cur.count > 0 && cur.id == idleID && cur.count == idleCount && e.mu.bgAllow {
			e.sealLocked()
			e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
		}
		idleID, idleCount = 0, 0
		if cur := e.mu.cur; cur != nil {
			idleID, idleCount = cur.id, cur.count
		}
		if t.SyncDataInterval > 0 && now.Sub(lastSync) >= time.Duration(t.SyncDataInterval)*time.Second {
			lastSync = now
			if cur := e.mu.cur; cur != nil && cur.count > 0 {
				e.sealLocked()
			}
			e.mu.flushReq = max(e.mu.flushReq, e.mu.sealedID)
		}
		e.cond.Broadcast()
		e.mu.Unlock()
	}
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
