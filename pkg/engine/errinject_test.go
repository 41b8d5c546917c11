package engine

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// The error-injection sweep, in the style of pebble's error_test.go: for
// seeded workloads, count the device operations of each kind (read, write,
// flush, zero) on each device (cache, backing) in a run without faults;
// then, for each operation index k (all of them, or a sample drawn from
// the seed where there are many), run again and fail the k-th operation of
// that kind with EIO, once or from then on. Every run must:
//   - return only errors that wrap ErrIO (or ErrClosed after Close), and
//     show an injected fault that fired, to the caller or in Status/Err;
//   - read back only data the contract allows, never garbage;
//   - never hang (each call has a deadline) and never panic;
//   - lose nothing acknowledged: after the faults are cleared and both
//     devices lose power (unflushed writes dropped), a reopen finds every
//     sector a completed Flush or FUA write covered.
// The same is done for the reads and writes of a recovery (Open of a
// cache left unclean): Open fails with ErrIO or succeeds, and then loses
// nothing.

type opKind int

const (
	opRead opKind = iota
	opWrite
	opFlush
	opZero
	nOpKinds
)

func (k opKind) String() string { return [...]string{"read", "write", "flush", "zero"}[k] }

// injector counts a device's operations by kind and fails the at-th
// operation of kind with EIO (and every later one when sticky). A failed
// operation does not reach the device.
type injector struct {
	d  blockdev.Device
	mu struct {
		sync.Mutex
		count  [nOpKinds]int
		armed  bool
		kind   opKind
		at     int
		sticky bool
	}
	fired atomic.Bool
}

func (d *injector) arm(kind opKind, at int, sticky bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.armed, d.mu.kind, d.mu.at, d.mu.sticky = true, kind, at, sticky
}

func (d *injector) disarm() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.armed = false
}

func (d *injector) counts() [nOpKinds]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.count
}

func (d *injector) hit(k opKind) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := d.mu.count[k]
	d.mu.count[k]++
	if d.mu.armed && k == d.mu.kind && (n == d.mu.at || (d.mu.sticky && n > d.mu.at)) {
		d.fired.Store(true)
		return fmt.Errorf("injected %v fault at operation %d: %w", k, n, syscall.EIO)
	}
	return nil
}

func (d *injector) ReadAt(p []byte, off int64) (int, error) {
	if err := d.hit(opRead); err != nil {
		return 0, err
	}
	return d.d.ReadAt(p, off)
}

func (d *injector) WriteAt(p []byte, off int64) (int, error) {
	if err := d.hit(opWrite); err != nil {
		return 0, err
	}
	return d.d.WriteAt(p, off)
}

func (d *injector) Flush() error {
	if err := d.hit(opFlush); err != nil {
		return err
	}
	return d.d.Flush()
}

func (d *injector) Zero(off, length int64) error {
	if err := d.hit(opZero); err != nil {
		return err
	}
	return d.d.Zero(off, length)
}

func (d *injector) Size() int64  { return d.d.Size() }
func (d *injector) Close() error { return nil }

// within runs fn and fails the test if it does not return in time: a
// device error must never leave a caller waiting for ever.
func within(t *testing.T, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); fn() }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("%s: hung for 30 s after an injected device error\n%s", what, buf[:runtime.Stack(buf, true)])
	}
}

// sweepRun is one run of a sweep workload.
type sweepRun struct {
	t                 *testing.T
	what              string
	m                 *sectorModel
	errs              int // errors returned to callers
	cacheMem, backMem *blockdev.Mem
	cache, backing    *injector
}

// check fails the run for an error that does not wrap ErrIO (or ErrClosed).
func (r *sweepRun) check(op string, err error) bool {
	if err == nil {
		return true
	}
	r.errs++
	if !errors.Is(err, ErrIO) && !errors.Is(err, ErrClosed) {
		r.t.Fatalf("%s: %s returned %v, which does not wrap ErrIO", r.what, op, err)
	}
	return false
}

