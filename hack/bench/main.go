// Command bench measures writeboost against its peers and regenerates
// docs/benchmarks.md, its charts and docs/benchmarks/results.json (issue 8,
// `make bench`).
//
// One client, fio's nbd engine, drives eight NBD servers in one run on the
// same machine, so that the page can report ratios: absolute figures on a
// shared machine drift from run to run, ratios measured minutes apart much
// less. The engine-level figures (sorted writeback, opening a full cache,
// index size, behaviour with the log ring full) are measured in-process.
//
// It needs fio and nbdkit (hack/bench.sh installs them through hack/deps.sh)
// and builds cmd/writeboost itself.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// Results is everything one run measured; it is written as results.json
// and rendered into the page.
type Results struct {
	Started   time.Time `json:"started"`
	Finished  time.Time `json:"finished"`
	Machine   Machine   `json:"machine"`
	Config    Config    `json:"config"`
	Systems   []SysInfo `json:"systems"`
	Workloads []WlInfo  `json:"workloads"`
	// Fio[workload][system]
	Fio       map[string]map[string]FioResult `json:"fio"`
	Writeback []WritebackResult               `json:"writeback"`
	Open      []OpenResult                    `json:"open_full_cache"`
	Index     IndexResult                     `json:"index"`
	RingFull  RingFullResult                  `json:"ring_full"`
	Wrapped   WrappedResult                   `json:"wrapped"`
	Goals     []Goal                          `json:"goals"`
	Errors    []string                        `json:"errors,omitempty"`
}

// Config records the parameters of the run.
type Config struct {
	RuntimeSec        float64 `json:"fio_runtime_sec"`
	RampSec           float64 `json:"fio_ramp_sec"`
	ExportBytes       int64   `json:"export_bytes"`
	WriteboostCache   int64   `json:"writeboost_cache_bytes"`
	OpenCacheBytes    int64   `json:"open_cache_bytes"`
	OpenFillFraction  float64 `json:"open_fill_fraction"`
	RingCacheBytes    int64   `json:"ring_full_cache_bytes"`
	RingBackingBytes  int64   `json:"ring_full_backing_bytes"`
	RingWriters       int     `json:"ring_full_writers"`
	RingMeasureSec    float64 `json:"ring_full_measure_sec"`
	WritebackHeadline string  `json:"writeback_headline"`
}

// SysInfo describes one system and whether it came up.
type SysInfo struct {
	ID    string `json:"id"`
	Name  string `json:"name"`
	About string `json:"about"`
	Error string `json:"error,omitempty"`
}

// WlInfo describes one workload.
type WlInfo struct {
	ID     string `json:"id"`
	Title  string `json:"title"`
	Metric string `json:"metric"`
}

