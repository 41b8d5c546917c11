package engine

import "time"

// Clock is the engine's source of time (for intervals and utilisation).
// Clock is the engine's only source of time: intervals, utilisation and
// the pacing of writes when the ring is nearly full.
type Clock interface {
	Now() time.Time
	Sleep(d time.Duration)
}

type realClock struct{}

func (realClock) Now() time.Time        { return time.Now() }
func (realClock) Sleep(d time.Duration) { time.Sleep(d) }
