package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// VMResults is everything make bench-vm measured: the phases the VM wrote
// and what the host knew about the run. It is docs/benchmarks/vm/results.json
// and the page's "In a real kernel" section.
type VMResults struct {
	Host    VMHost   `json:"host"`
	Main    *VMPhase `json:"main"`
	Recover *VMPhase `json:"recover,omitempty"`
	Fill    *VMPhase `json:"fill,omitempty"`
	Goals   []Goal   `json:"goals"`
}

// VMHost is written by hack/bench-vm.sh on the host.
type VMHost struct {
	Accel   string `json:"accel"`  // "tcg" or "kvm"
	Commit  string `json:"commit"` // git describe of the tree measured
	CPU     string `json:"cpu"`    // host CPU model
	CPUs    int    `json:"cpus"`   // host CPUs
	LoadMin string `json:"load_at_start"`
	LoadEnd string `json:"load_at_end"`
	// Others is what else ran on the host during the run (processes
	// using CPU), as the script saw it.
	Others string `json:"others,omitempty"`
	// GuestCrash is the guest kernel's BUG/Oops in the main run, if any,
	// from the console (the systems after it did not run).
	GuestCrash string    `json:"guest_crash,omitempty"`
	Started    time.Time `json:"started"`
	Ended      time.Time `json:"ended"`
}

const vmResultsDir = "benchmarks/vm"