func sweepTunables(seed int64) func(*Options) {
	return func(o *Options) {
		o.Tunables.WritebackThreshold = []int{100, 0}[seed%2]
		o.Tunables.ReadCacheThreshold = []int{0, 8}[(seed/2)%2]
		o.RAMBuffers = 1 + int(seed%2)
	}
}

// workload runs ops seeded operations, checking every read against the
// model (the newest acknowledged value or a newer one, partial or failed
// writes included).
func (r *sweepRun) workload(e *Engine, rng *rand.Rand, ops int, nextID *uint64) {
	for i := 0; i < ops; i++ {
		first := rng.Intn(nsect)
		var err error
		switch op := rng.Intn(20); {
		case op < 9:
			n := 1 + rng.Intn(min(64, nsect-first))
			if rng.Intn(6) == 0 {
				n = min(8*(1+rng.Intn(64)), nsect-first)
			}
			*nextID++
			id := *nextID
			p := make([]byte, n*512)
			for s := 0; s < n; s++ {
				sectorPattern(id, first+s, p[s*512:])
			}
			fua := rng.Intn(5) == 0
			within(r.t, r.what, func() {
				if fua {
					err = e.WriteFUA(p, int64(first)*512)
				} else {
					_, err = e.WriteAt(p, int64(first)*512)
				}
			})
			r.m.write(first, n, id, r.check("write", err))
			if err == nil && fua {
				r.m.durable(first, n)
			}
		case op < 12:
			within(r.t, r.what, func() { err = e.Flush() })
			if r.check("flush", err) {
				r.m.durable(0, nsect)
			}
		case op < 14:
			n := 1 + rng.Intn(min(256, nsect-first))
			within(r.t, r.what, func() { err = e.WriteZeroes(int64(first)*512, int64(n)*512) })
			r.m.write(first, n, 0, r.check("write zeroes", err))
		case op < 15:
			n := 1 + rng.Intn(min(256, nsect-first))
			within(r.t, r.what, func() { err = e.Trim(int64(first)*512, int64(n)*512) })
			r.m.trim(first, n, r.check("trim", err))
		case op < 16:
			within(r.t, r.what, func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				err = e.Drain(ctx, nil)
			})
			if errors.Is(err, context.DeadlineExceeded) {
				r.t.Fatalf("%s: drain did not finish nor fail in 20 s", r.what)
			}
			r.check("drain", err)
		default:
			n := 1 + rng.Intn(min(64, nsect-first))
			p := make([]byte, n*512)
			within(r.t, r.what, func() { _, err = e.ReadAt(p, int64(first)*512) })
			if r.check("read", err) {
				r.checkRead(p, first)
			}
		}
	}
}

func (r *sweepRun) checkRead(p []byte, first int) {
	for s := 0; s < len(p)/512; s++ {
		sec := first + s
		id, err := decodeSector(p[s*512:], sec)
		if err != nil {
			r.t.Fatalf("%s: read: %v", r.what, err)
		}
		h := r.m.hist[sec]
		from := r.m.acked[sec]
		for _, v := range h[from:] {
			if v == trimmed {
				from = 0
			}
		}
		ok := false
		for _, v := range h[from:] {
			ok = ok || v == id
		}
		if !ok {
			r.t.Fatalf("%s: sector %d reads write %d; allowed %v (history %v)", r.what, sec, id, h[from:], h)
		}
	}
}

// newSweepRun builds fresh devices; faults are armed by the caller.
func newSweepRun(t *testing.T, what string) *sweepRun {
	r := &sweepRun{t: t, what: what, m: newSectorModel(),
		cacheMem: blockdev.NewMem(testCacheSize(testSegments), nil), backMem: blockdev.NewMem(crashSize, nil)}
	r.cache, r.backing = &injector{d: r.cacheMem}, &injector{d: r.backMem}
	return r
}

