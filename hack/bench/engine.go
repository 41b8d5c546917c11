package main

import (
	"context"
	"fmt"
	"math/rand"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
)

const blockSize = 4096

// WritebackResult compares writing back N random dirty blocks through the
// engine (sorted batches) with writing the same blocks to the disk model in
// the order they arrived. Times are on the hddsim virtual clock.
type WritebackResult struct {
	Blocks       int     `json:"blocks"`
	BackingBytes int64   `json:"backing_bytes"`
	SortedSec    float64 `json:"sorted_sec"`
	ArrivalSec   float64 `json:"arrival_sec"`
	Speedup      float64 `json:"speedup"` // ArrivalSec / SortedSec
	SortedOps    int64   `json:"sorted_backing_requests"`
	ArrivalOps   int64   `json:"arrival_backing_requests"`
}

// OpenResult is one open of a full cache.
type OpenResult struct {
	Case           string  `json:"case"` // "clean" or "crash"
	CacheBytes     int64   `json:"cache_bytes"`
	DirtyBlocks    uint64  `json:"dirty_blocks"`
	ReadBytes      uint64  `json:"read_bytes"`
	ReadPctOfCache float64 `json:"read_pct_of_cache"`
	OpenSec        float64 `json:"open_sec"`
	Error          string  `json:"error,omitempty"`
}

// IndexResult is the RAM the block index takes.
type IndexResult struct {
	CacheBytes     int64   `json:"cache_bytes"`
	IndexBytes     uint64  `json:"index_bytes"`
	NrCacheBlocks  uint64  `json:"nr_cache_blocks"`
	BytesPerBlock  float64 `json:"bytes_per_block"`
	PctOfCacheSize float64 `json:"pct_of_cache_size"`
}

// RingFullResult is write throughput and latency with the log ring full,
// so that every new segment waits for writeback to the (real-sleep) HDD.
type RingFullResult struct {
	CacheBytes    int64     `json:"cache_bytes"`
	BackingBytes  int64     `json:"backing_bytes"`
	Writers       int       `json:"writers"`
	MeasureSec    float64   `json:"measure_sec"`
	WarmupSec     float64   `json:"warmup_sec"`
	IOPS          float64   `json:"iops"`
	P50Ms         float64   `json:"p50_ms"`
	P99Ms         float64   `json:"p99_ms"`
	MaxMs         float64   `json:"max_ms"`
	RawHDDIOPS    float64   `json:"raw_hdd_iops"`
	RawHDDP99Ms   float64   `json:"raw_hdd_p99_ms"`
	IOPSRatio     float64   `json:"iops_ratio_vs_raw_hdd"`
	P99Ratio      float64   `json:"p99_ratio_vs_raw_hdd"`
	PerSecondIOPS []float64 `json:"per_second_iops"`
	DirtyPct      []float64 `json:"per_second_dirty_pct"`
	// 1000 evenly spaced quantiles of each latency distribution, for the
	// histogram (the raw samples would make the JSON megabytes long).
	LatencyMs    []float64 `json:"latency_quantiles_ms"`
	RawLatencyMs []float64 `json:"raw_hdd_latency_quantiles_ms"`
	Error        string    `json:"error,omitempty"`
}

func pattern(blk int64) []byte {
	p := make([]byte, blockSize)
	for i := range p {
		p[i] = byte(blk*31 + int64(i)*7 + 1)
	}
	return p
}

func writebackTunables() engine.Tunables {
	t := engine.DefaultTunables()
	t.WritebackThreshold = 0 // nothing is written back until Drain
	return t
}

