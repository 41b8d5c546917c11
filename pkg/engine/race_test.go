package engine

import (
	"fmt"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// TestConcurrentForeground drives the foreground from several goroutines
// at once (writes, FUA writes, reads, flushes, trims, write-zeroes) while
// the flusher, writebacker and ticker run, on a small ring that wraps and
// cleans, and checks the history against a per-sector linearizable
// register model:
//   - a read of a sector returns the value of a write (or write-zeroes) to
//     it that began before the read ended and that no other write
//     completely between it and the read's start overwrote; the initial
//     zeros only if no write completed before the read began; after a trim
//     began, any value the sector held (a trim leaves it unspecified);
//   - then the power is cut while the goroutines run, and after recovery
//     every sector holds a value allowed by the durable prefix: a write
//     acknowledged before a completed Flush began (or a completed FUA
//     write) may only be replaced by a later write, never lost.
//
// Every sector carries its write id and number (crash_test.go), so a
// misplaced or torn sector is caught too. Run it with -race.
func TestConcurrentForeground(t *testing.T) {
	rounds := 4
	if stress() {
		rounds = 40
	}
	for r := int64(0); r < int64(rounds); r++ {
		t.Run(fmt.Sprint("round", r), func(t *testing.T) { concurrentRound(t, r) })
	}
}

// cwrite is one write to a range of sectors: [start, end] in the
// history's logical clock (end = never when it failed).
type cwrite struct {
	id, start, end uint64
	trim, fua      bool
}

const never = ^uint64(0)

func concurrentRound(t *testing.T, seed int64) {
	const writers = 4
	ops := 150
	pw := blockdev.NewPower()
	cache, backing := blockdev.NewMem(testCacheSize(testSegments), pw), blockdev.NewMem(crashSize, pw)
	e := openTest(t, cache, backing, func(o *Options) {
		crashTunables(seed)(o)
		o.Tunables.WriteAroundMode = false
		o.Tunables.WritebackThreshold = 100
	})
	var clock atomic.Uint64
	var nextID atomic.Uint64
	var mu sync.Mutex
	hist := make([][]*cwrite, nsect) // per sector, every write to it
	type cread struct {
		first      int
		ids        []uint64
		start, end uint64
	}
	var reads []cread
	var flushes []uint64 // start of every completed Flush
	crashAt := clock.Load() + uint64(writers*ops)*3/2
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed*100 + int64(w)))
			for i := 0; i < ops; i++ {
				if w == 0 && clock.Load() >= crashAt && !pw.Crashed() {
					pw.CrashAfterWrites(0) // the power goes while the others run
				}
				first := rng.Intn(nsect)
				n := 1 + rng.Intn(min(64, nsect-first))
				switch op := rng.Intn(20); {
				case op < 9: // write or FUA write
					id := nextID.Add(1)
					p := make([]byte, n*512)
					for s := 0; s < n; s++ {
						sectorPattern(id, first+s, p[s*512:])
					}
					fua := rng.Intn(5) == 0
					cw := &cwrite{id: id, fua: fua}
					mu.Lock()
					cw.start = clock.Add(1)
					for s := first; s < first+n; s++ {
						hist[s] = append(hist[s], cw)
					}
					mu.Unlock()
					var err error
					if fua {
						err = e.WriteFUA(p, int64(first)*512)
					} else {
						_, err = e.WriteAt(p, int64(first)*512)
					}
					end := clock.Add(1)
					if err == nil {
						mu.Lock()
						cw.end = end
						mu.Unlock()
					}
				case op < 15: // read
					p := make([]byte, n*512)
					start := clock.Add(1)
					_, err := e.ReadAt(p, int64(first)*512)
					end := clock.Add(1)
					if err != nil {
						continue
					}
					ids := make([]uint64, n)
					for s := 0; s < n; s++ {
						id, derr := decodeSector(p[s*512:], first+s)
						if derr != nil {
							t.Errorf("read at %d: %v", end, derr)
							return
						}
						ids[s] = id
					}
					mu.Lock()
					reads = append(reads, cread{first, ids, start, end})
					mu.Unlock()
				case op < 17:
					start := clock.Add(1)
					if e.Flush() == nil {
						mu.Lock()
						flushes = append(flushes, start)
						mu.Unlock()
					}
					clock.Add(1)
				case op < 19: // write-zeroes: a write of value 0
					cw := &cwrite{id: 0}
					mu.Lock()
					cw.start = clock.Add(1)
					for s := first; s < first+n; s++ {
						hist[s] = append(hist[s], cw)
					}
					mu.Unlock()
					err := e.WriteZeroes(int64(first)*512, int64(n)*512)
					end := clock.Add(1)
					if err == nil {
						mu.Lock()
						cw.end = end
						mu.Unlock()
					}
				default: // trim: whole blocks inside the range
					lo := (first + sectorsPerBlock - 1) / sectorsPerBlock * sectorsPerBlock
					hi := (first + n) / sectorsPerBlock * sectorsPerBlock
					cw := &cwrite{trim: true}
					mu.Lock()
					cw.start = clock.Add(1)
					for s := lo; s < hi; s++ {
						hist[s] = append(hist[s], cw)
					}
					mu.Unlock()
					err := e.Trim(int64(first)*512, int64(n)*512)
					end := clock.Add(1)
					if err == nil {
						mu.Lock()
						cw.end = end
						mu.Unlock()
					}
				}
			}
		}(w)
	}
	wg.Wait()
	for _, cw := range allWrites(hist) {
		if cw.end == 0 {
			cw.end = never
		}
	}
	// allowed reports whether sector s may hold id for an observer whose
	// view begins at from (writes completed before it are ordered before)
	// and ends at to (writes begun after it cannot show).
	allowed := func(s int, id uint64, from, to, barrier uint64) bool {
		// barrier: the latest start of a write ordered before the view
		trimmed := false
		for _, w := range hist[s] {
			if w.end != never && w.end < from && w.start > barrier {
				barrier = w.start
			}
			if w.trim && w.start < to {
				trimmed = true
			}
		}
		if id == 0 && barrier == 0 {
			return true // the initial zeros
		}
		for _, w := range hist[s] {
			if w.trim || w.id != id || w.start >= to {
				continue
			}
			if trimmed || w.end > barrier {
				return true
			}
		}
		return trimmed && id == 0
	}
	for _, r := range reads {
		for i, id := range r.ids {
			if !allowed(r.first+i, id, r.start, r.end, 0) {
				t.Fatalf("round %d: read [%d,%d] of sector %d returned write %d; not linearizable (history %v)", seed, r.start, r.end, r.first+i, id, describe(hist[r.first+i]))
			}
		}
	}

	// Crash and recover: the durable view begins at the latest completed
	// Flush's start; a completed FUA write is durable on its own.
	pw.CrashAfterWrites(0)
	halt(e)
	var durableFrom uint64
	for _, f := range flushes {
		durableFrom = max(durableFrom, f)
	}
	rng := rand.New(rand.NewSource(seed))
	c2, b2 := cache.CrashImage(blockdev.CrashDropAll, rng), backing.CrashImage(blockdev.CrashDropAll, rng)
	e2, err := Open(Options{Cache: c2, Backing: b2, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatalf("round %d: reopen after the crash: %v", seed, err)
	}
	defer e2.Close()
	buf := make([]byte, crashSize)
	if _, err := e2.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for s := 0; s < nsect; s++ {
		id, err := decodeSector(buf[s*512:], s)
		if err != nil {
			t.Fatalf("round %d after the crash: %v", seed, err)
		}
		// A completed FUA write is durable itself (its flush began after
		// its write ended, but other writes before that are not known to
		// have been acknowledged before the flush began).
		var fua uint64
		for _, w := range hist[s] {
			if w.fua && w.end != never {
				fua = max(fua, w.start)
			}
		}
		if !allowed(s, id, durableFrom, never, fua) {
			t.Fatalf("round %d: after the crash sector %d holds write %d; a write a completed Flush or FUA covered is lost (durable from %d, history %v)", seed, s, id, durableFrom, describe(hist[s]))
		}
	}
	t.Logf("round %d: %d reads checked, %d flushes completed, durable view from %d of %d", seed, len(reads), len(flushes), durableFrom, clock.Load())
}

func allWrites(hist [][]*cwrite) []*cwrite {
	seen := map[*cwrite]bool{}
	var all []*cwrite
	for _, ws := range hist {
		for _, w := range ws {
			if !seen[w] {
				seen[w] = true
				all = append(all, w)
			}
		}
	}
	return all
}

func describe(ws []*cwrite) string {
	s := ""
	for _, w := range ws {
		end := fmt.Sprint(w.end)
		if w.end == never {
			end = "-"
		}
		kind := "w"
		if w.trim {
			kind = "trim"
		} else if w.fua {
			kind = "fua"
		}
		s += fmt.Sprintf(" %s%d[%d,%s]", kind, w.id, w.start, end)
	}
	return s
}
