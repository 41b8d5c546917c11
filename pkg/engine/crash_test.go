package engine

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// The crash sweep: for many seeded workloads, crash the cache and backing
// devices together at the k-th device write (one Power), take a crash image
// (drop every unflushed write, keep a random subset, or tear writes at
// sector boundaries), reopen, and check every sector against what the
// contract allows:
//   - a sector covered by a completed Flush (or by its own FUA write) holds
//     that value or a newer one written to it;
//   - any other sector holds its old value or one written to it since;
//   - nothing else (every sector carries its write id, sector number and a
//     pattern, so garbage or misplaced data is caught).
// A second crash after more writes on the recovered cache checks that
// nothing stale from before the first crash comes back.
//
// A fourth mode models a kill of the process: RAM buffers live on in shared
// memory and the devices keep every write (the page cache survives), and
// then every acknowledged write must read back exactly.

const crashSize = 1 << 20 // backing bytes
const nsect = crashSize / 512

func sectorPattern(id uint64, sector int, dst []byte) {
	if id == 0 {
		clear(dst[:512])
		return
	}
	binary.LittleEndian.PutUint64(dst[0:], id)
	binary.LittleEndian.PutUint64(dst[8:], uint64(sector))
	x := id*0x9E3779B97F4A7C15 ^ uint64(sector)
	for i := 16; i < 512; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(dst[i:], x)
	}
}

// decodeSector returns the write id a sector holds, or an error for garbage.
func decodeSector(b []byte, sector int) (uint64, error) {
	id := binary.LittleEndian.Uint64(b)
	want := make([]byte, 512)
	sectorPattern(id, sector, want)
	if string(want) != string(b[:512]) {
		return 0, fmt.Errorf("sector %d holds garbage (claims write %d, sector %d)", sector, id, binary.LittleEndian.Uint64(b[8:]))
	}
	return id, nil
}

type sectorModel struct {
	hist  [][]uint64 // per sector: values in the order written (0 = zeros)
	dur   []int      // per sector: index in hist of the newest durable value
	acked []int      // per sector: index in hist of the newest acknowledged value
}

func newSectorModel() *sectorModel {
	m := &sectorModel{hist: make([][]uint64, nsect), dur: make([]int, nsect), acked: make([]int, nsect)}
	for i := range m.hist {
		m.hist[i] = []uint64{0}
	}
	return m
}

func (m *sectorModel) write(first, n int, id uint64, acked bool) {
	for s := first; s < first+n; s++ {
		m.hist[s] = append(m.hist[s], id)
		if acked {
			m.acked[s] = len(m.hist[s]) - 1
		}
	}
}

// trimmed is the history entry of a TRIM: from there on the sector may
// read as any value it ever held (unspecified, but never garbage).
const trimmed = ^uint64(0)

// trim records a TRIM of sectors [first, first+n): the engine trims the
// whole 4 KiB blocks inside it.
func (m *sectorModel) trim(first, n int, acked bool) {
	lo := (first + sectorsPerBlock - 1) / sectorsPerBlock * sectorsPerBlock
	hi := (first + n) / sectorsPerBlock * sectorsPerBlock
	if lo < hi {
		m.write(lo, hi-lo, trimmed, acked)
	}
}

func (m *sectorModel) durable(first, n int) {
	for s := first; s < first+n; s++ {
		m.dur[s] = m.acked[s]
	}
}

func (m *sectorModel) check(t *testing.T, e *Engine, exact bool, what string) {
	t.Helper()
	m.checkAt(t, e, 0, exact, what)
}