// run opens, runs the workload, drains and closes; it returns whether
// the first open succeeded.
func (r *sweepRun) run(seed int64, ops int) (opened bool, shown bool) {
	var e *Engine
	var err error
	within(r.t, r.what, func() {
		o := Options{Cache: r.cache, Backing: r.backing, Format: true, SegmentSize: testSegSize, Tunables: DefaultTunables()}
		sweepTunables(seed)(&o)
		stepping(&o) // the at-th operation of a kind is the same one in every run
		e, err = Open(o)
	})
	if !r.check("open", err) {
		return false, true
	}
	rng := rand.New(rand.NewSource(seed))
	var id uint64
	r.workload(e, rng, ops, &id)
	st := e.Status()
	shown = r.errs > 0 || st.CacheIOErrors+st.BackingIOErrors > 0 || e.Err() != nil
	within(r.t, r.what, func() { err = e.Close() })
	r.check("close", err)
	return true, shown || r.errs > 0
}

// verify reopens crash images (every unflushed write dropped) of the
// devices without faults and checks that nothing durable was lost.
func (r *sweepRun) verify(seed int64) {
	c, b := r.cacheMem.CrashImage(blockdev.CrashDropAll, nil), r.backMem.CrashImage(blockdev.CrashDropAll, nil)
	o := Options{Cache: c, Backing: b, SegmentSize: testSegSize, Tunables: DefaultTunables()}
	sweepTunables(seed)(&o)
	var e *Engine
	var err error
	within(r.t, r.what, func() { e, err = Open(o) })
	if err != nil {
		r.t.Fatalf("%s: reopen without faults: %v", r.what, err)
	}
	r.m.check(r.t, e, false, r.what+": after the fault, a power cut and a reopen")
	if err := e.Close(); err != nil {
		r.t.Fatalf("%s: close: %v", r.what, err)
	}
}

// sampleOps returns the operation indexes to fail out of n: all of them
// when few, else limit of them drawn from rng, the first and last included.
func sampleOps(n, limit int, rng *rand.Rand) []int {
	if n <= limit {
		ks := make([]int, n)
		for i := range ks {
			ks[i] = i
		}
		return ks
	}
	set := map[int]bool{0: true, n - 1: true}
	for len(set) < limit {
		set[rng.Intn(n)] = true
	}
	ks := make([]int, 0, limit)
	for k := range set {
		ks = append(ks, k)
	}
	sort.Ints(ks)
	return ks
}

func TestErrorInjectionSweep(t *testing.T) {
	seeds, ops, perKind := 4, 40, 10
	if stress() {
		seeds, ops, perKind = 20, 80, 40
	}
	runs, fired := 0, 0
	total := 0
	for seed := int64(1); seed <= int64(seeds); seed++ {
		dry := newSweepRun(t, fmt.Sprintf("seed %d without faults", seed))
		if opened, _ := dry.run(seed, ops); !opened || dry.errs != 0 {
			t.Fatalf("seed %d: a run without faults failed (%d errors)", seed, dry.errs)
		}
		dry.verify(seed)
		counts := map[string][nOpKinds]int{"cache": dry.cache.counts(), "backing": dry.backing.counts()}
		rng := rand.New(rand.NewSource(seed * 31337))
		for _, dev := range []string{"cache", "backing"} {
			for kind := opKind(0); kind < nOpKinds; kind++ {
				n := counts[dev][kind]
				total += n
				for _, k := range sampleOps(n, perKind, rng) {
					sticky := (k+int(seed))%2 == 0
					what := fmt.Sprintf("seed %d: %s %v %d of %d failed (sticky %v)", seed, dev, kind, k, n, sticky)
					r := newSweepRun(t, what)
					inj := r.cache
					if dev == "backing" {
						inj = r.backing
					}
					inj.arm(kind, k, sticky)
					opened, shown := r.run(seed, ops)
					runs++
					if !inj.fired.Load() {
						// Stepping mode makes the run a replay of the
						// dry one: operation k of a kind comes again.
						t.Fatalf("%s: the fault never fired: the run is not a replay of the run that counted %d", what, n)
					}
					fired++
					if !shown {
						t.Fatalf("%s: the fault fired but no caller, Status or Err showed it", what)
					}
					inj.disarm()
					if opened {
						r.verify(seed)
					}
				}
			}
		}
	}
	t.Logf("%d runs over %d device operations of %d seeded workloads (at most %d indexes per device and kind), %d faults fired",
		runs, total, seeds, perKind, fired)
}

