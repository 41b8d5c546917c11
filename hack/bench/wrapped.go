package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"
)

// The wrapped log (issue 15): 4K random writes QD32 over a working set of
// half the cache, through `writeboost serve --simulate-hdd --direct`,
// measured after the log has wrapped many times, against the same engine
// and workload with a cache that never fills (writeback and cleaning off).
// Both with and without cleaning, and with the CPU contended by busy
// loops, in one run, so the page can report ratios.

// WrappedResult is the wrapped-log figure.
type WrappedResult struct {
	VolumeBytes     int64        `json:"volume_bytes"`
	WorkingSetBytes int64        `json:"working_set_bytes"`
	CacheBytes      int64        `json:"cache_bytes"`
	NeverFullBytes  int64        `json:"never_full_cache_bytes"`
	WrapSec         float64      `json:"wrap_sec"`
	MeasureSec      float64      `json:"measure_sec"`
	Hogs            int          `json:"cpu_hogs"`
	Runs            []WrappedRun `json:"runs"`
}

// WrappedRun is one configuration of the wrapped-log figure.
type WrappedRun struct {
	Case      string    `json:"case"`
	About     string    `json:"about"`
	Contended bool      `json:"cpu_contended"`
	Fio       FioResult `json:"fio"`
	// Wraps is how many times the log went round the ring by the end.
	Wraps float64 `json:"wraps"`
}

// wrappedCases, in the order they run: each contended case right after
// its uncontended twin.
var wrappedCases = []struct {
	id, about string
	neverFull bool
	tunables  []string
	contended bool
}{
	{"never-full", "cache that never fills, writeback and cleaning off", true, []string{"--writeback-threshold=0", "--clean-threshold=0"}, false},
	{"wrapped-no-cleaning", "256 MiB cache, cleaning off (before)", false, []string{"--clean-threshold=0"}, false},
	{"wrapped", "256 MiB cache, default tunables (cleaning on)", false, nil, false},
	{"never-full-contended", "never-full, with the CPU contended", true, []string{"--writeback-threshold=0", "--clean-threshold=0"}, true},
	{"wrapped-contended", "wrapped, with the CPU contended", false, nil, true},
}

// cpuHogs spins n goroutines until stop is closed: another heavy job on
// the same cores.
func cpuHogs(n int, stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			x := uint64(1)
			for {
				select {
				case <-stop:
					return
				default:
				}
				for i := 0; i < 1<<16; i++ {
					x = x*6364136223846793005 + 1442695040888963407
				}
				if x == 0 {
					fmt.Fprint(os.Stderr, "")
				}
			}
		}()
	}
	return &wg
}

func runWrapped(ctx context.Context, bin, dir string, volume, ws, cache int64, wrap, measure time.Duration, only string) WrappedResult {
	res := WrappedResult{VolumeBytes: volume, WorkingSetBytes: ws, CacheBytes: cache, WrapSec: wrap.Seconds(),
		MeasureSec: measure.Seconds(), Hogs: 2}
	// A cache the job never fills past the mark where writeback is urged
	// (three quarters): 4K writes at up to 250,000 IOPS for the short
	// ramp and the measurement.
	res.NeverFullBytes = max(4*cache, int64((2*time.Second+measure).Seconds()*250e3*4096/0.7)) / (1 << 20) * (1 << 20)
	args := []string{"--rw=randwrite", "--bs=4k", "--iodepth=32"}
	for _, c := range wrappedCases {
		if ctx.Err() != nil {
			break
		}
		if only != "" && !slices.Contains(strings.Split(only, ","), c.id) {
			continue
		}
		run := WrappedRun{Case: c.id, About: c.about, Contended: c.contended}
		env := &benchEnv{writeboostBin: bin, exportSize: volume, cacheSize: cache}
		ramp := wrap
		if c.neverFull {
			env.cacheSize, ramp = res.NeverFullBytes, 2*time.Second
		}
		d := filepath.Join(dir, "wrapped-"+c.id)
		uri, stop, err := runWriteboost(ctx, env, d, append([]string{"--direct"}, c.tunables...))
		if err != nil {
			run.Fio.Error = err.Error()
			res.Runs = append(res.Runs, run)
			continue
		}
		var hogStop chan struct{}
		var hogs *sync.WaitGroup
		if c.contended {
			hogStop = make(chan struct{})
			hogs = cpuHogs(res.Hogs, hogStop)
		}
		// fio's --size bounds the offsets: the working set at the start
		// of the volume.
		run.Fio = runFio(ctx, uri, ws, measure, ramp, args)
		if hogs != nil {
			close(hogStop)
			hogs.Wait()
		}
		snap, err := engineSnapshot(ctx, bin, filepath.Join(d, "control.sock"))
		if err != nil {
			klog.ErrorS(err, "writeboost status", "case", c.id)
		}
		run.Fio.Engine = snap
		if snap != nil && snap.NrSegments > 0 {
			run.Wraps = float64(snap.CurrentID) / float64(snap.NrSegments)
		}
		stop()
		os.RemoveAll(d)
		klog.InfoS("wrapped log", "case", c.id, "iops", int(run.Fio.IOPS()), "p99ms", run.Fio.P99Ms(), "wraps", run.Wraps,
			"cleaning", fmt.Sprintf("%+v", snapCleaning(snap)), "error", run.Fio.Error)
		res.Runs = append(res.Runs, run)
	}
	return res
}