// checkAt checks the crashSize bytes at base, sector numbers counted from
// base (grow_test.go models a grown range on its own).
func (m *sectorModel) checkAt(t *testing.T, e *Engine, base int64, exact bool, what string) {
	t.Helper()
	buf := make([]byte, crashSize)
	if _, err := e.ReadAt(buf, base); err != nil {
		t.Fatalf("%s: read after recovery: %v", what, err)
	}
	for s := 0; s < nsect; s++ {
		id, err := decodeSector(buf[s*512:], s)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		from := m.dur[s]
		if exact {
			from = m.acked[s]
		}
		ok := false
		for _, v := range m.hist[s][from:] {
			if v == trimmed {
				from = 0 // unspecified: any value the sector ever held
				break
			}
		}
		for _, v := range m.hist[s][from:] {
			if v == id {
				ok = true
				break
			}
		}
		if !ok {
			t.Fatalf("%s: sector %d holds write %d; allowed %v (history %v)", what, s, id, m.hist[s][from:], m.hist[s])
		}
	}
}

// rebase makes what was read back the new starting point.
func (m *sectorModel) rebase(t *testing.T, e *Engine) {
	buf := make([]byte, crashSize)
	if _, err := e.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for s := 0; s < nsect; s++ {
		id, _ := decodeSector(buf[s*512:], s)
		// The history is kept: after a TRIM any older value may show.
		m.hist[s] = append(m.hist[s], id)
		m.dur[s], m.acked[s] = len(m.hist[s])-1, len(m.hist[s])-1
	}
}

// workload runs ops operations until the devices lose power; it returns
// false when an operation failed.
func crashWorkload(e *Engine, m *sectorModel, rng *rand.Rand, ops int, nextID *uint64) bool {
	// One run in three keeps its writes to a hot 64 KiB, a third of the
	// cache: the oldest segments then hold few live blocks and the
	// cleaner copies them forward (clean.go), so crashes hit cleaning too.
	span := nsect
	if rng.Intn(3) == 0 {
		span = nsect / 16
	}
	for i := 0; i < ops; i++ {
		if e.step != nil && rng.Intn(3) == 0 {
			// Stepping mode: the seed also decides when background work
			// runs, between foreground operations (step.go).
			e.stepBackground(rng)
		}
		switch op := rng.Intn(20); {
		case op < 12:
			first := rng.Intn(span)
			n := 1 + rng.Intn(min(64, span-first))
			if rng.Intn(8) == 0 {
				n = min(8*(1+rng.Intn(64)), span-first) // large writes
			}
			*nextID++
			id := *nextID
			p := make([]byte, n*512)
			for s := 0; s < n; s++ {
				sectorPattern(id, first+s, p[s*512:])
			}
			fua := rng.Intn(6) == 0
			var err error
			if fua {
				err = e.WriteFUA(p, int64(first)*512)
			} else {
				_, err = e.WriteAt(p, int64(first)*512)
			}
			m.write(first, n, id, err == nil)
			if err != nil {
				return false
			}
			if fua {
				m.durable(first, n)
			}
		case op < 15:
			if err := e.Flush(); err != nil {
				return false
			}
			m.durable(0, nsect)
		case op < 16:
			first := rng.Intn(span)
			n := 1 + rng.Intn(min(256, span-first))
			err := e.WriteZeroes(int64(first)*512, int64(n)*512)
			m.write(first, n, 0, err == nil)
			if err != nil {
				return false
			}
		case op < 17:
			first := rng.Intn(nsect)
			n := 1 + rng.Intn(min(256, nsect-first))
			err := e.Trim(int64(first)*512, int64(n)*512)
			m.trim(first, n, err == nil)
			if err != nil {
				return false
			}
		default:
			first := rng.Intn(nsect)
			n := 1 + rng.Intn(min(64, nsect-first))
			p := make([]byte, n*512)
			if _, err := e.ReadAt(p, int64(first)*512); err != nil {
				return false
			}
		}
	}
	return true
}

var crashModes = []blockdev.CrashMode{blockdev.CrashDropAll, blockdev.CrashKeepSubset, blockdev.CrashTear}

