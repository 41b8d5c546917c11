package engine

import "time"

// Clock is the engine's only source of time: intervals, utilisation, the
// pacing of writes when the ring is nearly full, the modulator's tick,
// writeback's retry backoff and Drain's polling. A test that passes a fake
// Clock (and, for a fully deterministic run, stepping mode: step.go)
// decides when any of it happens.
type Clock interface {
	Now() time.Time
	Sleep(d time.Duration)
	// After is time.After on this clock: the channel receives once d has
	// passed.
	After(d time.Duration) <-chan time.Time
}

type realClock struct{}

func (realClock) Now() time.Time                         { return time.Now() }
func (realClock) Sleep(d time.Duration)                  { time.Sleep(d) }
func (realClock) After(d time.Duration) <-chan time.Time { return time.After(d) }