// measureWriteback runs figure (1) for n distinct random blocks over a
// backing device of backingBytes.
func measureWriteback(ctx context.Context, n int, backingBytes int64, seed int64) (WritebackResult, error) {
	res := WritebackResult{Blocks: n, BackingBytes: backingBytes}
	rng := rand.New(rand.NewSource(seed))
	perm := rng.Perm(int(backingBytes / blockSize))[:n]

	disk := hddsim.New(blockdev.NewMem(backingBytes, nil), hddsim.DefaultModel(), hddsim.Virtual)
	// The cache holds the n blocks well below the 3/4 mark at which the
	// engine starts writeback on its own.
	cacheBytes := max(int64(n)*blockSize*4, 64<<20)
	e, err := engine.Open(engine.Options{
		Cache: blockdev.NewMem(cacheBytes, nil), Backing: disk, Format: true,
		Tunables: writebackTunables(), Name: "bench-writeback",
	})
	if err != nil {
		return res, fmt.Errorf("open engine: %w", err)
	}
	defer e.Close()
	for _, b := range perm {
		if _, err := e.WriteAt(pattern(int64(b)), int64(b)*blockSize); err != nil {
			return res, fmt.Errorf("write: %w", err)
		}
	}
	if err := e.Flush(); err != nil {
		return res, fmt.Errorf("flush: %w", err)
	}
	if d := e.Status().NrDirtyCacheBlocks; d != uint64(n) {
		return res, fmt.Errorf("%d dirty blocks before drain, want %d (writeback ran early?)", d, n)
	}
	t0, s0 := disk.Elapsed(), disk.Stats()
	if err := e.Drain(ctx, nil); err != nil {
		return res, fmt.Errorf("drain: %w", err)
	}
	res.SortedSec = (disk.Elapsed() - t0).Seconds()
	res.SortedOps = disk.Stats().Requests - s0.Requests

	arr := hddsim.New(blockdev.NewMem(backingBytes, nil), hddsim.DefaultModel(), hddsim.Virtual)
	for _, b := range perm {
		if _, err := arr.WriteAt(pattern(int64(b)), int64(b)*blockSize); err != nil {
			return res, fmt.Errorf("arrival write: %w", err)
		}
	}
	if err := arr.Flush(); err != nil {
		return res, fmt.Errorf("arrival flush: %w", err)
	}
	res.ArrivalSec = arr.Elapsed().Seconds()
	res.ArrivalOps = arr.Stats().Requests
	if res.SortedSec > 0 {
		res.Speedup = res.ArrivalSec / res.SortedSec
	}
	return res, nil
}

// measureOpen runs figures (2) and (3): a cache of cacheBytes filled to
// fillFrac with dirty data (writeback off), opened after a clean Close and
// from a crash image taken after the last Flush.
func measureOpen(cacheBytes int64, fillFrac float64) ([]OpenResult, IndexResult, error) {
	var idx IndexResult
	cache := blockdev.NewMem(cacheBytes, nil)
	backing := blockdev.NewMem(2*cacheBytes, nil)
	opts := engine.Options{Cache: cache, Backing: backing, Format: true, Tunables: writebackTunables(), Name: "bench-open"}
	e, err := engine.Open(opts)
	if err != nil {
		return nil, idx, fmt.Errorf("open engine: %w", err)
	}
	const chunk = 256 << 10
	nChunks := int(float64(cacheBytes) * fillFrac / chunk)
	rng := rand.New(rand.NewSource(42))
	perm := rng.Perm(int(backing.Size() / chunk))[:nChunks]
	buf := make([]byte, chunk)
	for i, c := range perm {
		for j := 0; j < len(buf); j += blockSize {
			buf[j] = byte(i)
			buf[j+1] = byte(j / blockSize)
		}
		if _, err := e.WriteAt(buf, int64(c)*chunk); err != nil {
			e.Close()
			return nil, idx, fmt.Errorf("fill: %w", err)
		}
	}
	if err := e.Flush(); err != nil {
		e.Close()
		return nil, idx, fmt.Errorf("flush: %w", err)
	}
	dirty := e.Status().NrDirtyCacheBlocks
	crash := cache.CrashImage(blockdev.CrashDropAll, rand.New(rand.NewSource(1)))
	if err := e.Close(); err != nil {
		return nil, idx, fmt.Errorf("close: %w", err)
	}
	klog.InfoS("full cache written", "cacheBytes", cacheBytes, "dirtyBlocks", dirty)

	var out []OpenResult
	for _, c := range []struct {
		name string
		dev  blockdev.Device
	}{{"clean", cache}, {"crash", crash}} {
		r := OpenResult{Case: c.name, CacheBytes: cacheBytes}
		cnt := blockdev.NewCounting(c.dev)
		o := opts
		o.Cache, o.Format = cnt, false
		t0 := time.Now()
		e2, err := engine.Open(o)
		r.OpenSec = time.Since(t0).Seconds()
		if err != nil {
			r.Error = err.Error()
			out = append(out, r)
			continue
		}
		st := e2.Status()
		r.ReadBytes = uint64(cnt.Snapshot().ReadBytes)
		r.ReadPctOfCache = 100 * float64(r.ReadBytes) / float64(cacheBytes)
		r.DirtyBlocks = st.NrDirtyCacheBlocks
		if st.NrDirtyCacheBlocks != dirty {
			r.Error = fmt.Sprintf("reopened with %d dirty blocks, want %d", st.NrDirtyCacheBlocks, dirty)
		}
		if c.name == "clean" {
			idx = IndexResult{CacheBytes: cacheBytes, IndexBytes: st.IndexBytes, NrCacheBlocks: st.NrCacheBlocks}
			if st.NrCacheBlocks > 0 {
				idx.BytesPerBlock = float64(st.IndexBytes) / float64(st.NrCacheBlocks)
			}
			idx.PctOfCacheSize = 100 * float64(st.IndexBytes) / float64(cacheBytes)
		}
		if err := e2.Close(); err != nil && r.Error == "" {
			r.Error = fmt.Sprintf("close: %v", err)
		}
		out = append(out, r)
	}
	return out, idx, nil
}