func snapCleaning(s *EngineSnapshot) EngineCleaning {
	if s == nil {
		return EngineCleaning{}
	}
	return s.Cleaning
}

// Run returns the run of case id.
func (w WrappedResult) Run(id string) (WrappedRun, bool) {
	for _, r := range w.Runs {
		if r.Case == id {
			return r, r.Fio.Error == "" && r.Fio.IOPS() > 0
		}
	}
	return WrappedRun{}, false
}

// Ratio is IOPS of case a over case b, NaN when either failed.
func (w WrappedResult) Ratio(a, b string) float64 {
	ra, oka := w.Run(a)
	rb, okb := w.Run(b)
	if !oka || !okb {
		return math.NaN()
	}
	return ra.Fio.IOPS() / rb.Fio.IOPS()
}

func renderWrapped(p func(string, ...any), w WrappedResult) {
	p("### The wrapped log (cleaning)\n\n")
	if len(w.Runs) == 0 {
		p("Not measured in this run.\n\n")
		return
	}
	p("`writeboost serve --simulate-hdd --direct` with a %s cache over a %s volume; fio 4K random writes QD32 over its first %s (0.5× the cache) for %.0f s until the log has wrapped many times, then measured for %.0f s. "+
		"The reference is the same engine and workload with a %s cache that never fills (writeback and cleaning off), measured after a 2 s ramp. "+
		"Contended runs add %d busy-looping threads on the 2 cores. Cache write amplification is log blocks per block written by fio (cleaned copies included); each system runs on a fresh cache.\n\n",
		humanBytes(float64(w.CacheBytes)), humanBytes(float64(w.VolumeBytes)), humanBytes(float64(w.WorkingSetBytes)), w.WrapSec, w.MeasureSec,
		humanBytes(float64(w.NeverFullBytes)), w.Hogs)
	p("| Case | Write IOPS | vs never-full | p99 | Log wraps | Cleaned blocks | Segments cleaned / written back | Writeback yields | Paced writes | Cache write amplification |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range w.Runs {
		ref := "never-full"
		if r.Contended {
			ref = "never-full-contended"
		}
		if r.Fio.Error != "" {
			p("| %s | failed: %s | | | | | | | | |\n", r.About, r.Fio.Error)
			continue
		}
		e := r.Fio.Engine
		if e == nil {
			e = &EngineSnapshot{}
		}
		c := e.Cleaning
		p("| %s | %.0f | %s | %.1f ms | %.1f | %d | %d / %d | %d | %d | %.3f |\n", r.About, r.Fio.IOPS(), fmtRatio(w.Ratio(r.Case, ref), "x"), r.Fio.P99Ms(),
			r.Wraps, c.CleanedBlocks, c.CleanedSegments, c.WrittenBackSegments, c.WritebackYields, e.PacedWrites, max(1, c.CacheWriteAmplification))
	}
	p("\n")
}
