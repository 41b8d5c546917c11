package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
)

// vmMain is `bench vm`, the driver that runs inside the real-kernel VM
// (make bench-vm; hack/bench-vm.sh boots the VM with hack/vm's runner).
// Each phase writes one JSON file into --out (a directory in the shared
// tree); `bench vm-render` on the host merges them into the page.
//
//	--phase main     every system on a fresh cache (a loop device on the
//	                 VM's tmpfs) over a fresh HDD model: the fio jobs, the
//	                 sustained jobs, the drain
//	--phase fill     each cache system on its own partitions of two virtio
//	                 disks, background writeback off, filled with
//	                 verifiable data and flushed; then it writes
//	                 fill.json and waits for the VM to be killed
//	--phase recover  after the kill: time from opening each cache until a
//	                 read of its device returns, then fio verifies the data
func vmMain(args []string) error {
	fs := flag.NewFlagSet("vm", flag.ContinueOnError)
	var o vmOpts
	fs.StringVar(&o.phase, "phase", "main", "main, fill or recover")
	fs.StringVar(&o.out, "out", "", "directory for this phase's JSON (shared with the host)")
	fs.StringVar(&o.work, "work", "/tmp/benchvm", "VM-local scratch directory (tmpfs)")
	fs.StringVar(&o.writeboost, "writeboost", "", "cmd/writeboost binary")
	fs.StringVar(&o.module, "module", "", "dm-writeboost.ko built for this kernel")
	fs.Int64Var(&o.cache, "cache-size", 32<<20, "cache device size, bytes")
	fs.Int64Var(&o.hdd, "hdd-size", 1<<30, "HDD model size (its full stroke), bytes")
	fs.DurationVar(&o.short, "runtime", 5*time.Second, "measured time of each short job")
	fs.DurationVar(&o.ramp, "ramp", 1*time.Second, "ramp before each short job")
	fs.DurationVar(&o.sustained, "sustained", 60*time.Second, "measured time of each sustained job (60 s: long enough for the log to wrap many times at 0.5x the cache)")
	fs.DurationVar(&o.drainLimit, "drain-limit", 2*time.Minute, "give up a drain after this long")
	fs.Float64Var(&o.fill, "fill", 0.6, "power cut: share of the cache filled with dirty data")
	fs.StringVar(&o.systems, "systems", "", "comma-separated system ids (default: all)")
	fs.StringVar(&o.hddAttach, "hdd-attach", "kernel-netlink", "attach method for the HDD model (another only to try the driver outside the VM)")
	fs.StringVar(&o.disks, "disks", "", "fill/recover: cache disk and HDD disk, comma-separated (each with one partition per system)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if o.out == "" || o.writeboost == "" {
		return errors.New("vm: --out and --writeboost are required")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(o.work, 0o700); err != nil {
		return err
	}
	v := &vmEnv{work: o.work, writeboost: o.writeboost, self: self, module: o.module, attachDir: filepath.Join(o.work, "attach"), hddAttach: o.hddAttach}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	loadModules(ctx)
	switch o.phase {
	case "main":
		return vmPhaseMain(ctx, v, o)
	case "fill":
		return vmPhaseFill(ctx, v, o)
	case "recover":
		return vmPhaseRecover(ctx, v, o)
	}
	return fmt.Errorf("vm: unknown phase %q", o.phase)
}

type vmOpts struct {
	phase, out, work, writeboost, module, systems, disks, hddAttach string
	cache, hdd                                                      int64
	short, ramp, sustained, drainLimit                              time.Duration
	fill                                                            float64
}

func (o vmOpts) want(id string) bool {
	if o.systems == "" {
		return true
	}
	for _, s := range strings.Split(o.systems, ",") {
		if s == id {
			return true
		}
	}
	return false
}

// VMJob is one fio job of the VM section.
type VMJob struct {
	ID     string  `json:"id"`
	Title  string  `json:"title"`
	Metric string  `json:"metric"` // "iops" or "bw"
	Region float64 `json:"working_set_x_cache"`
	// Sustained jobs run on a fresh cache for the sustained time and log
	// IOPS every second.
	Sustained bool     `json:"sustained,omitempty"`
	Args      []string `json:"-"`
}

var vmJobs = []VMJob{
	{ID: "seq1m", Title: "1 MiB sequential write QD4", Metric: "bw", Region: 0.5,
		Args: []string{"--rw=write", "--bs=1m", "--iodepth=4", "--ioengine=libaio"}},
	{ID: "qd1", Title: "4K random write QD1", Metric: "iops", Region: 0.5,
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=1", "--ioengine=psync"}},
	{ID: "qd32", Title: "4K random write QD32", Metric: "iops", Region: 0.5,
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", "--ioengine=libaio"}},
	{ID: "fsync", Title: "4K random write + fsync each", Metric: "iops", Region: 0.5,
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=1", "--ioengine=psync", "--fsync=1"}},
	{ID: "mix", Title: "4K random 70/30 read/write QD32", Metric: "iops", Region: 0.5,
		Args: []string{"--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32", "--ioengine=libaio"}},
	{ID: "sus05", Title: "4K random write QD32, sustained, working set 0.5x the cache", Metric: "iops", Region: 0.5, Sustained: true,
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", "--ioengine=libaio"}},
	{ID: "sus2", Title: "4K random write QD32, sustained, working set 2x the cache", Metric: "iops", Region: 2, Sustained: true,
		Args: []string{"--rw=randwrite", "--bs=4k", "--iodepth=32", "--ioengine=libaio"}},
}

// VMFio is one fio job on one system, with what the VM's CPUs did.
type VMFio struct {
	FioResult
	// CPUBusy is the share of all vCPUs' time not idle during the job.
	CPUBusy float64 `json:"cpu_busy"`
	// ServerUserSec and ServerSysSec are the userspace server's CPU time
	// during the job (writeboost and the NBD references).
	ServerUserSec float64 `json:"server_user_sec,omitempty"`
	ServerSysSec  float64 `json:"server_sys_sec,omitempty"`
	// PerSecond is the IOPS of every second (sustained jobs).
	PerSecond []float64 `json:"per_second_iops,omitempty"`
	// DirtyAfter is what the system held dirty after the job, bytes (-1:
	// unknown).
	DirtyAfter int64 `json:"dirty_after"`
}

// IOs is the number of requests the job completed.
func (r VMFio) IOs() float64 { return r.IOPS() * r.RuntimeSec }

// VMDrain is the drain after the sustained 0.5x job.
type VMDrain struct {
	DirtyBytes int64   `json:"dirty_bytes"`
	Seconds    float64 `json:"seconds"`
	Error      string  `json:"error,omitempty"`
}

// VMRecovery is one system's power-cut figure.
type VMRecovery struct {
	FillBytes   int64   `json:"fill_bytes"`
	FillSec     float64 `json:"fill_sec"`
	DirtyAtCut  int64   `json:"dirty_at_cut"`
	Seconds     float64 `json:"seconds"`
	Verified    bool    `json:"verified"`
	VerifyError string  `json:"verify_error,omitempty"`
	Error       string  `json:"error,omitempty"`
}

// VMPhase is what one phase wrote.
type VMPhase struct {
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	Kernel   string    `json:"kernel"`
	CPUs     int       `json:"cpus"`
	MemTotal string    `json:"mem_total"`
	FioVer   string    `json:"fio_version"`
	// Config records the sizes and times of the run.
	Config struct {
		CacheBytes   int64   `json:"cache_bytes"`
		HDDBytes     int64   `json:"hdd_bytes"`
		ShortSec     float64 `json:"short_sec"`
		RampSec      float64 `json:"ramp_sec"`
		SustainedSec float64 `json:"sustained_sec"`
		FillFraction float64 `json:"fill_fraction,omitempty"`
	} `json:"config"`
	SysErrors map[string]string           `json:"system_errors,omitempty"`
	Fio       map[string]map[string]VMFio `json:"fio,omitempty"`
	Drain     map[string]VMDrain          `json:"drain,omitempty"`
	Recovery  map[string]VMRecovery       `json:"recovery,omitempty"`
	// Profiles["wbk/qd32"] is perf's whole-VM profile of an extra run of
	// a job: CPU share by process and object, and the top symbols.
	Profiles map[string]string `json:"profiles,omitempty"`
	// EngineAlone["qd1"] is writeboost's engine called in-process on the
	// same kind of fresh devices, no NBD in between: the server-side time
	// per request (vmengine.go).
	EngineAlone map[string]VMEngineAlone `json:"engine_alone,omitempty"`
	Errors      []string                 `json:"errors,omitempty"`
}

func newPhase(o vmOpts) *VMPhase {
	p := &VMPhase{Started: time.Now().UTC(), CPUs: runtime.NumCPU(), SysErrors: map[string]string{}}
	m := machineFacts(context.Background())
	p.Kernel, p.MemTotal, p.FioVer = m.Kernel, m.MemTotal, m.Fio
	p.Config.CacheBytes, p.Config.HDDBytes = o.cache, o.hdd
	p.Config.ShortSec, p.Config.RampSec, p.Config.SustainedSec = o.short.Seconds(), o.ramp.Seconds(), o.sustained.Seconds()
	return p
}

func (p *VMPhase) save(dir, name string) error {
	p.Finished = time.Now().UTC()
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// fill.json must reach the host before QEMU is killed: write, fsync,
	// rename, fsync the directory (over 9p nothing is on the host until
	// then).
	tmp := filepath.Join(dir, name+".tmp")
	f, err := os.Create(tmp)
	if err != nil {
		return err
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// hddSetup starts the HDD model over path and attaches it with the kernel
// nbd driver.
func hddSetup(ctx context.Context, v *vmEnv, path string, size int64) (string, func(), error) {
	name := v.name("hdd")
	dir := filepath.Join(v.work, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, err
	}
	sock := filepath.Join(dir, "nbd.sock")
	_, stop, err := startVMProc(ctx, dir, sock, v.self, "nbd-serve", "--kind", "hdd", "--path", path, "--size", strconv.FormatInt(size, 10), "--socket", sock)
	if err != nil {
		return "", nil, fmt.Errorf("HDD model: %w", err)
	}
	dev, detach, err := attachNBD(ctx, v, sock, name, v.hddAttach)
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("attach HDD model: %w", err)
	}
	return dev, func() {
		if err := detach(); err != nil {
			klog.ErrorS(err, "detach HDD model")
		}
		stop()
	}, nil
}

// freshDevices makes a new cache loop device on tmpfs and a new HDD model.
func freshDevices(ctx context.Context, v *vmEnv, o vmOpts) (vmDevices, func(), error) {
	name := v.name("dev")
	cacheImg := filepath.Join(v.work, name+"-cache.img")
	hddImg := filepath.Join(v.work, name+"-hdd.img")
	if err := blockdev.CreateSparseFile(cacheImg, o.cache); err != nil {
		return vmDevices{}, nil, err
	}
	loop, err := sh(ctx, "losetup", "--find", "--show", cacheImg)
	if err != nil {
		os.Remove(cacheImg)
		return vmDevices{}, nil, err
	}
	hdd, stopHDD, err := hddSetup(ctx, v, hddImg, o.hdd)
	if err != nil {
		sh(ctx, "losetup", "-d", loop)
		os.Remove(cacheImg)
		return vmDevices{}, nil, err
	}
	return vmDevices{Cache: loop, HDD: hdd}, func() {
		stopHDD()
		if _, err := sh(context.Background(), "losetup", "-d", loop); err != nil {
			klog.ErrorS(err, "losetup -d")
		}
		os.Remove(cacheImg)
		os.Remove(hddImg)
	}, nil
}

func readCPU() CPUTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPUTimes{}
	}
	c, _ := parseProcStat(string(b))
	return c
}

func readPidCPU(pid int) (uint64, uint64) {
	if pid <= 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	u, s, _ := parseProcPidStat(string(b))
	return u, s
}

// clockTicks is USER_HZ, 100 on every Linux this runs on.
const clockTicks = 100.0

// runVMJob runs one fio job on dev.
func runVMJob(ctx context.Context, v *vmEnv, d *vmDev, j VMJob, o vmOpts) VMFio {
	region := int64(j.Region*float64(o.cache)) &^ (1<<20 - 1)
	runtime, ramp := o.short, o.ramp
	if j.Sustained {
		runtime, ramp = o.sustained, 0
	}
	args := []string{"--name=" + j.ID, "--filename=" + d.Path, "--direct=1",
		"--size=" + strconv.FormatInt(region, 10), "--offset=0",
		"--output-format=json", "--group_reporting=1", "--randrepeat=0", "--norandommap=1",
		"--time_based=1", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds()))}
	if ramp > 0 {
		args = append(args, fmt.Sprintf("--ramp_time=%ds", int(ramp.Seconds())))
	}
	logPrefix := ""
	if j.Sustained {
		logPrefix = filepath.Join(v.work, v.name("iops"))
		args = append(args, "--write_iops_log="+logPrefix, "--log_avg_msec=1000")
	}
	args = append(args, j.Args...)
	c0 := readCPU()
	u0, s0 := readPidCPU(d.PID)
	r := VMFio{FioResult: execFio(ctx, args, 2*(runtime+ramp)+3*time.Minute), DirtyAfter: -1}
	c1 := readCPU()
	u1, s1 := readPidCPU(d.PID)
	if t := c1.Total() - c0.Total(); t > 0 {
		r.CPUBusy = float64(c1.Busy()-c0.Busy()) / float64(t)
	}
	r.ServerUserSec, r.ServerSysSec = float64(u1-u0)/clockTicks, float64(s1-s0)/clockTicks
	if logPrefix != "" {
		matches, _ := filepath.Glob(logPrefix + "_iops*.log")
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err == nil {
				if ps, err := parseFioIOPSLog(string(b)); err == nil {
					r.PerSecond = ps
				} else {
					klog.ErrorS(err, "fio iops log", "file", m)
				}
			}
			os.Remove(m)
		}
	}
	if d.Dirty != nil {
		if n, err := d.Dirty(ctx); err == nil {
			r.DirtyAfter = n
		}
	}
	if d.Engine != nil {
		if snap, err := d.Engine(ctx); err == nil {
			r.Engine = snap
		}
	}
	klog.InfoS("fio", "job", j.ID, "ringUsed", r.Engine.RingUsed(), "iops", int(r.IOPS()), "MBps", int(r.BW()/1e6), "p99ms", r.P99Ms(), "cpuBusy", r.CPUBusy, "dirtyAfter", r.DirtyAfter, "error", r.Error)
	return r
}

// withSystem builds s on fresh devices, runs fn, and tears everything
// down.
func withSystem(ctx context.Context, v *vmEnv, s VMSystem, o vmOpts, fn func(d *vmDev) error) error {
	devs, release, err := freshDevices(ctx, v, o)
	if err != nil {
		return err
	}
	defer release()
	d, err := s.setup(ctx, v, devs, setupOpts{Format: true})
	if err != nil {
		return fmt.Errorf("set up %s: %w", s.Name, err)
	}
	ferr := fn(d)
	if err := d.Close(); err != nil {
		klog.ErrorS(err, "tear down", "system", s.ID)
	}
	return ferr
}

func vmPhaseMain(ctx context.Context, v *vmEnv, o vmOpts) error {
	p := newPhase(o)
	p.Fio, p.Drain = map[string]map[string]VMFio{}, map[string]VMDrain{}
	record := func(j VMJob, id string, r VMFio) {
		if p.Fio[j.ID] == nil {
			p.Fio[j.ID] = map[string]VMFio{}
		}
		p.Fio[j.ID][id] = r
	}
	fail := func(s VMSystem, err error) {
		klog.ErrorS(err, "system failed", "system", s.ID)
		p.SysErrors[s.ID] = err.Error()
		p.Errors = append(p.Errors, fmt.Sprintf("%s: %v", s.Name, err))
	}
	for _, s := range vmSystems {
		if !o.want(s.ID) {
			continue
		}
		klog.InfoS("system", "id", s.ID, "name", s.Name)
		err := withSystem(ctx, v, s, o, func(d *vmDev) error {
			for _, j := range vmJobs {
				if j.Sustained || (s.Ref && !contains(s.RefJobs, j.ID)) {
					continue
				}
				record(j, s.ID, runVMJob(ctx, v, d, j, o))
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
			if s.ID == "wbk" || s.ID == "dmwb" {
				// Profiles come from extra runs, so that perf's
				// sampling does not slow the measured ones.
				jobs := []string{"qd1", "qd32"}
				if s.ID == "dmwb" {
					jobs = jobs[1:]
				}
				for _, id := range jobs {
					pr := profileJob(ctx, v, d, vmJob(id), o)
					if p.Profiles == nil {
						p.Profiles = map[string]string{}
					}
					p.Profiles[s.ID+"/"+id] = pr
				}
			}
			return nil
		})
		if err != nil {
			fail(s, err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if s.Ref || s.NoSustained {
			_ = p.save(o.out, "main.json")
			continue
		}
		for _, j := range vmJobs {
			if !j.Sustained {
				continue
			}
			err := withSystem(ctx, v, s, o, func(d *vmDev) error {
				record(j, s.ID, runVMJob(ctx, v, d, j, o))
				if j.ID != "sus05" {
					return nil
				}
				var dr VMDrain
				if d.Dirty != nil {
					dr.DirtyBytes, _ = d.Dirty(ctx)
				}
				dctx, cancel := context.WithTimeout(ctx, o.drainLimit)
				t := time.Now()
				err := d.Drain(dctx)
				dr.Seconds = time.Since(t).Seconds()
				cancel()
				if err != nil {
					dr.Error = err.Error()
				}
				klog.InfoS("drain", "system", s.ID, "dirtyBytes", dr.DirtyBytes, "seconds", dr.Seconds, "error", dr.Error)
				p.Drain[s.ID] = dr
				return nil
			})
			if err != nil {
				fail(s, err)
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
		_ = p.save(o.out, "main.json")
	}
	if o.want("wbk") {
		p.EngineAlone = vmEngineAlone(ctx, v, o)
	}
	return p.save(o.out, "main.json")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// powerCutSystems are the caches of the power-cut figure, in the order of
// the partitions of the two disks.
var powerCutSystems = []string{"dmwb", "bcache", "wbk", "dmwc"}

// partition names partition i (from 0) of disk: vda1, or loop0p1 and
// nbd0p1 after a digit.
func partition(disk string, i int) string {
	if c := disk[len(disk)-1]; c >= '0' && c <= '9' {
		return fmt.Sprintf("%sp%d", disk, i+1)
	}
	return fmt.Sprintf("%s%d", disk, i+1)
}

func splitDisks(o vmOpts) (string, string, error) {
	cache, hdd, ok := strings.Cut(o.disks, ",")
	if !ok {
		return "", "", fmt.Errorf("--disks wants CACHE,HDD (got %q)", o.disks)
	}
	return cache, hdd, nil
}

func vmSystemByID(id string) VMSystem {
	for _, s := range vmSystems {
		if s.ID == id {
			return s
		}
	}
	panic("unknown system " + id)
}

// fillArgs are the fio arguments that write, and later verify, the same
// pseudo-random data: every block of the region once, seeded.
func fillArgs(dev string, region int64) []string {
	return []string{"--name=fill", "--filename=" + dev, "--direct=1", "--size=" + strconv.FormatInt(region, 10), "--offset=0",
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--randrepeat=1", "--randseed=1616",
		"--verify=crc32c", "--verify_state_save=0", "--output-format=json"}
}

func vmPhaseFill(ctx context.Context, v *vmEnv, o vmOpts) error {
	cacheDisk, hddDisk, err := splitDisks(o)
	if err != nil {
		return err
	}
	p := newPhase(o)
	p.Config.FillFraction = o.fill
	p.Recovery = map[string]VMRecovery{}
	region := int64(o.fill*float64(o.cache)) &^ (1<<20 - 1)
	var stops []func()
	for i, id := range powerCutSystems {
		if !o.want(id) {
			continue
		}
		s := vmSystemByID(id)
		var rec VMRecovery
		err := func() error {
			hdd, stopHDD, err := hddSetup(ctx, v, partition(hddDisk, i), 0)
			if err != nil {
				return err
			}
			stops = append(stops, stopHDD)
			d, err := s.setup(ctx, v, vmDevices{Cache: partition(cacheDisk, i), HDD: hdd}, setupOpts{Format: true, NoWriteback: true})
			if err != nil {
				return fmt.Errorf("set up: %w", err)
			}
			t := time.Now()
			args := append(fillArgs(d.Path, region), "--do_verify=0", "--end_fsync=1")
			r := execFio(ctx, args, 20*time.Minute)
			rec.FillSec = time.Since(t).Seconds()
			rec.FillBytes = region
			if r.Error != "" {
				return fmt.Errorf("fill: %s", r.Error)
			}
			if d.Dirty != nil {
				rec.DirtyAtCut, _ = d.Dirty(ctx)
			}
			klog.InfoS("filled", "system", id, "bytes", region, "seconds", rec.FillSec, "dirty", rec.DirtyAtCut)
			return nil
		}()
		if err != nil {
			rec.Error = err.Error()
			klog.ErrorS(err, "fill failed", "system", id)
		}
		p.Recovery[id] = rec
	}
	// Everything is flushed; the power cut comes from outside. Sync the
	// shared tree's copy of fill.json first, then say so on stdout.
	if err := p.save(o.out, "fill.json"); err != nil {
		return err
	}
	fmt.Println("BENCHVM-FILLED")
	os.Stdout.Sync()
	select {
	case <-ctx.Done():
	case <-time.After(10 * time.Minute):
	}
	for _, stop := range stops {
		stop()
	}
	return errors.New("fill: the VM was not killed within 10 minutes")
}

func vmPhaseRecover(ctx context.Context, v *vmEnv, o vmOpts) error {
	cacheDisk, hddDisk, err := splitDisks(o)
	if err != nil {
		return err
	}
	var fill VMPhase
	b, err := os.ReadFile(filepath.Join(o.out, "fill.json"))
	if err != nil {
		return fmt.Errorf("read fill.json: %w", err)
	}
	if err := json.Unmarshal(b, &fill); err != nil {
		return fmt.Errorf("decode fill.json: %w", err)
	}
	p := newPhase(o)
	p.Config.FillFraction = fill.Config.FillFraction
	p.Recovery = map[string]VMRecovery{}
	for i, id := range powerCutSystems {
		rec, ok := fill.Recovery[id]
		if !ok {
			continue
		}
		s := vmSystemByID(id)
		if rec.Error != "" {
			p.Recovery[id] = rec
			continue
		}
		err := func() error {
			hdd, stopHDD, err := hddSetup(ctx, v, partition(hddDisk, i), 0)
			if err != nil {
				return err
			}
			defer stopHDD()
			t := time.Now()
			d, err := s.setup(ctx, v, vmDevices{Cache: partition(cacheDisk, i), HDD: hdd}, setupOpts{NoWriteback: true})
			if err != nil {
				return fmt.Errorf("open after the power cut: %w", err)
			}
			defer d.Close()
			if err := pollUntil(ctx, 5*time.Minute, 10*time.Millisecond, func() (bool, error) { return readProbe(d.Path) == nil, nil }); err != nil {
				return fmt.Errorf("device never readable: %w", err)
			}
			rec.Seconds = time.Since(t).Seconds()
			args := append(fillArgs(d.Path, rec.FillBytes), "--verify_only=1")
			r := execFio(ctx, args, 20*time.Minute)
			rec.Verified = r.Error == ""
			rec.VerifyError = r.Error
			klog.InfoS("recovered", "system", id, "seconds", rec.Seconds, "verified", rec.Verified, "verifyError", rec.VerifyError)
			return nil
		}()
		if err != nil {
			rec.Error = err.Error()
			klog.ErrorS(err, "recovery failed", "system", id)
		}
		p.Recovery[id] = rec
	}
	return p.save(o.out, "recover.json")
}

// writeMBR writes a DOS partition table to the start of the file at path
// with n primary Linux partitions of size bytes each, the first at 1 MiB,
// and makes the file big enough to hold them (sparse). The power-cut
// phase gives each system its own partitions of two virtio disks (no
// partitioning tool is needed on the host).
func writeMBR(path string, n int, size int64) error {
	if n < 1 || n > 4 || size <= 0 || size%512 != 0 {
		return fmt.Errorf("mbr: %d partitions of %d bytes: want 1-4 of a whole number of sectors", n, size)
	}
	const start = 1 << 20
	end := int64(start) + int64(n)*size
	if end/512 > math.MaxUint32 {
		return fmt.Errorf("mbr: %d bytes is past what a DOS table addresses", end)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Truncate(end); err != nil {
		return err
	}
	mbr := make([]byte, 512)
	for i := 0; i < n; i++ {
		e := mbr[446+16*i : 446+16*(i+1)]
		// Status, CHS of the first sector (unused: LBA only), type
		// 0x83 (Linux), CHS of the last sector, LBA start, sectors.
		copy(e, []byte{0x00, 0xfe, 0xff, 0xff, 0x83, 0xfe, 0xff, 0xff})
		binary.LittleEndian.PutUint32(e[8:], uint32((start+int64(i)*size)/512))
		binary.LittleEndian.PutUint32(e[12:], uint32(size/512))
	}
	mbr[510], mbr[511] = 0x55, 0xaa
	if _, err := f.WriteAt(mbr, 0); err != nil {
		return err
	}
	return f.Sync()
}

// vmDiskMain is `bench vm-disk --path FILE --parts N --size BYTES`.
func vmDiskMain(args []string) error {
	fs := flag.NewFlagSet("vm-disk", flag.ContinueOnError)
	path := fs.String("path", "", "disk image to create")
	n := fs.Int("parts", 4, "number of partitions")
	size := fs.Int64("size", 64<<20, "bytes per partition")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *path == "" {
		return errors.New("vm-disk: --path is required")
	}
	return writeMBR(*path, *n, *size)
}

// profileJob runs job once more under `perf record -a` (every vCPU, kernel
// and user) and returns perf's summaries: the share of samples by process
// and object, and the top symbols.
func profileJob(ctx context.Context, v *vmEnv, d *vmDev, j VMJob, o vmOpts) string {
	data := filepath.Join(v.work, v.name("perf")+".data")
	defer os.Remove(data)
	secs := int((o.short + o.ramp).Seconds())
	rec := exec.CommandContext(ctx, "perf", "record", "-a", "-e", "cpu-clock", "-F", "250", "-o", data, "--", "sleep", strconv.Itoa(secs))
	var recErr strings.Builder
	rec.Stderr = &recErr
	if err := rec.Start(); err != nil {
		return "perf record: " + err.Error()
	}
	_ = runVMJob(ctx, v, d, j, o)
	if err := rec.Wait(); err != nil {
		return fmt.Sprintf("perf record: %v: %s", err, lastLine(recErr.String()))
	}
	var out strings.Builder
	rep, err := sh(ctx, "perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "1", "--sort", "comm,dso,sym")
	if err != nil {
		return "perf report: " + err.Error()
	}
	n := 0
	for _, l := range strings.Split(rep, "\n") {
		if strings.HasPrefix(l, "#") || strings.TrimSpace(l) == "" {
			continue
		}
		out.WriteString(strings.TrimRight(l, " ") + "\n")
		if n++; n >= 30 {
			break
		}
	}
	return out.String()
}