// TestCrashSweep sweeps crash points over seeded workloads, in stepping
// mode (step.go): the engine's background work runs between operations
// where the seed says, so a seed's device writes are the same on every run
// and a crash at write k of a seed replays exactly (checked: each crash
// run's writes up to k are compared with those of the counting run).
//
// In CI it crashes at every device write of the first sweepFull seeds and
// at every stride-th write (an offset chosen by the seed) of the others;
// the log line says how many of the seeds' write points that covers.
// WRITEBOOST_STRESS=1 sweeps 300 seeds of 120 operations, every write of
// the first 20 and every 5th of the rest. A failure prints its replay command: WRITEBOOST_CRASH_SEED,
// WRITEBOOST_CRASH_AT (and WRITEBOOST_CRASH_OPS) run that one point.
func TestCrashSweep(t *testing.T) {
	seeds, ops := 100, 60
	full, stride := sweepFull, sweepStride
	if stress() {
		seeds, ops, full, stride = 300, 120, 20, 5
	}
	ops = envInt(t, "WRITEBOOST_CRASH_OPS", ops)
	first := 0
	if s := envInt(t, "WRITEBOOST_CRASH_SEED", -1); s >= 0 {
		first, seeds, full = s, s+1, s+1
	}
	at := envInt(t, "WRITEBOOST_CRASH_AT", -1)
	points, space, cleaned := 0, 0, 0
	for seed := int64(first); seed < int64(seeds); seed++ {
		// Count (and record) the device writes of the whole workload first.
		pw := blockdev.NewPower()
		c, b, log := recorded(blockdev.NewMem(testCacheSize(testSegments), pw), blockdev.NewMem(crashSize, pw))
		e := openTest(t, c, b, func(o *Options) { crashTunables(seed)(o); stepping(o) })
		*log = nil // Open's format writes come before any crash point
		var id uint64
		crashWorkload(e, newSectorModel(), rand.New(rand.NewSource(seed)), ops, &id)
		if e.Status().Cleaning.CleanedSegments > 0 {
			cleaned++
		}
		e.Close() // its writes are crash points too
		want := *log
		total := len(want)
		space += total + 1
		step, offset := 1, 0
		if seed >= int64(full) {
			step, offset = stride, int(seed)%stride
		}
		for k := offset; k <= total; k += step {
			if at >= 0 && k != at {
				continue
			}
			mode := crashModes[(int(seed)+k)%len(crashModes)]
			crashOnce(t, seed, ops, k, mode, want)
			points++
		}
	}
	t.Logf("%d crash points of %d write points (%.0f%%) over %d seeds, every write of the first %d; cleaning ran in %d workloads",
		points, space, 100*float64(points)/float64(max(space, 1)), seeds-first, min(full, seeds)-first, cleaned)
	if at < 0 && seeds-first >= 10 && cleaned < (seeds-first)/10 {
		t.Errorf("cleaning ran in only %d of %d workloads: the sweep does not cover it", cleaned, seeds-first)
	}
}

// The CI sweep: every write point of the first sweepFull seeds, every
// sweepStride-th of the rest (see TestCrashSweep's log line for the share).
const (
	sweepFull   = 2
	sweepStride = 10
)

func crashTunables(seed int64) func(*Options) {
	return func(o *Options) {
		o.Tunables.NrMaxBatchedWriteback = 1 + int(seed%3)
		o.Tunables.ReadCacheThreshold = []int{0, 8}[seed%2]
		o.Tunables.WritebackThreshold = []int{0, 100}[(seed/2)%2]
		o.RAMBuffers = 1 + int(seed%2)
		o.Tunables.WriteAroundMode = seed%5 == 4
		o.Tunables.CleanThreshold = []int{50, 90, 0}[(seed/3)%3]
	}
}