// randomWriters runs w goroutines writing random 4K blocks to write until
// stop is closed, recording each latency while rec is set.
type randomWriters struct {
	ops       atomic.Int64
	bytes     atomic.Int64
	recording atomic.Bool
	mu        sync.Mutex
	lat       []float64
	err       atomic.Value
}

func (rw *randomWriters) run(w int, span int64, write func(p []byte, off int64) error, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for g := range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(g) + 7))
			p := pattern(int64(g))
			var local []float64
			defer func() {
				rw.mu.Lock()
				rw.lat = append(rw.lat, local...)
				rw.mu.Unlock()
			}()
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := rng.Int63n(span/blockSize) * blockSize
				t0 := time.Now()
				if err := write(p, off); err != nil {
					rw.err.Store(err)
					return
				}
				if rw.recording.Load() {
					local = append(local, float64(time.Since(t0))/1e6)
					rw.ops.Add(1)
				}
				rw.bytes.Add(blockSize)
			}
		}()
	}
	return &wg
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p / 100 * float64(len(sorted)-1))
	return sorted[i]
}

// quantiles returns n evenly spaced quantiles of sorted.
func quantiles(sorted []float64, n int) []float64 {
	if len(sorted) <= n {
		return sorted
	}
	q := make([]float64, n)
	for i := range q {
		q[i] = sorted[i*(len(sorted)-1)/(n-1)]
	}
	return q
}