// TestErrorInjectionRecovery fails each device operation of a recovery
// (the Open of a cache a power cut left unclean, with segments to replay
// and zero records pending): Open returns ErrIO or succeeds, never hangs
// or panics, and either way the durable data is all there, then or at
// the next Open without faults.
func TestErrorInjectionRecovery(t *testing.T) {
	seeds, ops := 4, 60
	if stress() {
		seeds, ops = 20, 120
	}
	runs, fired := 0, 0
	for seed := int64(1); seed <= int64(seeds); seed++ {
		// An unclean cache: the workload, then a power cut.
		r := newSweepRun(t, fmt.Sprintf("seed %d", seed))
		o := Options{Cache: r.cache, Backing: r.backing, Format: true, SegmentSize: testSegSize, Tunables: DefaultTunables()}
		sweepTunables(seed)(&o)
		e, err := Open(o)
		if err != nil {
			t.Fatal(err)
		}
		var id uint64
		r.workload(e, rand.New(rand.NewSource(seed)), ops, &id)
		if r.errs != 0 {
			t.Fatalf("seed %d: %d errors without faults", seed, r.errs)
		}
		halt(e)
		cacheImg, backImg := r.cacheMem.CrashImage(blockdev.CrashDropAll, nil), r.backMem.CrashImage(blockdev.CrashDropAll, nil)
		// Count a recovery's operations.
		dc, db := &injector{d: cacheImg.CrashImage(blockdev.CrashKeepAll, nil)}, &injector{d: backImg.CrashImage(blockdev.CrashKeepAll, nil)}
		o.Cache, o.Backing, o.Format = dc, db, false
		e, err = Open(o)
		if err != nil {
			t.Fatalf("seed %d: recovery without faults: %v", seed, err)
		}
		halt(e)
		for di, n := range [][nOpKinds]int{dc.counts(), db.counts()} {
			dev := []string{"cache", "backing"}[di]
			for kind := opKind(0); kind < nOpKinds; kind++ {
				for k := 0; k < n[kind]; k++ {
					what := fmt.Sprintf("seed %d: recovery with %s %v %d of %d failed", seed, dev, kind, k, n[kind])
					c, b := cacheImg.CrashImage(blockdev.CrashKeepAll, nil), backImg.CrashImage(blockdev.CrashKeepAll, nil)
					ic, ib := &injector{d: c}, &injector{d: b}
					inj := []*injector{ic, ib}[di]
					inj.arm(kind, k, k%2 == 0)
					o.Cache, o.Backing = ic, ib
					var e *Engine
					var err error
					within(t, what, func() { e, err = Open(o) })
					runs++
					if inj.fired.Load() {
						fired++
					}
					if err != nil {
						if !errors.Is(err, ErrIO) {
							t.Fatalf("%s: Open returned %v, which does not wrap ErrIO", what, err)
						}
						if !inj.fired.Load() {
							t.Fatalf("%s: Open failed without a fault: %v", what, err)
						}
					} else {
						r.m.check(t, e, false, what)
						halt(e)
					}
					// The failed (or faulted) recovery must have damaged nothing.
					inj.disarm()
					o.Cache, o.Backing = c.CrashImage(blockdev.CrashDropAll, nil), b.CrashImage(blockdev.CrashDropAll, nil)
					within(t, what, func() { e, err = Open(o) })
					if err != nil {
						t.Fatalf("%s: the next Open without faults: %v", what, err)
					}
					r.m.check(t, e, false, what+", then a power cut and an Open without faults")
					if err := e.Close(); err != nil {
						t.Fatalf("%s: close: %v", what, err)
					}
				}
			}
		}
	}
	t.Logf("%d recoveries, each with one device operation failed (all indexes), %d faults fired", runs, fired)
}