func crashOnce(t *testing.T, seed int64, ops, k int, mode blockdev.CrashMode, want []devWrite) {
	what := fmt.Sprintf("seed %d crash at write %d mode %v (replay: WRITEBOOST_CRASH_SEED=%d WRITEBOOST_CRASH_AT=%d WRITEBOOST_CRASH_OPS=%d go test -race -run 'TestCrashSweep$' ./pkg/engine/)",
		seed, k, mode, seed, k, ops)
	pw := blockdev.NewPower()
	cache, backing := blockdev.NewMem(testCacheSize(testSegments), pw), blockdev.NewMem(crashSize, pw)
	c, b, log := recorded(cache, backing)
	e := openTest(t, c, b, func(o *Options) { crashTunables(seed)(o); stepping(o) })
	*log = nil
	pw.CrashAfterWrites(k)
	m := newSectorModel()
	var id uint64
	rng := rand.New(rand.NewSource(seed))
	crashWorkload(e, m, rng, ops, &id)
	e.Close()
	pw.CrashAfterWrites(0) // whatever the engine does from now on is lost
	// The run must have issued the counting run's writes up to the crash
	// (the k-th write is attempted and fails, so compare k+1 of them).
	got := *log
	n := min(k+1, len(want))
	if len(got) < n || firstDiffWrite(got[:n], want[:n]) >= 0 {
		t.Fatalf("%s: not a replay: the crash run's device writes differ from the counting run's at write %d", what, firstDiffWrite(got[:min(n, len(got))], want[:n]))
	}
	crng := rand.New(rand.NewSource(seed*7919 + int64(k)))
	c2, b2 := cache.CrashImage(mode, crng), backing.CrashImage(mode, crng)
	e2, err := Open(Options{Cache: c2, Backing: b2, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables(), stepping: true, Clock: &fakeClock{now: time.Unix(1e9, 0)}})
	if err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	m.check(t, e2, false, what)

	// Second life: more writes, a flush, a crash that drops everything
	// unflushed; stale segments of the first life must stay dead.
	m.rebase(t, e2)
	if !crashWorkload(e2, m, rng, ops/2, &id) {
		t.Fatalf("%s: second life failed without a crash: %v", what, e2.Err())
	}
	halt(e2) // freeze: model a power cut now, without Close's flush
	c3, b3 := c2.CrashImage(blockdev.CrashDropAll, crng), b2.CrashImage(blockdev.CrashDropAll, crng)
	e3, err := Open(Options{Cache: c3, Backing: b3, SegmentSize: testSegSize, RAMBuffers: 2, Tunables: DefaultTunables()})
	if err != nil {
		t.Fatalf("%s: second reopen: %v", what, err)
	}
	m.check(t, e3, false, what+" (second crash)")
	if err := e3.Close(); err != nil {
		t.Fatalf("%s: close: %v", what, err)
	}
}

// TestKillSweep models SIGKILL of the serving process at many instants:
// RAM buffers survive in shared memory, the devices keep all writes, and
// every acknowledged write must read back exactly.
func TestKillSweep(t *testing.T) {
	seeds, ops := 20, 60
	if stress() {
		seeds = 300
	}
	for seed := int64(0); seed < int64(seeds); seed++ {
		for k := 0; k < 200; k += 9 {
			pw := blockdev.NewPower()
			cache, backing := blockdev.NewMem(testCacheSize(testSegments), pw), blockdev.NewMem(crashSize, pw)
			mem := NewHeapBuffer(BufferBytes(testSegSize, 2))
			e := openTest(t, cache, backing, func(o *Options) { crashTunables(seed)(o); stepping(o); o.Buffer = mem; o.RAMBuffers = 2 })
			pw.CrashAfterWrites(k) // the kill: the process stops touching devices
			m := newSectorModel()
			var id uint64
			crashWorkload(e, m, rand.New(rand.NewSource(seed)), ops, &id)
			pw.CrashAfterWrites(0)
			rng := rand.New(rand.NewSource(seed))
			c2, b2 := cache.CrashImage(blockdev.CrashKeepAll, rng), backing.CrashImage(blockdev.CrashKeepAll, rng)
			halt(e)
			e2, err := Open(Options{Cache: c2, Backing: b2, SegmentSize: testSegSize, RAMBuffers: 2, Buffer: mem, Tunables: DefaultTunables()})
			if err != nil {
				t.Fatalf("seed %d kill at %d: reopen: %v", seed, k, err)
			}
			m.check(t, e2, true, fmt.Sprintf("seed %d kill at write %d", seed, k))
			e2.Close()
		}
	}
}

var _ = errors.New

func isErr(err, target error) bool { return errors.Is(err, target) }
