package engine

import (
	"math/rand"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// Stepping mode (step.go) from the tests' side: the background rounds a
// test runs when it says so, and a recorder of device writes that shows a
// seeded run issues the same writes in the same order every time.

// stepBackground runs one background round chosen by rng: a flusher
// round, a writeback or cleaning batch, or a modulator tick after moving
// the fake clock on by up to 2 s (which lets writeback run in the
// background, seals a quiet buffer, and ends the cleaner's hold).
func (e *Engine) stepBackground(rng *rand.Rand) {
	e.mu.Lock()
	defer e.mu.Unlock()
	switch rng.Intn(3) {
	case 0:
		e.stepFlushLocked()
	case 1:
		e.stepWritebackLocked(true)
	default:
		if clk, ok := e.clock.(*fakeClock); ok {
			clk.advance(time.Duration(rng.Int63n(int64(2 * time.Second))))
		}
		e.tickLocked(&e.step.tick)
	}
}

// stepping opens the engine in stepping mode on a fake clock.
func stepping(o *Options) {
	o.stepping = true
	o.Clock = &fakeClock{now: time.Unix(1e9, 0)}
}

// devWrite is one device write as the Power counts them (WriteAt, Zero).
type devWrite struct {
	dev       byte // 'c' cache, 'b' backing
	zero      bool
	off, size int64
}

// recDevice records the writes of a device in a log shared by the cache
// and the backing device, in the order the Power counts them.
type recDevice struct {
	blockdev.Device
	dev byte
	log *[]devWrite
}

func (d recDevice) WriteAt(p []byte, off int64) (int, error) {
	*d.log = append(*d.log, devWrite{dev: d.dev, off: off, size: int64(len(p))})
	return d.Device.WriteAt(p, off)
}

func (d recDevice) Zero(off, n int64) error {
	*d.log = append(*d.log, devWrite{dev: d.dev, zero: true, off: off, size: n})
	return d.Device.Zero(off, n)
}

// recorded wraps a cache and a backing device in one recorder.
func recorded(cache, backing blockdev.Device) (c, b blockdev.Device, log *[]devWrite) {
	log = new([]devWrite)
	return recDevice{cache, 'c', log}, recDevice{backing, 'b', log}, log
}

// envInt reads an integer from the environment, def when unset.
func envInt(t testing.TB, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: not an integer", name, v)
	}
	return n
}

// TestSteppingIsDeterministic: in stepping mode a seeded crash workload
// issues the same device writes (device, kind, offset, length) in the
// same order on every run, and background work still happens: writeback
// and cleaning run in it. This is what makes a crash point, the k-th
// device write of a seed, the same write in every replay.
func TestSteppingIsDeterministic(t *testing.T) {
	cleaned, wrote := 0, 0
	const seeds = 30
	for seed := int64(0); seed < seeds; seed++ {
		var logs [2][]devWrite
		for run := range logs {
			c, b, log := recorded(blockdev.NewMem(testCacheSize(testSegments), nil), blockdev.NewMem(crashSize, nil))
			e := openTest(t, c, b, func(o *Options) { crashTunables(seed)(o); stepping(o) })
			var id uint64
			crashWorkload(e, newSectorModel(), rand.New(rand.NewSource(seed)), 60, &id)
			st := e.Status()
			if run == 0 {
				if st.Cleaning.CleanedSegments > 0 {
					cleaned++
				}
				if st.WritebackBytes > 0 {
					wrote++
				}
			}
			if err := e.Close(); err != nil {
				t.Fatalf("seed %d: close: %v", seed, err)
			}
			logs[run] = *log
		}
		if len(logs[0]) < 10 {
			t.Fatalf("seed %d: only %d device writes", seed, len(logs[0]))
		}
		if i := firstDiffWrite(logs[0], logs[1]); i >= 0 {
			t.Fatalf("seed %d: the two runs differ at device write %d of %d/%d", seed, i, len(logs[0]), len(logs[1]))
		}
	}
	t.Logf("%d seeds: writeback ran in %d, cleaning in %d", seeds, wrote, cleaned)
	if wrote < seeds/2 || cleaned < seeds/10 {
		t.Fatalf("stepping runs too little background work: writeback in %d, cleaning in %d of %d seeds", wrote, cleaned, seeds)
	}
}

// firstDiffWrite is the index of the first write where a and b differ,
// -1 if they are the same.
func firstDiffWrite(a, b []devWrite) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}