func main() {
	klog.InitFlags(nil)
	// Subcommands of make bench-vm (hack/bench-vm.sh).
	if len(os.Args) > 1 {
		sub := map[string]func([]string) error{"nbd-serve": nbdServeMain, "vm": vmMain, "vm-render": vmRenderMain, "vm-disk": vmDiskMain}
		if f, ok := sub[os.Args[1]]; ok {
			err := f(os.Args[2:])
			klog.Flush()
			if err != nil {
				klog.ErrorS(err, os.Args[1]+" failed")
				klog.Flush()
				os.Exit(1)
			}
			return
		}
	}
	out := flag.String("out", "docs", "directory receiving benchmarks.md and benchmarks/")
	runtime := flag.Duration("runtime", 8*time.Second, "fio measured time per job")
	ramp := flag.Duration("ramp", 2*time.Second, "fio ramp time per job (not measured)")
	size := flag.Int64("size", 1<<30, "size of every export (the fio working set), bytes")
	wbCache := flag.Int64("cache-size", 4<<30, "cache image of system (d), bytes")
	openCache := flag.Int64("open-cache-size", 4<<30, "cache size for the open-a-full-cache figure, bytes")
	ringMeasure := flag.Duration("ring-measure", 15*time.Second, "measured time with the ring full")
	only := flag.String("systems", "abcdefgh", "systems to run (letters)")
	skipFio := flag.Bool("skip-fio", false, "only the engine-level figures")
	skipEngine := flag.Bool("skip-engine", false, "only the fio figures")
	skipWrapped := flag.Bool("skip-wrapped", false, "leave out the wrapped-log figure (cleaning)")
	wrapTime := flag.Duration("wrap-time", 25*time.Second, "wrapped-log figure: writes before the measurement, for the log to wrap")
	wrapMeasure := flag.Duration("wrap-measure", 10*time.Second, "wrapped-log figure: measured time")
	wrapCases := flag.String("wrap-cases", "", "wrapped-log figure: comma-separated cases to run (default all)")
	probe := flag.Bool("probe-writeback", false, "only print how background writeback progresses on an idle engine (diagnostic)")
	rerender := flag.Bool("rerender", false, "redraw the page and charts from OUT/benchmarks/results.json without measuring")
	work := flag.String("workdir", "", "scratch directory (default: a new one under $TMPDIR, removed at the end)")
	flag.Parse()

	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if *probe {
		if err := probeBackgroundWriteback(3*time.Second, 15*time.Second); err != nil {
			klog.ErrorS(err, "probe failed")
			os.Exit(1)
		}
		return
	}
	if *rerender {
		if err := rerenderFrom(*out); err != nil {
			klog.ErrorS(err, "rerender failed")
			os.Exit(1)
		}
		return
	}
	if err := run(ctx, runOpts{
		out: *out, runtime: *runtime, ramp: *ramp, size: *size, wbCache: *wbCache,
		openCache: *openCache, ringMeasure: *ringMeasure, systems: *only,
		skipFio: *skipFio, skipEngine: *skipEngine, workdir: *work,
		skipWrapped: *skipWrapped, wrapTime: *wrapTime, wrapMeasure: *wrapMeasure, wrapCases: *wrapCases,
	}); err != nil {
		klog.ErrorS(err, "bench failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

type runOpts struct {
	out                        string
	runtime, ramp, ringMeasure time.Duration
	size, wbCache, openCache   int64
	systems                    string
	skipFio, skipEngine        bool
	workdir                    string
	skipWrapped                bool
	wrapTime, wrapMeasure      time.Duration
	wrapCases                  string
}

func run(ctx context.Context, o runOpts) error {
	res := &Results{
		Started: time.Now().UTC(),
		Fio:     map[string]map[string]FioResult{},
		Config: Config{
			RuntimeSec: o.runtime.Seconds(), RampSec: o.ramp.Seconds(),
			ExportBytes: o.size, WriteboostCache: o.wbCache,
			OpenCacheBytes: o.openCache, OpenFillFraction: 0.70,
			RingCacheBytes: 96 << 20, RingBackingBytes: 1 << 30, RingWriters: 8,
			RingMeasureSec:    o.ringMeasure.Seconds(),
			WritebackHeadline: "4096 random 4 KiB blocks over a 128 MiB backing device",
		},
	}
	res.Machine = machineFacts(ctx)
	for _, w := range workloads {
		res.Workloads = append(res.Workloads, WlInfo{ID: w.ID, Title: w.Title, Metric: w.Metric})
	}

	dir := o.workdir
	if dir == "" {
		d, err := os.MkdirTemp("", "writeboost-bench-")
		if err != nil {
			return fmt.Errorf("scratch dir: %w", err)
		}
		dir = d
		defer os.RemoveAll(d)
	} else if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("scratch dir: %w", err)
	}

	bin := filepath.Join(dir, "writeboost")
	if !o.skipFio || !o.skipWrapped {
		build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/writeboost")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return fmt.Errorf("build cmd/writeboost (run from the repository root): %w", err)
		}
	}
	if !o.skipFio {
		env := &benchEnv{writeboostBin: bin, exportSize: o.size, cacheSize: o.wbCache}
		for _, s := range systems {
			if !strings.Contains(o.systems, s.ID) {
				continue
			}
			info := SysInfo{ID: s.ID, Name: s.Name, About: s.About}
			if err := runSystem(ctx, res, env, s, dir, o); err != nil {
				info.Error = err.Error()
				res.Errors = append(res.Errors, fmt.Sprintf("(%s) %s: %v", s.ID, s.Name, err))
				klog.ErrorS(err, "system failed", "system", s.ID)
			}
			res.Systems = append(res.Systems, info)
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
	}

	if !o.skipWrapped && ctx.Err() == nil {
		res.Wrapped = runWrapped(ctx, bin, dir, o.size, 128<<20, 256<<20, o.wrapTime, o.wrapMeasure, o.wrapCases)
		for _, r := range res.Wrapped.Runs {
			if r.Fio.Error != "" {
				res.Errors = append(res.Errors, fmt.Sprintf("wrapped log, %s: %s", r.Case, r.Fio.Error))
			}
		}
	}
	if !o.skipEngine {
		runEngineFigures(ctx, res, o)
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	res.Goals = evaluateGoals(res)
	res.Finished = time.Now().UTC()
	return writeOutputs(res, o.out)
}

func runSystem(ctx context.Context, res *Results, env *benchEnv, s System, dir string, o runOpts) error {
	sdir := filepath.Join(dir, s.ID)
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	klog.InfoS("starting system", "system", s.ID, "name", s.Name)
	uri, stop, err := s.start(ctx, env, sdir)
	if err != nil {
		return err
	}
	defer func() {
		t := time.Now()
		stop()
		klog.InfoS("stopped system", "system", s.ID, "seconds", time.Since(t).Seconds())
		// Free the scratch images of this system before the next one.
		os.RemoveAll(sdir)
	}()
	// Prefill the whole export, so that reads are warm and no server
	// answers reads of never-written ranges from a hole.
	t0 := time.Now()
	pre := runFio(ctx, uri, env.exportSize, 0, 0, []string{"--rw=write", "--bs=1m", "--iodepth=4"})
	if pre.Error != "" {
		return fmt.Errorf("prefill: %s", pre.Error)
	}
	klog.InfoS("prefilled", "system", s.ID, "seconds", time.Since(t0).Seconds())
	for _, w := range workloads {
		r := runFio(ctx, uri, env.exportSize, o.runtime, o.ramp, w.Args)
		if res.Fio[w.ID] == nil {
			res.Fio[w.ID] = map[string]FioResult{}
		}
		if s.control != "" {
			snap, err := engineSnapshot(ctx, env.writeboostBin, filepath.Join(sdir, s.control))
			if err != nil {
				klog.ErrorS(err, "writeboost status", "system", s.ID)
			}
			r.Engine = snap
		}
		res.Fio[w.ID][s.ID] = r
		klog.InfoS("fio", "system", s.ID, "workload", w.ID, "iops", int(r.IOPS()), "MBps", int(r.BW()/1e6), "p99ms", r.P99Ms(), "ringUsed", r.Engine.RingUsed(), "error", r.Error)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return nil
}

// engineSnapshot asks a running `writeboost serve` for its status.
func engineSnapshot(ctx context.Context, bin, control string) (*EngineSnapshot, error) {
	out, err := exec.CommandContext(ctx, bin, "status", "--control", control, "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("writeboost status --control %s: %w", control, err)
	}
	var s EngineSnapshot
	if err := json.Unmarshal(out, &s); err != nil {
		return nil, fmt.Errorf("decode status: %w", err)
	}
	return &s, nil
}

func runEngineFigures(ctx context.Context, res *Results, o runOpts) {
	for _, c := range []struct {
		n       int
		backing int64
	}{{1024, 128 << 20}, {2048, 128 << 20}, {4096, 128 << 20}, {8192, 128 << 20}, {4096, 1 << 30}} {
		r, err := measureWriteback(ctx, c.n, c.backing, 1)
		if err != nil {
			res.Errors = append(res.Errors, fmt.Sprintf("writeback %d blocks: %v", c.n, err))
			continue
		}
		klog.InfoS("writeback", "blocks", c.n, "backing", c.backing, "sortedSec", r.SortedSec, "arrivalSec", r.ArrivalSec, "speedup", r.Speedup)
		res.Writeback = append(res.Writeback, r)
	}
	res.RingFull = measureRingFull(res.Config.RingCacheBytes, res.Config.RingBackingBytes, res.Config.RingWriters, 30*time.Second, o.ringMeasure)
	klog.InfoS("ring full", "iops", res.RingFull.IOPS, "p99ms", res.RingFull.P99Ms, "rawIOPS", res.RingFull.RawHDDIOPS, "rawP99ms", res.RingFull.RawHDDP99Ms, "error", res.RingFull.Error)
	if res.RingFull.Error != "" {
		res.Errors = append(res.Errors, "ring full: "+res.RingFull.Error)
	}
	// The open figure allocates gigabytes of page maps; nothing timed runs
	// after it, and the memory is returned before the outputs are drawn.
	if ctx.Err() != nil {
		return
	}
	op, idx, err := measureOpen(o.openCache, res.Config.OpenFillFraction)
	if err != nil {
		res.Errors = append(res.Errors, fmt.Sprintf("open full cache: %v", err))
	}
	for _, r := range op {
		klog.InfoS("open full cache", "case", r.Case, "readPct", r.ReadPctOfCache, "seconds", r.OpenSec, "error", r.Error)
	}
	res.Open, res.Index = op, idx
	debug.FreeOSMemory()
}

// rerenderFrom rebuilds the page from a results.json of an earlier run
// (the goals' notes come from this program, the figures from the file).
func rerenderFrom(out string) error {
	b, err := os.ReadFile(filepath.Join(out, "benchmarks", "results.json"))
	if err != nil {
		return fmt.Errorf("read results: %w", err)
	}
	var res Results
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("decode results: %w", err)
	}
	res.Goals = evaluateGoals(&res)
	return writeOutputs(&res, out)
}

func writeOutputs(res *Results, out string) error {
	chartDir := filepath.Join(out, "benchmarks")
	if err := os.MkdirAll(chartDir, 0o755); err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	charts, err := drawCharts(res, chartDir)
	if err != nil {
		return fmt.Errorf("charts: %w", err)
	}
	js, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	if err := os.WriteFile(filepath.Join(chartDir, "results.json"), append(js, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	page := renderPage(res, charts)
	// The real-kernel section comes from make bench-vm's last run.
	vm, err := loadVMResults(out)
	if err != nil {
		return err
	}
	if vm != nil {
		vmCharts, err := drawVMCharts(vm, filepath.Join(chartDir, "vm"))
		if err != nil {
			return fmt.Errorf("vm charts: %w", err)
		}
		page = insertVMSection(page, renderVMSection(vm, vmCharts))
	}
	if err := os.WriteFile(filepath.Join(out, "benchmarks.md"), []byte(page), 0o644); err != nil {
		return fmt.Errorf("write page: %w", err)
	}
	klog.InfoS("wrote", "page", filepath.Join(out, "benchmarks.md"), "charts", len(charts))
	return nil
}