// probeBackgroundWriteback writes random 4K blocks for a while into an
// engine with default tunables over a real-sleep HDD model, then leaves it
// idle and prints how far background writeback gets each second.
func probeBackgroundWriteback(write, idle time.Duration) error {
	disk := hddsim.New(blockdev.NewMem(256<<20, nil), hddsim.DefaultModel(), hddsim.RealSleep)
	e, err := engine.Open(engine.Options{Cache: blockdev.NewMem(1<<30, nil), Backing: disk, Format: true, Name: "probe"})
	if err != nil {
		return fmt.Errorf("open engine: %w", err)
	}
	defer e.Close()
	rng := rand.New(rand.NewSource(1))
	p := pattern(1)
	n := 0
	for t0 := time.Now(); time.Since(t0) < write; n++ {
		if _, err := e.WriteAt(p, rng.Int63n(65536)*blockSize); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
	fmt.Printf("wrote %d random 4K blocks over 256 MiB in %s; now idle\n", n, write)
	for i := 0; i <= int(idle/time.Second); i++ {
		st := e.Status()
		fmt.Printf("idle %2ds: current_id=%d last_writeback_id=%d dirty=%d writeback_bytes=%d backing_utilization=%.2f hdd_busy=%s\n",
			i, st.CurrentID, st.LastWritebackID, st.NrDirtyCacheBlocks, st.WritebackBytes, st.BackingUtilization, disk.Busy().Round(time.Millisecond))
		time.Sleep(time.Second)
	}
	return nil
}

// measureRingFull runs figure (4).
func measureRingFull(cacheBytes, backingBytes int64, writers int, warmupMax, measure time.Duration) RingFullResult {
	res := RingFullResult{CacheBytes: cacheBytes, BackingBytes: backingBytes, Writers: writers}

	// Baseline: the same writers straight on the raw disk model.
	raw := hddsim.New(blockdev.NewMem(backingBytes, nil), hddsim.DefaultModel(), hddsim.RealSleep)
	var rw0 randomWriters
	rw0.recording.Store(true)
	stop0 := make(chan struct{})
	t0 := time.Now()
	wg0 := rw0.run(writers, backingBytes, func(p []byte, off int64) error { _, err := raw.WriteAt(p, off); return err }, stop0)
	time.Sleep(measure / 2)
	close(stop0)
	wg0.Wait()
	el := time.Since(t0).Seconds()
	res.RawHDDIOPS = float64(rw0.ops.Load()) / el
	slices.Sort(rw0.lat)
	res.RawHDDP99Ms = percentile(rw0.lat, 99)
	res.RawLatencyMs = quantiles(rw0.lat, 1000)

	disk := hddsim.New(blockdev.NewMem(backingBytes, nil), hddsim.DefaultModel(), hddsim.RealSleep)
	e, err := engine.Open(engine.Options{
		Cache: blockdev.NewMem(cacheBytes, nil), Backing: disk, Format: true, Name: "bench-ringfull",
	})
	if err != nil {
		res.Error = fmt.Sprintf("open engine: %v", err)
		return res
	}
	defer e.Close()
	var rw randomWriters
	stop := make(chan struct{})
	wg := rw.run(writers, backingBytes, func(p []byte, off int64) error { _, err := e.WriteAt(p, off); return err }, stop)
	// Warm up until the log has taken a whole cache's worth of writes:
	// from then on every new segment needs one written back.
	tw := time.Now()
	for rw.bytes.Load() < cacheBytes && time.Since(tw) < warmupMax {
		time.Sleep(20 * time.Millisecond)
	}
	res.WarmupSec = time.Since(tw).Seconds()
	rw.recording.Store(true)
	tm := time.Now()
	last := int64(0)
	for i := 0; i < int(measure/time.Second); i++ {
		time.Sleep(time.Until(tm.Add(time.Duration(i+1) * time.Second)))
		n := rw.ops.Load()
		res.PerSecondIOPS = append(res.PerSecondIOPS, float64(n-last))
		last = n
		st := e.Status()
		if st.NrCacheBlocks > 0 {
			res.DirtyPct = append(res.DirtyPct, 100*float64(st.NrDirtyCacheBlocks)/float64(st.NrCacheBlocks))
		}
	}
	rw.recording.Store(false)
	res.MeasureSec = time.Since(tm).Seconds()
	close(stop)
	wg.Wait()
	if v := rw.err.Load(); v != nil {
		res.Error = fmt.Sprintf("write: %v", v)
	}
	res.IOPS = float64(last) / res.MeasureSec
	slices.Sort(rw.lat)
	res.P50Ms, res.P99Ms = percentile(rw.lat, 50), percentile(rw.lat, 99)
	if len(rw.lat) > 0 {
		res.MaxMs = rw.lat[len(rw.lat)-1]
	}
	res.LatencyMs = quantiles(rw.lat, 1000)
	if res.RawHDDIOPS > 0 {
		res.IOPSRatio = res.IOPS / res.RawHDDIOPS
	}
	if res.RawHDDP99Ms > 0 {
		res.P99Ratio = res.P99Ms / res.RawHDDP99Ms
	}
	return res
}
