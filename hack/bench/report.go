package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Machine is what the page says about where it ran.
type Machine struct {
	CPU      string `json:"cpu"`
	CPUs     int    `json:"cpus"`
	MemTotal string `json:"mem_total"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
	Fio      string `json:"fio"`
	Nbdkit   string `json:"nbdkit"`
	Commit   string `json:"commit"`
	TmpFS    string `json:"scratch_filesystem"`
	GoNBD    string `json:"go_nbd"`
}

func firstLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

func cmdOut(ctx context.Context, name string, args ...string) string {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(cctx, name, args...).Output()
	if err != nil {
		return "unavailable (" + err.Error() + ")"
	}
	return firstLine(out)
}

func machineFacts(ctx context.Context) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), GoNBD: "v0.3.2"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				if _, v, ok := strings.Cut(l, ":"); ok {
					m.CPU = strings.TrimSpace(v)
					break
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "MemTotal:") {
				var kb int64
				if _, err := fmt.Sscanf(strings.TrimPrefix(l, "MemTotal:"), "%d", &kb); err == nil {
					m.MemTotal = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	m.Fio = cmdOut(ctx, "fio", "--version")
	m.Nbdkit = cmdOut(ctx, "nbdkit", "--version")
	m.Commit = cmdOut(ctx, "git", "describe", "--always", "--dirty")
	m.TmpFS = cmdOut(ctx, "stat", "-f", "-c", "%T", os.TempDir())
	return m
}

// Goal is one target of the issue with what this run measured.
type Goal struct {
	ID       string  `json:"id"`
	Text     string  `json:"goal"`
	Op       string  `json:"op"` // ">=" or "<"
	Target   float64 `json:"target"`
	Unit     string  `json:"unit"` // "x" or "%"
	Measured float64 `json:"-"`
	// MeasuredJSON is Measured, null when not measured (JSON has no NaN).
	MeasuredJSON *float64 `json:"measured"`
	Status       string   `json:"status"` // "met", "MISSED", "not measured"
	Note         string   `json:"note,omitempty"`
}

// ratio returns value(sa)/value(sb) for workload w, or NaN when either is
// missing or failed.
func ratio(res *Results, w, sa, sb string) float64 {
	metric := "iops"
	for _, x := range workloads {
		if x.ID == w {
			metric = x.Metric
		}
	}
	ra, oka := res.Fio[w][sa]
	rb, okb := res.Fio[w][sb]
	if !oka || !okb || ra.Error != "" || rb.Error != "" {
		return math.NaN()
	}
	va, vb := ra.Value(metric), rb.Value(metric)
	if vb <= 0 {
		return math.NaN()
	}
	return va / vb
}

// missedWhy explains, per goal, what limits the figure when it is missed.
// These are causes found by looking at the runs (see the page), not
// excuses: the measurement itself is never adjusted.
var missedWhy = map[string]func(*Results) string{
	"rw4k-d-a": func(res *Results) string {
		return fmt.Sprintf("(b), the same NBD server over RAM, reached %s of (a): the rest is the engine's work per write "+
			"(copy into the RAM buffer, index, segment checksums and 512 KiB segment writes) on the same 2 cores as fio, and the log: "+
			"after the 1 GiB prefill and this job %s of its ring was not yet written back, so writes were paced to the simulated HDD's writeback speed (%s)",
			fmtRatio(ratio(res, "randwrite4k", "b", "a"), "x"), ringUsed(res, "randwrite4k", "d"), pacedIn(res, "randwrite4k", "d"))
	},
	"rw4k-d-e": func(res *Results) string {
		return "(e) acknowledges writes from RAM too: nbdkit's cache filter puts them in a page-cached temporary file and writes back only on a flush, " +
			"which this job never sends, so both run at transport and CPU speed; a 5x margin would need (e) to stall"
	},
	"rw4k-b-a": func(res *Results) string {
		return fmt.Sprintf("both are bound by the client (fio, libnbd) and the unix socket on the same 2 cores, and this ratio moves from run to run "+
			"(the read job, where our server answers on its reader goroutine, is %s)",
			fmtRatio(ratio(res, "randread4k", "b", "a"), "x"))
	},
	"rr4k-b-g": func(res *Results) string { return goNBDWhy },
	"rw4k-b-g": func(res *Results) string { return goNBDWhy },
	"seq1m-d-f": func(res *Results) string {
		return fmt.Sprintf("(d) runs it after the random jobs on the same volume (%s of its ring not yet written back after it, %s), "+
			"while writeback of their blocks reads the cache image on the same virtual disk; each 1 MiB write is cut into 4 KiB blocks copied into RAM buffers and written as 512 KiB segments, "+
			"with O_DIRECT to this machine's virtual disk, while (f) copies into the page cache; (h), the same engine through the page cache, reached %s of (f)",
			ringUsed(res, "seqwrite1m", "d"), pacedIn(res, "seqwrite1m", "d"), fmtRatio(ratio(res, "seqwrite1m", "h", "f"), "x"))
	},
}

const goNBDWhy = "go-nbd's one-request-at-a-time handler is not what limits a RAM backend: each request is a memory copy, and the 2 cores go to fio, libnbd and the kernel's socket copies, " +
	"so a faster server can only remove its own share; serial handling costs go-nbd the queue depth when the backend waits (an HDD, a cache miss), which these jobs do not show"

// ringUsed is the share of system id's ring not written back after job w.
func ringUsed(res *Results, w, id string) string {
	r, ok := res.Fio[w][id]
	if !ok || r.Engine == nil {
		return "an unknown share"
	}
	return fmt.Sprintf("%.0f %%", 100*r.Engine.RingUsed())
}

// pacedIn says how many writes job w of system id had paced.
func pacedIn(res *Results, w, id string) string {
	var before uint64
	for _, x := range workloads {
		r := res.Fio[x.ID][id]
		if r.Engine == nil {
			return "paced writes unknown"
		}
		if x.ID == w {
			return fmt.Sprintf("%d writes paced during the job", r.Engine.PacedWrites-before)
		}
		before = r.Engine.PacedWrites
	}
	return "paced writes unknown"
}

func evaluateGoals(res *Results) []Goal {
	gs := []Goal{
		{ID: "rw4k-d-a", Text: "4K random write: (d) writeboost ≥ 0.9 × (a) nbdkit memory", Op: ">=", Target: 0.9, Unit: "x",
			Measured: ratio(res, "randwrite4k", "d", "a")},
		{ID: "rw4k-d-c", Text: "4K random write: (d) writeboost ≥ 100 × (c) raw simulated HDD", Op: ">=", Target: 100, Unit: "x",
			Measured: ratio(res, "randwrite4k", "d", "c")},
		{ID: "rw4k-d-e", Text: "4K random write: (d) writeboost ≥ 5 × (e) nbdkit cache filter", Op: ">=", Target: 5, Unit: "x",
			Measured: ratio(res, "randwrite4k", "d", "e")},
		{ID: "rr4k-b-a", Text: "4K random read: (b) our NBD server ≥ 1.0 × (a) nbdkit memory", Op: ">=", Target: 1, Unit: "x",
			Measured: ratio(res, "randread4k", "b", "a")},
		{ID: "rw4k-b-a", Text: "4K random write: (b) our NBD server ≥ 1.0 × (a) nbdkit memory", Op: ">=", Target: 1, Unit: "x",
			Measured: ratio(res, "randwrite4k", "b", "a")},
		{ID: "rr4k-b-g", Text: "4K random read: (b) our NBD server ≥ 3 × (g) go-nbd", Op: ">=", Target: 3, Unit: "x",
			Measured: ratio(res, "randread4k", "b", "g")},
		{ID: "rw4k-b-g", Text: "4K random write: (b) our NBD server ≥ 3 × (g) go-nbd", Op: ">=", Target: 3, Unit: "x",
			Measured: ratio(res, "randwrite4k", "b", "g")},
		{ID: "seq1m-d-f", Text: "1 MiB sequential write: (d) writeboost ≥ 0.7 × (f) nbdkit file (dm-writeboost: 0.15)", Op: ">=", Target: 0.7, Unit: "x",
			Measured: ratio(res, "seqwrite1m", "d", "f")},
	}
	wb := Goal{ID: "wb-sorted", Text: "Sorted writeback ≥ 3 × faster than arrival order on the HDD model (dm-writeboost: 2.4x); " + res.Config.WritebackHeadline,
		Op: ">=", Target: 3, Unit: "x", Measured: math.NaN()}
	for _, r := range res.Writeback {
		if r.Blocks == 4096 && r.BackingBytes == 128<<20 {
			wb.Measured = r.Speedup
		}
	}
	gs = append(gs, wb)
	op := Goal{ID: "open-clean", Text: "Opening a full 4 GiB cache after a clean stop reads < 5 % of the cache device",
		Op: "<", Target: 5, Unit: "%", Measured: math.NaN()}
	for _, r := range res.Open {
		if r.Case == "clean" && r.Error == "" {
			op.Measured = r.ReadPctOfCache
		}
	}
	gs = append(gs, op,
		Goal{ID: "wrapped", Text: "4K random write over 0.5x the cache after the log has wrapped many times ≥ 0.7 × the same engine with a cache that never fills (issue 15)",
			Op: ">=", Target: 0.7, Unit: "x", Measured: res.Wrapped.Ratio("wrapped", "never-full")},
		Goal{ID: "wrapped-contended", Text: "The same with the CPU contended by 2 busy loops ≥ 0.7 × never-full under the same contention (no collapse)",
			Op: ">=", Target: 0.7, Unit: "x", Measured: res.Wrapped.Ratio("wrapped-contended", "never-full-contended")})
	for i := range gs {
		g := &gs[i]
		if !math.IsNaN(g.Measured) {
			v := g.Measured
			g.MeasuredJSON = &v
		}
		switch {
		case math.IsNaN(g.Measured):
			g.Status = "not measured"
			g.Note = "a system or figure failed in this run; see Errors"
		case g.Op == ">=" && g.Measured >= g.Target, g.Op == "<" && g.Measured < g.Target:
			g.Status = "met"
		default:
			g.Status = "MISSED"
			if why := missedWhy[g.ID]; why != nil {
				g.Note = why(res)
			}
			if g.Note == "" {
				g.Note = "cause not yet analysed"
			}
		}
	}
	return gs
}

// writeEngineStates tabulates writeboost's log after each workload: the
// share of the ring not yet written back (writes are paced above 75 %),
// the writes paced so far, and the writeback done.
func writeEngineStates(p func(string, ...any), res *Results) {
	defer p("A flush writes the open segment's new blocks and a header copy in place and the segment keeps filling, so the fsync job fills whole segments " +
		"(dm-writeboost closes a segment at every flush, which spends a 512 KiB ring slot per fsync and pushes the clean copies of earlier writes out of the ring).\n\n")
	for _, id := range []string{"d", "h"} {
		seen := false
		for _, w := range workloads {
			if r, ok := res.Fio[w.ID][id]; ok && r.Engine != nil {
				seen = true
			}
		}
		if !seen {
			continue
		}
		p("%s: its log after each workload (writes are paced while more than 75 %% of the ring is not yet written back; the counters run from the start of the prefill).\n\n", sysName(res, id))
		p("| After | Ring not written back | Dirty blocks | Paced writes | Written back | Of it gap-filling | Block reads from the cache in the job |\n|---|---|---|---|---|---|---|\n")
		var h0, m0 uint64
		for _, w := range workloads {
			r, ok := res.Fio[w.ID][id]
			if !ok || r.Engine == nil {
				continue
			}
			en := r.Engine
			h, m := en.fullReads()
			hits := "—"
			if h+m > h0+m0 {
				hits = fmt.Sprintf("%.0f %%", 100*float64(h-h0)/float64(h+m-h0-m0))
			}
			h0, m0 = h, m
			p("| %s | %.0f %% | %d | %d | %s | %s | %s |\n", w.Title, 100*en.RingUsed(), en.NrDirtyCacheBlocks, en.PacedWrites,
				humanBytes(float64(en.WritebackBytes)), humanBytes(float64(en.WritebackFilledBlocks)*4096), hits)
		}
		p("\n")
	}
}

func fmtRatio(v float64, unit string) string {
	if math.IsNaN(v) {
		return "—"
	}
	if unit == "%" {
		return fmt.Sprintf("%.2f %%", v)
	}
	switch {
	case v >= 100:
		return fmt.Sprintf("%.0fx", v)
	case v >= 10:
		return fmt.Sprintf("%.1fx", v)
	case v >= 0.1:
		return fmt.Sprintf("%.2fx", v)
	default:
		return fmt.Sprintf("%.4fx", v)
	}
}

func humanBytes(b float64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", b/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.0f MiB", b/(1<<20))
	default:
		return fmt.Sprintf("%.0f KiB", b/(1<<10))
	}
}

func sysName(res *Results, id string) string {
	for _, s := range systems {
		if s.ID == id {
			return "(" + id + ") " + s.Name
		}
	}
	return id
}

// renderPage writes docs/benchmarks.md.
func renderPage(res *Results, charts []string) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	p("# Benchmarks\n\n")
	p("<!-- Generated by `make bench` (hack/bench). Do not edit by hand: rerun it. -->\n\n")
	p("How writeboost compares with what a user would otherwise run, measured side by side in one run on one machine. ")
	p("Absolute figures on a shared machine drift from run to run, so the page reports **ratios** between systems measured minutes apart; ")
	p("the absolute figures are in [results.json](benchmarks/results.json).\n\n")
	p("Run: %s → %s (%.1f min).\n\n", res.Started.Format(time.RFC3339), res.Finished.Format(time.RFC3339), res.Finished.Sub(res.Started).Minutes())

	p("## Goals\n\n")
	p("| Goal | Measured | Result | Note |\n|---|---|---|---|\n")
	for _, g := range res.Goals {
		status := g.Status
		if status == "MISSED" {
			status = "**MISSED**"
		}
		p("| %s | %s | %s | %s |\n", g.Text, fmtRatio(g.Measured, g.Unit), status, g.Note)
	}
	p("\n")

	p("## Setup\n\n")
	m := res.Machine
	p("- Machine: %d × %s, %s RAM, Linux %s; scratch files on %s (%s).\n", m.CPUs, m.CPU, m.MemTotal, m.Kernel, os.TempDir(), m.TmpFS)
	p("- Software: %s, %s, %s, go-nbd %s; writeboost at %s.\n", m.Fio, m.Nbdkit, m.Go, m.GoNBD, m.Commit)
	c := res.Config
	p("- Client: fio's `nbd` ioengine (libnbd) on a unix socket, one job, for every system. Each export is %s; it is prefilled with 1 MiB writes, then each workload runs %.0f s after a %.0f s ramp, in the order of the table below.\n",
		humanBytes(float64(c.ExportBytes)), c.RuntimeSec, c.RampSec)
	p("- The simulated HDD (pkg/hddsim, default model: 7200 rpm, 1–15 ms seeks, 180 MB/s, one request at a time) sleeps in real time, since fio measures wall time. Its stroke is the export (%s), so it behaves like a whole small disk.\n", humanBytes(float64(c.ExportBytes)))
	p("- (d) is the product: `writeboost serve --simulate-hdd --direct` with a %s cache image on the local disk opened with O_DIRECT, as the CSI plugin opens its cache (default tunables: writeback threshold 70 %%, read cache off), RAM buffers on /dev/shm. The working set fits the cache, but the log does not hold every overwrite: the workloads run one after another on the same volume, so by the later ones most of the ring is in use and writeback (to the simulated HDD) sets the pace. (h) is the same through the page cache (`serve --direct=false`).\n\n", humanBytes(float64(c.WriteboostCache)))
	p("| System | What it is |\n|---|---|\n")
	for _, s := range systems {
		note := s.About
		for _, si := range res.Systems {
			if si.ID == s.ID && si.Error != "" {
				note += " — **failed in this run:** " + si.Error
			}
		}
		p("| (%s) %s | %s |\n", s.ID, s.Name, note)
	}
	p("\n")

	p("## NBD systems through one client\n\n")
	p("Throughput relative to (a) nbdkit memory (IOPS; MB/s for the 1 MiB sequential write). Higher is better.\n\n")
	p("| Workload |")
	for _, s := range systems {
		p(" (%s) |", s.ID)
	}
	p("\n|---|")
	for range systems {
		p("---|")
	}
	p("\n")
	for _, w := range workloads {
		p("| %s |", w.Title)
		for _, s := range systems {
			r, ok := res.Fio[w.ID][s.ID]
			switch {
			case !ok:
				p(" — |")
			case r.Error != "":
				p(" failed¹ |")
			default:
				p(" %s |", fmtRatio(ratio(res, w.ID, s.ID, "a"), "x"))
			}
		}
		p("\n")
	}
	p("\np99 completion latency relative to (a)'s (lower is better; for the fsync job the p99 of the writes, each followed by a flush).\n\n")
	p("| Workload |")
	for _, s := range systems {
		p(" (%s) |", s.ID)
	}
	p("\n|---|")
	for range systems {
		p("---|")
	}
	p("\n")
	for _, w := range workloads {
		p("| %s |", w.Title)
		base := res.Fio[w.ID]["a"].P99Ms()
		for _, s := range systems {
			r, ok := res.Fio[w.ID][s.ID]
			switch {
			case !ok:
				p(" — |")
			case r.Error != "" || base <= 0:
				p(" failed¹ |")
			default:
				p(" %s |", fmtRatio(r.P99Ms()/base, "x"))
			}
		}
		p("\n")
	}
	var fails []string
	for _, w := range workloads {
		for _, s := range systems {
			if r, ok := res.Fio[w.ID][s.ID]; ok && r.Error != "" {
				f := fmt.Sprintf("%s on %s: `%s`", w.Title, sysName(res, s.ID), r.Error)
				if s.ID == "g" && w.ID == "fsync4k" {
					f += " (go-nbd v0.3.2 implements no NBD_CMD_FLUSH: its server answers EINVAL to any command but READ, WRITE and DISC)"
				}
				fails = append(fails, f)
			}
		}
	}
	if len(fails) > 0 {
		p("\n¹ Failed jobs:\n\n")
		for _, f := range fails {
			p("- %s\n", f)
		}
	}
	p("\n")
	writeEngineStates(p, res)
	for _, ch := range charts {
		if strings.HasPrefix(ch, "fio-") {
			p("![%s](benchmarks/%s)\n\n", ch, ch)
		}
	}

	p("## Engine-level figures\n\n")
	p("Measured in-process on pkg/engine, with in-memory devices (pkg/blockdev Mem) and the HDD model.\n\n")
	p("### Sorted batched writeback vs arrival order\n\n")
	p("N distinct random 4 KiB blocks are written into a cache with background writeback off (writeback_threshold 0), flushed, then drained; the time the HDD model spends on the drain (virtual clock, deterministic) is compared with writing the same blocks to a fresh model in arrival order.\n\n")
	p("| Blocks | Backing | Sorted (drain) | Arrival order | Speedup | HDD requests sorted / arrival |\n|---|---|---|---|---|---|\n")
	for _, r := range res.Writeback {
		p("| %d | %s | %.2f s | %.2f s | %s | %d / %d |\n", r.Blocks, humanBytes(float64(r.BackingBytes)), r.SortedSec, r.ArrivalSec, fmtRatio(r.Speedup, "x"), r.SortedOps, r.ArrivalOps)
	}
	p("\n")
	p("### Opening a full cache\n\n")
	p("A %s cache filled to %.0f %% with dirty data (writeback off), then opened again after a clean Close and from a crash image taken after the last flush (what a power cut would leave).\n\n",
		humanBytes(float64(c.OpenCacheBytes)), 100*c.OpenFillFraction)
	p("| Case | Read from the cache device | Share of the device | Open time | Dirty blocks found |\n|---|---|---|---|---|\n")
	for _, r := range res.Open {
		if r.Error != "" {
			p("| %s | — | — | %.2f s | failed: %s |\n", r.Case, r.OpenSec, r.Error)
			continue
		}
		p("| %s | %s | %.2f %% | %.2f s | %d |\n", r.Case, humanBytes(float64(r.ReadBytes)), r.ReadPctOfCache, r.OpenSec, r.DirtyBlocks)
	}
	p("\n")
	ix := res.Index
	p("### Index size\n\n")
	if ix.NrCacheBlocks > 0 {
		p("The block index of the %s cache takes %s of RAM for %d cache blocks: **%.1f bytes per cached 4 KiB block** (%.2f %% of the cache size).\n\n",
			humanBytes(float64(ix.CacheBytes)), humanBytes(float64(ix.IndexBytes)), ix.NrCacheBlocks, ix.BytesPerBlock, ix.PctOfCacheSize)
	} else {
		p("Not measured in this run.\n\n")
	}
	renderWrapped(p, res.Wrapped)
	rf := res.RingFull
	p("### Writes with the log ring full\n\n")
	if rf.Error != "" {
		p("Failed: %s\n\n", rf.Error)
	}
	p("A %s cache over a %s simulated HDD (real sleeps), %d goroutines writing random 4 KiB blocks over the whole disk; measured for %.0f s after the log took a whole cache's worth of writes (%.1f s), so that every new segment waits for writeback. The baseline is the same %d writers on the bare disk model.\n\n",
		humanBytes(float64(rf.CacheBytes)), humanBytes(float64(rf.BackingBytes)), rf.Writers, rf.MeasureSec, rf.WarmupSec, rf.Writers)
	p("| | writeboost, ring full | raw simulated HDD | ratio |\n|---|---|---|---|\n")
	p("| Write IOPS | %.0f | %.0f | %s |\n", rf.IOPS, rf.RawHDDIOPS, fmtRatio(rf.IOPSRatio, "x"))
	p("| p99 latency | %.1f ms | %.1f ms | %s |\n", rf.P99Ms, rf.RawHDDP99Ms, fmtRatio(rf.P99Ratio, "x"))
	p("| p50 / max latency | %.2f ms / %.0f ms | | |\n\n", rf.P50Ms, rf.MaxMs)
	for _, ch := range charts {
		if !strings.HasPrefix(ch, "fio-") {
			p("![%s](benchmarks/%s)\n\n", ch, ch)
		}
	}
	if len(res.Errors) > 0 {
		p("## Errors in this run\n\n")
		for _, e := range res.Errors {
			p("- %s\n", e)
		}
		p("\n")
	}
	p("## Reproduce\n\n")
	p("`make bench` (installs fio and nbdkit through hack/deps.sh, then `go run ./hack/bench`). `go run ./hack/bench -h` lists the knobs (runtime per job, export size, subsets of systems).\n")
	return b.String()
}