// vmRenderMain is `bench vm-render --in DIR --out docs`: merge the phases'
// JSON files and the host's facts into docs/benchmarks/vm/results.json,
// draw the VM charts, and regenerate docs/benchmarks.md (the host
// figures come from docs/benchmarks/results.json, as with -rerender).
func vmRenderMain(args []string) error {
	fs := flag.NewFlagSet("vm-render", flag.ContinueOnError)
	in := fs.String("in", "", "directory holding host.json, main.json and optionally fill.json, recover.json (empty: redraw from the saved results.json)")
	out := fs.String("out", "docs", "docs directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *in != "" {
		var r VMResults
		read := func(name string, v any, required bool) error {
			b, err := os.ReadFile(filepath.Join(*in, name))
			if errors.Is(err, os.ErrNotExist) && !required {
				return nil
			}
			if err != nil {
				return err
			}
			if err := json.Unmarshal(b, v); err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			return nil
		}
		if err := read("host.json", &r.Host, true); err != nil {
			return err
		}
		r.Main = &VMPhase{}
		if err := read("main.json", r.Main, true); err != nil {
			return err
		}
		var fill, rec VMPhase
		if err := read("fill.json", &fill, false); err != nil {
			return err
		}
		if err := read("recover.json", &rec, false); err != nil {
			return err
		}
		if !fill.Started.IsZero() {
			r.Fill = &fill
		}
		if !rec.Started.IsZero() {
			r.Recover = &rec
		} else if r.Fill != nil {
			// The recovery boot did not report: keep the fill's
			// figures so the page says what happened.
			r.Recover = r.Fill
		}
		dir := filepath.Join(*out, vmResultsDir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		b, err := json.MarshalIndent(&r, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, "results.json"), append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return rerenderFrom(*out)
}

// loadVMResults reads docs/benchmarks/vm/results.json (nil when absent).
func loadVMResults(out string) (*VMResults, error) {
	b, err := os.ReadFile(filepath.Join(out, vmResultsDir, "results.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r VMResults
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode %s: %w", vmResultsDir, err)
	}
	if r.Main == nil {
		return nil, fmt.Errorf("%s/results.json has no main phase", vmResultsDir)
	}
	r.Goals = evaluateVMGoals(&r)
	return &r, nil
}

func vmJob(id string) VMJob {
	for _, j := range vmJobs {
		if j.ID == id {
			return j
		}
	}
	return VMJob{ID: id, Metric: "iops"}
}

// get returns system id's figure for job, ok only when it ran cleanly.
func (r *VMResults) get(job, id string) (VMFio, bool) {
	x, ok := r.Main.Fio[job][id]
	return x, ok && x.Error == ""
}

// vmRatio is value(a)/value(b) for job, NaN when either is missing.
func (r *VMResults) ratio(job, a, b string) float64 {
	ra, oka := r.get(job, a)
	rb, okb := r.get(job, b)
	m := vmJob(job).Metric
	if !oka || !okb || rb.Value(m) <= 0 {
		return math.NaN()
	}
	return ra.Value(m) / rb.Value(m)
}

// vmP99 is the p99 latency of one operation of job: for the fsync job a
// write and its fsync.
func vmP99(x VMFio, job string) float64 {
	if job == "fsync" {
		return x.WriteP99Ms + x.SyncP99Ms
	}
	return x.P99Ms()
}

// usPerIO is the mean time per request at QD1 (1/IOPS), microseconds.
func (r *VMResults) usPerIO(job, id string) float64 {
	x, ok := r.get(job, id)
	if !ok || x.IOPS() <= 0 {
		return math.NaN()
	}
	return 1e6 / x.IOPS()
}

func vmSysName(id string) string {
	for _, s := range vmSystems {
		if s.ID == id {
			return s.Name
		}
	}
	return id
}

// peers are the kernel's caches writeboost is compared with.
var peers = []string{"dmwb", "dmwc", "bcache"}

func evaluateVMGoals(r *VMResults) []Goal {
	var gs []Goal
	for _, job := range []string{"fsync", "sus05", "sus2"} {
		for _, peer := range []string{"dmwb", "dmwc"} {
			gs = append(gs, Goal{ID: "vm-" + job + "-" + peer, Op: ">=", Target: 1.5, Unit: "x",
				Text:     fmt.Sprintf("%s: writeboost ≥ 1.5 × %s", vmJob(job).Title, vmSysName(peer)),
				Measured: r.ratio(job, "wbk", peer)})
		}
	}
	gs = append(gs, Goal{ID: "vm-qd32-dmwb", Op: ">=", Target: 0.8, Unit: "x",
		Text: "4K random write QD32: writeboost ≥ 0.8 × dm-writeboost", Measured: r.ratio("qd32", "wbk", "dmwb")})
	gs = append(gs, Goal{ID: "vm-qd1-lat", Op: "<=", Target: 3, Unit: "x",
		Text:     "4K random write QD1: writeboost's mean latency ≤ 3 × dm-writeboost's",
		Measured: r.usPerIO("qd1", "wbk") / r.usPerIO("qd1", "dmwb")})
	for i := range gs {
		g := &gs[i]
		if !math.IsNaN(g.Measured) {
			v := g.Measured
			g.MeasuredJSON = &v
		}
		switch {
		case math.IsNaN(g.Measured):
			g.Status = "not measured"
			g.Note = "a system or job failed in this run; see its errors"
		case g.Op == ">=" && g.Measured >= g.Target, g.Op == "<=" && g.Measured <= g.Target:
			g.Status = "met"
		default:
			g.Status = "MISSED"
			g.Note = vmWhy(r, g.ID)
		}
	}
	return gs
}

// vmWhy explains a missed goal from this run's own measurements.
func vmWhy(r *VMResults, id string) string {
	switch {
	case id == "vm-qd1-lat":
		if n := engineNote(r, "qd1"); n != "" {
			return qd1Breakdown(r) + "; " + n
		}
		return qd1Breakdown(r)
	case id == "vm-qd32-dmwb":
		return lostReason(r, "qd32")
	case strings.HasPrefix(id, "vm-fsync-"):
		return lostReason(r, "fsync")
	case strings.HasPrefix(id, "vm-sus"):
		job := strings.Split(id, "-")[1]
		return sustainedNote(r, job)
	}
	return "cause not yet analysed"
}

// qd1Breakdown splits writeboost's time per request at QD1 into the
// kernel NBD round trip any userspace target pays (nbdkit's memory
// plugin), pkg/nbd's own share (pkg/nbd over RAM), and the engine's.
func qd1Breakdown(r *VMResults) string {
	wb, dm := r.usPerIO("qd1", "wbk"), r.usPerIO("qd1", "dmwb")
	kit, ours := r.usPerIO("qd1", "nbdkit"), r.usPerIO("qd1", "ournbd")
	if math.IsNaN(wb) {
		return "writeboost's QD1 job failed"
	}
	s := fmt.Sprintf("at QD1 a request took %.0f µs through writeboost and %.0f µs through dm-writeboost", wb, dm)
	if !math.IsNaN(kit) && !math.IsNaN(ours) {
		s += fmt.Sprintf("; the kernel NBD round trip alone (nbdkit memory) took %.0f µs (%.0f %% of writeboost's), pkg/nbd over RAM %.0f µs, so the engine adds %.0f µs",
			kit, 100*kit/wb, ours, wb-ours)
	}
	if ea, ok := r.Main.EngineAlone["qd1"]; ok && ea.Error == "" && ea.IOPS > 0 {
		eng := 1e6 / ea.IOPS
		s += fmt.Sprintf("; the engine alone (in-process on the same kind of devices, no NBD) took %.0f µs per write, so %.0f µs (%.0f %%) of writeboost's request is the NBD path (kernel nbd, socket, pkg/nbd, wake-ups)",
			eng, wb-eng, 100*(wb-eng)/wb)
		if !math.IsNaN(kit) {
			s += fmt.Sprintf("; nbdkit's round trip over RAM is the floor a userspace target pays, so at most %.0f µs (%.0f %%) is ours to remove", math.Max(wb-kit, 0), 100*math.Max(wb-kit, 0)/wb)
		}
		if !math.IsNaN(ours) && wb > ours+eng {
			s += fmt.Sprintf("; the engine alone plus pkg/nbd over RAM make %.0f µs, so %.0f µs appear only when the engine runs behind NBD (more thread hand-offs per request, each costly on a contended TCG host; not separated in this run)", ours+eng, wb-ours-eng)
		}
	}
	if x, ok := r.get("qd1", "wbk"); ok && x.IOs() > 0 {
		s += fmt.Sprintf("; the server used %.0f µs of CPU per request (%.0f user, %.0f kernel)",
			1e6*(x.ServerUserSec+x.ServerSysSec)/x.IOs(), 1e6*x.ServerUserSec/x.IOs(), 1e6*x.ServerSysSec/x.IOs())
	}
	return s
}

// cpuNote says how busy the VM's CPUs were and how much of it the server
// took.
func cpuNote(r *VMResults, job string) string {
	x, ok := r.get(job, "wbk")
	d, okd := r.get(job, "dmwb")
	if !ok {
		return "writeboost's job failed"
	}
	s := engineNote(r, job)
	if s != "" {
		s += "; "
	}
	s += fmt.Sprintf("during the job the VM's vCPUs were %.0f %% busy", 100*x.CPUBusy)
	if x.RuntimeSec > 0 {
		cpus := float64(r.Main.CPUs)
		s += fmt.Sprintf(", writeboost serve alone %.0f %% of them (%.0f µs of CPU per request)",
			100*(x.ServerUserSec+x.ServerSysSec)/(x.RuntimeSec*cpus), 1e6*(x.ServerUserSec+x.ServerSysSec)/math.Max(x.IOs(), 1))
	}
	if okd {
		s += fmt.Sprintf("; with dm-writeboost they were %.0f %% busy", 100*d.CPUBusy)
	}
	if kit, ok := r.get(job, "nbdkit"); ok {
		s += fmt.Sprintf("; nbdkit memory through the same kernel nbd path reached %.0f %% of dm-writeboost", 100*r.ratio(job, "nbdkit", "dmwb"))
		_ = kit
	}
	return s
}

func sustainedNote(r *VMResults, job string) string {
	x, ok := r.get(job, "wbk")
	if !ok {
		return "writeboost's job failed"
	}
	cache := float64(r.Main.Config.CacheBytes)
	s := fmt.Sprintf("writeboost wrote %.1f× its cache in the job and held %s dirty after it", x.WriteBW*x.RuntimeSec/cache, humanBytes(float64(max(x.DirtyAfter, 0))))
	if len(x.PerSecond) > 3 {
		n := len(x.PerSecond)
		s += fmt.Sprintf("; its IOPS fell from %.0f in the first seconds to %.0f in the last third", mean(x.PerSecond[:3]), mean(x.PerSecond[2*n/3:]))
	}
	s += "; " + cpuNote(r, job)
	return s
}

func mean(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	t := 0.0
	for _, x := range v {
		t += x
	}
	return t / float64(len(v))
}

// vmMainSystems are the columns of the comparison tables.
func vmMainSystems() []VMSystem {
	var out []VMSystem
	for _, s := range vmSystems {
		if !s.Ref {
			out = append(out, s)
		}
	}
	return out
}

// renderVMSection writes the page's section for make bench-vm.
func renderVMSection(r *VMResults, charts []string) string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	m, h := r.Main, r.Host
	p("## In a real kernel: against dm-writeboost, dm-writecache and bcache\n\n")
	p("<!-- Generated by `make bench-vm` (hack/bench-vm.sh, hack/bench vm). Do not edit by hand: rerun it. -->\n\n")
	p("One run of `make bench-vm`, %s → %s (%.1f min), at %s: every system in one VM, on the same kind of devices, one after another. The absolute figures are in [vm/results.json](benchmarks/vm/results.json).\n\n",
		h.Started.Format(time.RFC3339), h.Ended.Format(time.RFC3339), h.Ended.Sub(h.Started).Minutes(), h.Commit)
	if h.Accel != "kvm" {
		p("**This VM ran under QEMU's TCG (no hardware KVM on this machine): every timing inside it is emulated, several times slower than on hardware and distorted differently for kernel and user code. Only the ratios between systems of this one VM run count; never compare them with the host figures above or with another run.**\n\n")
	}
	p("The host (%d × %s) was shared: load average %s at the start and %s at the end", h.CPUs, h.CPU, h.LoadMin, h.LoadEnd)
	if h.Others != "" {
		p("; other work running at the start: %s", h.Others)
	}
	p(". Systems ran minutes apart, so a change of load moves their ratios too.\n\n")
	if h.GuestCrash != "" {
		var ran []string
		for _, s := range vmSystems {
			for _, j := range vmJobs {
				if _, ok := m.Fio[j.ID][s.ID]; ok {
					ran = append(ran, s.Name)
					break
				}
			}
		}
		p("**The guest kernel crashed during the main run, and the VM was stopped there**: `%s`. Systems measured before it: %s; the others have no figures in this run.\n\n", h.GuestCrash, strings.Join(ran, ", "))
	}

	p("### Goals\n\n| Goal | Measured | Result | Note |\n|---|---|---|---|\n")
	for _, g := range r.Goals {
		st := g.Status
		if st == "MISSED" {
			st = "**MISSED**"
		}
		p("| %s | %s | %s | %s |\n", g.Text, fmtRatio(g.Measured, g.Unit), st, g.Note)
	}
	p("\n")

	c := m.Config
	p("### Setup\n\n")
	p("- VM: Linux %s, %d vCPUs, %s RAM, booted by hack/vm's runner with the host's root over 9p; %s.\n", m.Kernel, m.CPUs, m.MemTotal, m.FioVer)
	p("- Cache device, the same for every system: a %s loop device on the VM's tmpfs, fresh for each system and each sustained job.\n", humanBytes(float64(c.CacheBytes)))
	p("- Backing device, the same for every system: the project's HDD model (pkg/hddsim, 7200 rpm, 1–15 ms seeks, 180 MB/s, one request at a time, real sleeps) over a %s file on tmpfs, exported raw by `bench nbd-serve` (pkg/nbd) and attached by the kernel's nbd driver, so seeks and rotation cost every system alike.\n", humanBytes(float64(c.HDDBytes)))
	p("- Jobs: fio with O_DIRECT on each system's block device (libaio; psync at QD1). Short jobs run %.0f s after a %.0f s ramp over the first %s (0.5× the cache), in the order of the table, on one fresh cache per system. The sustained jobs run %.0f s each on a fresh cache, over 0.5× and 2× the cache; the drain follows the 0.5× job.\n",
		c.ShortSec, c.RampSec, humanBytes(0.5*float64(c.CacheBytes)), c.SustainedSec)
	p("\n| System | What it is |\n|---|---|\n")
	for _, s := range vmSystems {
		note := s.About
		if e := m.SysErrors[s.ID]; e != "" {
			note += " — **failed in this run:** " + e
		}
		p("| %s | %s |\n", s.Name, note)
	}
	p("\n")

	mains := vmMainSystems()
	p("### Throughput relative to dm-writeboost\n\n")
	p("IOPS (MB/s for the 1 MiB job) divided by dm-writeboost's in the same job; higher is better. The references ran the short jobs only.\n\n| Job |")
	for _, s := range vmSystems {
		if s.ID != "dmwb" {
			p(" %s |", s.Name)
		}
	}
	p("\n|---|")
	for _, s := range vmSystems {
		if s.ID != "dmwb" {
			p("---|")
		}
	}
	p("\n")
	for _, j := range vmJobs {
		p("| %s |", j.Title)
		for _, s := range vmSystems {
			if s.ID == "dmwb" {
				continue
			}
			p(" %s |", cell(r, j.ID, s.ID, func() string { return fmtRatio(r.ratio(j.ID, s.ID, "dmwb"), "x") }))
		}
		p("\n")
	}
	p("\n### writeboost against each peer\n\n")
	p("writeboost's throughput divided by each peer's, and its p99 latency divided by theirs (lower is better).\n\n")
	p("| Job | × dm-writeboost | × dm-writecache | × bcache | p99 × dm-writeboost | p99 × dm-writecache | p99 × bcache |\n|---|---|---|---|---|---|---|\n")
	for _, j := range vmJobs {
		p("| %s |", j.Title)
		for _, peer := range peers {
			p(" %s |", fmtRatio(r.ratio(j.ID, "wbk", peer), "x"))
		}
		for _, peer := range peers {
			a, oka := r.get(j.ID, "wbk")
			b, okb := r.get(j.ID, peer)
			v := math.NaN()
			if oka && okb && vmP99(b, j.ID) > 0 {
				v = vmP99(a, j.ID) / vmP99(b, j.ID)
			}
			p(" %s |", fmtRatio(v, "x"))
		}
		p("\n")
	}
	p("\n### p99 latency\n\n")
	p("Milliseconds, emulated time (for the fsync job a write plus its fsync). Compare within a row.\n\n| Job |")
	for _, s := range mains {
		p(" %s |", s.Name)
	}
	p("\n|---|")
	for range mains {
		p("---|")
	}
	p("\n")
	for _, j := range vmJobs {
		p("| %s |", j.Title)
		for _, s := range mains {
			p(" %s |", cell(r, j.ID, s.ID, func() string {
				x, _ := r.get(j.ID, s.ID)
				return fmt.Sprintf("%.2f", vmP99(x, j.ID))
			}))
		}
		p("\n")
	}
	p("\n")
	var fails []string
	for _, j := range vmJobs {
		for _, s := range vmSystems {
			if x, ok := m.Fio[j.ID][s.ID]; ok && x.Error != "" {
				fails = append(fails, fmt.Sprintf("%s on %s: `%s`", j.Title, s.Name, x.Error))
			}
		}
	}
	if len(fails) > 0 {
		p("Failed jobs:\n\n")
		for _, f := range fails {
			p("- %s\n", f)
		}
		p("\n")
	}

	p("### Sustained writes and the log\n\n")
	p("How much each system wrote in the sustained jobs, as multiples of its cache (a log wraps once per multiple), what it held dirty at the end, and its IOPS in the first 3 s and the last third of the job.\n\n")
	p("| Job | System | Written / cache | Dirty after | IOPS first 3 s | IOPS last third |\n|---|---|---|---|---|---|\n")
	for _, j := range vmJobs {
		if !j.Sustained {
			continue
		}
		for _, s := range mains {
			x, ok := r.get(j.ID, s.ID)
			if !ok {
				continue
			}
			n := len(x.PerSecond)
			first, last := math.NaN(), math.NaN()
			if n >= 3 {
				first, last = mean(x.PerSecond[:3]), mean(x.PerSecond[2*n/3:])
			}
			dirty := "—"
			if x.DirtyAfter >= 0 {
				dirty = humanBytes(float64(x.DirtyAfter))
			}
			p("| %s | %s | %.1f× | %s | %.0f | %.0f |\n", j.Title, s.Name, x.WriteBW*x.RuntimeSec/float64(c.CacheBytes), dirty, first, last)
		}
	}
	p("\n")

	p("### Full drain\n\n")
	p("Right after the sustained 0.5× job, each system writes back everything it holds dirty, its own way: dm-writeboost `dmsetup suspend` + `resume` (to flush its RAM buffer, upstream issue #148) then `message 0 drop_caches`; dm-writecache `message 0 flush` then `cleaner`, until no block is used; bcache `writeback_percent 0` until `state` is clean; writeboost `writeboost drain`.\n\n")
	p("| System | Dirty at the start | Drain time | × dm-writeboost | Drain rate |\n|---|---|---|---|---|\n")
	base := m.Drain["dmwb"]
	for _, s := range mains {
		d, ok := m.Drain[s.ID]
		if !ok {
			continue
		}
		if d.Error != "" {
			p("| %s | %s | failed after %.1f s: %s | — | — |\n", s.Name, humanBytes(float64(d.DirtyBytes)), d.Seconds, d.Error)
			continue
		}
		rel := math.NaN()
		if base.Error == "" && base.Seconds > 0 {
			rel = d.Seconds / base.Seconds
		}
		p("| %s | %s | %.1f s | %s | %.1f MB/s |\n", s.Name, humanBytes(float64(d.DirtyBytes)), d.Seconds, fmtRatio(rel, "x"), float64(d.DirtyBytes)/math.Max(d.Seconds, 1e-3)/1e6)
	}
	p("\n")

	p("### Recovery after a power cut\n\n")
	if r.Recover == nil || len(r.Recover.Recovery) == 0 {
		p("Not measured in this run.\n\n")
	} else {
		rc := r.Recover
		p("Each cache on its own partitions of two virtio disks (host files), background writeback off, %.0f %% of the cache filled with random 4 KiB writes that fio can verify, then fsync; then the VM was killed (SIGKILL to QEMU) and booted again. Recovery time is from opening the cache (`dmsetup create`, bcache `register`, `writeboost serve` + `attach`) until a 4 KiB O_DIRECT read of the device returns; then fio verifies every block written.\n\n", 100*rc.Config.FillFraction)
		p("| System | Filled | Dirty at the cut | Recovery time | × dm-writeboost | Data verified |\n|---|---|---|---|---|---|\n")
		b := rc.Recovery["dmwb"]
		for _, id := range powerCutSystems {
			x, ok := rc.Recovery[id]
			if !ok {
				continue
			}
			if x.Error != "" {
				p("| %s | %s | — | failed: %s | — | — |\n", vmSysName(id), humanBytes(float64(x.FillBytes)), x.Error)
				continue
			}
			rel := math.NaN()
			if b.Error == "" && b.Seconds > 0 {
				rel = x.Seconds / b.Seconds
			}
			ver := "yes"
			if !x.Verified {
				ver = "**no**: " + x.VerifyError
			}
			p("| %s | %s | %s | %.2f s | %s | %s |\n", vmSysName(id), humanBytes(float64(x.FillBytes)), humanBytes(float64(x.DirtyAtCut)), x.Seconds, fmtRatio(rel, "x"), ver)
		}
		p("\n")
	}

	p("### Where writeboost loses, and why\n\n")
	lost := false
	for _, j := range vmJobs {
		var behind []string
		for _, peer := range peers {
			if v := r.ratio(j.ID, "wbk", peer); v < 1 {
				behind = append(behind, fmt.Sprintf("%s × %s", fmtRatio(v, "x"), vmSysName(peer)))
			}
		}
		if len(behind) == 0 {
			continue
		}
		lost = true
		p("- **%s** (%s): %s.\n", j.Title, strings.Join(behind, ", "), lostReason(r, j.ID))
	}
	if !lost {
		p("No job of this run: writeboost is at or ahead of every peer that ran it.\n")
	}
	p("\n")

	p("### What limits writeboost\n\n")
	p("Time per request at QD1 (1 / IOPS) on each path, and where the CPU went. nbdkit's memory plugin and pkg/nbd over RAM, each through the same kernel nbd driver, measure the round trip any userspace target pays and what our server adds to it.\n\n")
	p("| Path | µs per 4K write at QD1 | vCPUs busy at QD1 | server CPU µs per request at QD1 | vCPUs busy at QD32 | server CPU µs per request at QD32 |\n|---|---|---|---|---|---|\n")
	for _, id := range []string{"cache", "dmwb", "dmwc", "bcache", "nbdkit", "ournbd", "wbk", "wbf"} {
		x1, ok1 := r.get("qd1", id)
		if !ok1 {
			continue
		}
		x32, ok32 := r.get("qd32", id)
		srv := func(x VMFio) string {
			if x.ServerUserSec+x.ServerSysSec == 0 || x.IOs() == 0 {
				return "—"
			}
			return fmt.Sprintf("%.0f (%.0f user + %.0f kernel)", 1e6*(x.ServerUserSec+x.ServerSysSec)/x.IOs(), 1e6*x.ServerUserSec/x.IOs(), 1e6*x.ServerSysSec/x.IOs())
		}
		busy32, srv32 := "—", "—"
		if ok32 {
			busy32, srv32 = fmt.Sprintf("%.0f %%", 100*x32.CPUBusy), srv(x32)
		}
		p("| %s | %.0f | %.0f %% | %s | %s | %s |\n", vmSysName(id), 1e6/x1.IOPS(), 100*x1.CPUBusy, srv(x1), busy32, srv32)
	}
	p("\n")
	if len(m.EngineAlone) > 0 {
		p("Server side against client side: the engine writeboost serves, called in-process (default tunables, RAM buffers on /dev/shm, cache with O_DIRECT) on fresh devices of the same kind, with as many writers as the job's queue depth and no NBD in between, against the same job through `writeboost serve` and kernel nbd. Time per request is queue depth / IOPS for both; the rest of writeboost's time is the NBD path.\n\n")
		p("| Job | writeboost: IOPS | µs per request | engine alone: IOPS | µs per request | p99 µs | NBD path's share of writeboost's time | nbdkit memory: µs per request |\n|---|---|---|---|---|---|---|---|\n")
		for _, j := range engineAloneJobs {
			ea, ok := m.EngineAlone[j.id]
			if !ok {
				continue
			}
			if ea.Error != "" {
				p("| %s | — | — | failed: %s | — | — | — | — |\n", vmJob(j.id).Title, ea.Error)
				continue
			}
			qd := float64(j.writers)
			wbIOPS, wbUs, share, kitUs := "—", "—", "—", "—"
			if x, ok := r.get(j.id, "wbk"); ok && x.IOPS() > 0 {
				wbIOPS, wbUs = fmt.Sprintf("%.0f", x.IOPS()), fmt.Sprintf("%.0f", 1e6*qd/x.IOPS())
				share = fmt.Sprintf("%.0f %%", 100*(1-x.IOPS()/ea.IOPS))
			}
			if x, ok := r.get(j.id, "nbdkit"); ok && x.IOPS() > 0 {
				kitUs = fmt.Sprintf("%.0f", 1e6*qd/x.IOPS())
			}
			p("| %s | %s | %s | %.0f | %.0f | %.0f | %s | %s |\n", vmJob(j.id).Title, wbIOPS, wbUs, ea.IOPS, 1e6*qd/ea.IOPS, ea.P99Us, share, kitUs)
		}
		p("\n")
	}
	p("writeboost's log after each job (writes are paced while more than 75 %% of the ring is not yet written back; counters run from the volume's start: the short jobs share one volume, each sustained job has its own).\n\n")
	p("| After | Ring not written back | Dirty blocks | Paced writes | Written back |\n|---|---|---|---|---|\n")
	for _, j := range vmJobs {
		x, ok := m.Fio[j.ID]["wbk"]
		if !ok || x.Engine == nil {
			continue
		}
		en := x.Engine
		p("| %s | %.0f %% | %d | %d | %s |\n", j.Title, 100*en.RingUsed(), en.NrDirtyCacheBlocks, en.PacedWrites, humanBytes(float64(en.WritebackBytes)))
	}
	p("\n")
	for _, key := range []string{"wbk/qd1", "wbk/qd32", "dmwb/qd1", "dmwb/qd32"} {
		pr, ok := m.Profiles[key]
		if !ok {
			continue
		}
		sys, job, _ := strings.Cut(key, "/")
		p("perf's profile of the whole VM (every vCPU, kernel and user; `perf record -a -e cpu-clock`) during an extra, unmeasured run of %s on %s: samples by process, object and symbol (entries under 1 %% left out).\n\n```\n%s```\n\n", vmJob(job).Title, vmSysName(sys), pr)
	}
	for _, ch := range charts {
		p("![%s](benchmarks/%s)\n\n", ch, ch)
	}
	p("### Reproduce\n\n`make bench-vm` (hack/bench-vm.sh: builds dm-writeboost's module once into ~/.cache/writeboost-csi, boots the VM three times with hack/vm's runner: the main run, the fill, and the boot after the power cut; then `go run ./hack/bench vm-render`). It is not part of the tests.\n\n")
	return b.String()
}

// cell renders f for a job that ran, or why it did not.
func cell(r *VMResults, job, id string, f func() string) string {
	x, ok := r.Main.Fio[job][id]
	switch {
	case !ok:
		return "—"
	case x.Error != "":
		return "failed"
	}
	return f()
}

// insertVMSection puts the VM section before the page's Reproduce
// section (or at the end).
func insertVMSection(page, section string) string {
	if i := strings.Index(page, "\n## Reproduce\n"); i >= 0 {
		return page[:i+1] + section + page[i+1:]
	}
	return page + "\n" + section
}

// pacedDuring is how many of writeboost's writes job had paced: the
// counter's rise since the previous job on the same volume (the short jobs
// share one; each sustained job has its own).
func pacedDuring(r *VMResults, job string) string {
	x, ok := r.Main.Fio[job]["wbk"]
	if !ok || x.Engine == nil {
		return "an unknown number"
	}
	var before uint64
	if !vmJob(job).Sustained {
		for _, j := range vmJobs {
			if j.ID == job {
				break
			}
			if y, ok := r.Main.Fio[j.ID]["wbk"]; ok && y.Engine != nil && !j.Sustained {
				before = y.Engine.PacedWrites
			}
		}
	}
	return fmt.Sprintf("%d", x.Engine.PacedWrites-min(before, x.Engine.PacedWrites))
}

// engineNote says how full writeboost's log was after job and how many
// writes it paced.
func engineNote(r *VMResults, job string) string {
	x, ok := r.Main.Fio[job]["wbk"]
	if !ok || x.Engine == nil {
		return ""
	}
	return fmt.Sprintf("after the job %.0f %% of writeboost's ring was not yet written back, and %s writes were paced during it (held back for writeback, which the engine does above 75 %%; %.0f writes in the measured %.0f s)",
		100*x.Engine.RingUsed(), pacedDuring(r, job), x.WriteIOPS*x.RuntimeSec, x.RuntimeSec)
}

// lostReason explains from this run's own measurements why writeboost is
// behind a peer in job.
func lostReason(r *VMResults, job string) string {
	switch job {
	case "qd1":
		return qd1Breakdown(r)
	case "fsync", "qd32":
		s := engineAloneNote(r, job)
		if s != "" {
			s += "; "
		}
		return s + cpuNote(r, job)
	case "sus05", "sus2":
		return sustainedNote(r, job)
	}
	return cpuNote(r, job)
}

// engineAloneNote compares writeboost through kernel nbd with its engine
// called in-process (the server side) and with the peers in job.
func engineAloneNote(r *VMResults, job string) string {
	ea, ok := r.Main.EngineAlone[job]
	x, okx := r.get(job, "wbk")
	if !ok || ea.Error != "" || ea.IOPS <= 0 || !okx || x.IOPS() <= 0 {
		return ""
	}
	s := fmt.Sprintf("the engine alone (in-process, same devices, no NBD) did %.0f IOPS where writeboost through kernel nbd did %.0f, so the NBD path takes %.0f %% of each request's time", ea.IOPS, x.IOPS(), 100*(1-x.IOPS()/ea.IOPS))
	var vs []string
	for _, peer := range peers {
		if y, ok := r.get(job, peer); ok && y.IOPS() > 0 {
			vs = append(vs, fmt.Sprintf("%.2f× %s", ea.IOPS/y.IOPS(), vmSysName(peer)))
		}
	}
	if len(vs) > 0 {
		s += "; the engine alone is " + strings.Join(vs, ", ")
	}
	if k, ok := r.get(job, "nbdkit"); ok && k.IOPS() > 0 {
		s += fmt.Sprintf("; nbdkit memory, which does no work at all, reaches %.0f IOPS through the same path", k.IOPS())
	}
	return s
}
