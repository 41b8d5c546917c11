package engine

import (
	"fmt"
)

// Status returns a snapshot of the engine's state and counters.
func (e *Engine) Status() Status {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := Status{
		NrCacheBlocks:         uint64(e.nd) * e.nseg,
		IndexBytes:            uint64(e.mu.idx.bytes()),
		Memory:                e.memoryLocked(),
		PacedWrites:           e.mu.pacedWrites,
		WritebackFilledBlocks: e.mu.wbFilled,
		Cleaning:              e.cleaningStatusLocked(),
		NrSegments:            e.nseg,
		CurrentID:             e.mu.nextID - 1,
		LastFlushedID:         e.mu.flushedID,
		LastWritebackID:       e.mu.wbDoneID,
		NrDirtyCacheBlocks:    e.mu.nrDirty,
		NrPartialFlushed:      e.mu.nrPartialFlushed,
		Stat:                  e.mu.stats,
		WritebackBytes:        e.mu.wbBytes,
		WritebackBytesPerSec:  e.mu.wbRate,
		BackingUtilization:    e.mu.util,
		FlushCount:            e.mu.flushCount,
		CacheIOErrors:         e.mu.cacheErrors,
		BackingIOErrors:       e.mu.backingErrors,
		CacheSize:             int64(e.sb.CacheSize),
		BackingSize:           e.size.Load(),
		SegmentSize:           e.geo.SegmentSize,
		UUID:                  formatUUID(e.uuid),
		Tunables:              e.mu.tunables,
		Health:                e.healthLocked(),
	}
	for _, n := range e.mu.discards {
		s.PendingZeroBlocks += uint64(n)
	}
	s.FlushLatencySecondsSum = e.mu.flushLatency.Seconds()
	if cur := e.mu.cur; cur != nil {
		s.Cursor = e.slotOf(cur.id)*uint64(e.nd) + uint64(cur.count)
	} else if e.mu.nextID > 1 {
		s.Cursor = e.slotOf(e.mu.nextID) * uint64(e.nd)
	}
	if err := e.mu.err; err != nil {
		s.LastError = err.Error()
	} else if err := e.mu.wbErr; err != nil {
		s.LastError = err.Error()
	}
	st := e.mu.stats
	rh := st.ReadHitBufferFull + st.ReadHitBufferPartial + st.ReadHitCacheFull + st.ReadHitCachePartial
	rm := st.ReadMissBufferFull + st.ReadMissBufferPartial + st.ReadMissCacheFull + st.ReadMissCachePartial
	wh := st.WriteHitBufferFull + st.WriteHitBufferPartial + st.WriteHitCacheFull + st.WriteHitCachePartial
	wm := st.WriteMissBufferFull + st.WriteMissBufferPartial + st.WriteMissCacheFull + st.WriteMissCachePartial
	if rh+rm > 0 {
		s.ReadHitRatio = float64(rh) / float64(rh+rm)
	}
	if wh+wm > 0 {
		s.WriteHitRatio = float64(wh) / float64(wh+wm)
	}
	return s
}

func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// SetTunable changes an online tunable; static ones are refused.
func (e *Engine) SetTunable(name, value string) error {
	spec, ok := LookupTunable(name)
	if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownKey, name)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	t := e.mu.tunables
	if err := t.Set(name, value); err != nil {
		return err
	}
	if !spec.Online && t != e.mu.tunables {
		return fmt.Errorf("%w: %s (reopen the cache to change it)", ErrStaticTunable, name)
	}
	e.mu.tunables = t
	// A threshold change takes effect now, not at the next tick.
	if name == "writeback_threshold" {
		e.mu.bgAllow = t.WritebackThreshold > 0 && e.mu.util*100 < float64(t.WritebackThreshold)
	}
	e.cond.Broadcast()
	return nil
}

// ClearStat zeroes the hit/miss counters and the flush statistics.
func (e *Engine) ClearStat() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.mu.stats = Counters{}
	e.mu.nrPartialFlushed = 0
	e.mu.flushCount = 0
	e.mu.flushLatency = 0
}
