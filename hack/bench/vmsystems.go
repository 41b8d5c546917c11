package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

// The systems of make bench-vm, set up inside the VM on the same two
// devices each: a cache device and the HDD model attached through the
// kernel's nbd driver.

// VMSystem is one system measured in the VM.
type VMSystem struct {
	ID    string
	Name  string
	About string
	// Ref marks a reference (a raw device or a bare NBD server), not a
	// cache: it runs only the jobs in RefJobs.
	Ref     bool
	RefJobs []string
	// NoSustained runs the short jobs only (the fallback path, for
	// reference).
	NoSustained bool
	setup       func(ctx context.Context, v *vmEnv, devs vmDevices, o setupOpts) (*vmDev, error)
}

// vmDevices are the devices a system is built on.
type vmDevices struct {
	Cache string // block device
	HDD   string // the HDD model's kernel nbd device
}

type setupOpts struct {
	// Format starts from an empty cache; otherwise the system opens what
	// the cache device holds (recovery).
	Format bool
	// NoWriteback keeps background writeback off, so a fill stays dirty.
	NoWriteback bool
}

// vmDev is a running system.
type vmDev struct {
	Path string
	// PID is the userspace server's process (0 for kernel targets), for
	// CPU accounting.
	PID int
	// Dirty reports bytes not yet written back (nil: unknown).
	Dirty func(ctx context.Context) (int64, error)
	// Drain writes back everything and returns when nothing is dirty.
	Drain func(ctx context.Context) error
	Close func() error
	// Engine reports writeboost's log state (nil for the others).
	Engine func(ctx context.Context) (*EngineSnapshot, error)
}

// dm-writecache runs last: in one run its writeback hit a kernel BUG
// (list_del corruption in writecache_writeback, 6.1.192) that wedged the
// VM, and every system measured before a crash keeps its figures.
var vmSystems = []VMSystem{
	{ID: "dmwb", Name: "dm-writeboost", About: "dm-writeboost 2.2.17 (Debian's dm-writeboost-dkms built against the VM kernel's headers), `writeback_threshold 70` like writeboost's default (its own default, 0, turns background writeback off)", setup: setupDMWriteboost},
	{ID: "bcache", Name: "bcache", About: "bcache (bcache-tools), writeback mode, 4 KiB blocks, buckets of at most 64 KiB and small enough for 1024 of them (32 KiB on a 32 MiB cache: the kernel refuses a cache of 512 buckets or fewer); `sequential_cutoff 0` and the congestion thresholds 0, so it caches every write like the others instead of sending sequential or slow-cache writes to the HDD", setup: setupBcache},
	{ID: "wbk", Name: "writeboost", About: "`writeboost serve --direct` (cache device opened with O_DIRECT, default tunables; serve opens its backing device through the page cache, which has no O_DIRECT flag) attached through the kernel's nbd driver by `writeboost attach` (netlink)", setup: setupWriteboost("")},
	{ID: "wbf", Name: "writeboost, nbdfuse", About: "the same server attached by the fallback path (`attach --method nbdfuse-loop`: nbdfuse + a loop device), for reference", NoSustained: true, setup: setupWriteboost("nbdfuse-loop")},
	{ID: "cache", Name: "cache device, raw", About: "the cache device alone (a loop device on the VM's tmpfs): the ceiling", Ref: true, RefJobs: []string{"seq1m", "qd1", "qd32", "fsync", "mix"}, setup: setupRawCache},
	{ID: "hdd", Name: "HDD model, raw", About: "the HDD model through kernel nbd alone: what every cache sits on", Ref: true, RefJobs: []string{"seq1m", "qd1", "qd32", "fsync"}, setup: setupRawHDD},
	{ID: "nbdkit", Name: "nbdkit memory, kernel nbd", About: "nbdkit's memory plugin through the kernel's nbd driver: the round trip any userspace NBD target pays", Ref: true, RefJobs: []string{"qd1", "qd32"}, setup: setupNBDRef("nbdkit")},
	{ID: "ournbd", Name: "pkg/nbd over RAM, kernel nbd", About: "writeboost's NBD server (pkg/nbd) over RAM through the kernel's nbd driver: the server without the engine", Ref: true, RefJobs: []string{"qd1", "qd32"}, setup: setupNBDRef("ournbd")},
	{ID: "dmwc", Name: "dm-writecache", About: "dm-writecache in ssd mode, 4 KiB blocks, default watermarks (writeback from 50 % used)", setup: setupDMWritecache},
}

// vmEnv is what every system's setup shares inside the VM.
type vmEnv struct {
	work       string // VM-local scratch (tmpfs)
	writeboost string // cmd/writeboost binary
	self       string // this binary (nbd-serve)
	module     string // dm-writeboost.ko
	attachDir  string
	hddAttach  string // attach method of the HDD model
	seq        int
}

func (v *vmEnv) name(prefix string) string {
	v.seq++
	return fmt.Sprintf("%s%d", prefix, v.seq)
}

// sh runs a command and returns its trimmed standard output; the error
// carries its standard error.
func sh(ctx context.Context, name string, args ...string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cctx, name, args...)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return strings.TrimSpace(string(out)), nil
}

func writeSysfs(path, value string) error {
	if err := os.WriteFile(path, []byte(value), 0o200); err != nil {
		return fmt.Errorf("write %q to %s: %w", value, path, err)
	}
	return nil
}

func readSysfs(path string) (string, error) {
	b, err := os.ReadFile(path)
	return strings.TrimSpace(string(b)), err
}

func devSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return f.Seek(0, io.SeekEnd)
}

// zeroStart zeroes the first MiB of a device, where every system keeps its
// superblock, so that each starts from an empty cache.
func zeroStart(ctx context.Context, dev string) error {
	_, err := sh(ctx, "dd", "if=/dev/zero", "of="+dev, "bs=1M", "count=1", "oflag=direct", "conv=fsync", "status=none")
	return err
}

// pollUntil calls done every interval until it reports true, fails, or
// limit passes.
func pollUntil(ctx context.Context, limit, interval time.Duration, done func() (bool, error)) error {
	deadline := time.Now().Add(limit)
	for {
		ok, err := done()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not done after %s", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(interval):
		}
	}
}

// readProbe reads 4 KiB at offset 0 with O_DIRECT: "the device is usable".
func readProbe(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf, err := syscall.Mmap(-1, 0, 4096, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return err
	}
	defer syscall.Munmap(buf)
	_, err = f.ReadAt(buf, 0)
	return err
}

func loadModules(ctx context.Context) {
	for _, m := range []string{"dm-mod", "dm-writecache", "bcache", "nbd", "loop", "libcrc32c", "fuse"} {
		if _, err := sh(ctx, "modprobe", m); err != nil {
			klog.InfoS("modprobe failed (built in?)", "module", m, "err", err)
		}
	}
}

func loadDMWriteboost(ctx context.Context, module string) error {
	if _, err := os.Stat("/sys/module/dm_writeboost"); err == nil {
		return nil
	}
	if module == "" {
		return errors.New("no dm-writeboost module given (--module)")
	}
	if _, err := sh(ctx, "insmod", module); err != nil {
		return fmt.Errorf("load dm-writeboost: %w", err)
	}
	return nil
}

func dmRemove(name string) error {
	_, err := sh(context.Background(), "dmsetup", "remove", "--retry", name)
	return err
}

func setupDMWriteboost(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
	if err := loadDMWriteboost(ctx, v.module); err != nil {
		return nil, err
	}
	if o.Format {
		if err := zeroStart(ctx, d.Cache); err != nil {
			return nil, err
		}
	}
	size, err := devSize(d.HDD)
	if err != nil {
		return nil, err
	}
	thr := "70"
	if o.NoWriteback {
		thr = "0"
	}
	name := v.name("wb")
	table := fmt.Sprintf("0 %d writeboost %s %s 2 writeback_threshold %s", size/512, d.HDD, d.Cache, thr)
	if _, err := sh(ctx, "dmsetup", "create", name, "--table", table); err != nil {
		return nil, err
	}
	status := func(ctx context.Context) (WriteboostStatus, error) {
		out, err := sh(ctx, "dmsetup", "status", name)
		if err != nil {
			return WriteboostStatus{}, err
		}
		return parseWriteboostStatus(out)
	}
	return &vmDev{
		Path: "/dev/mapper/" + name,
		Dirty: func(ctx context.Context) (int64, error) {
			s, err := status(ctx)
			return int64(s.NrDirty) * 4096, err
		},
		Drain: func(ctx context.Context) error {
			// drop_caches waits for ever while the RAM buffer holds
			// data (upstream #148): suspend and resume flush it.
			if _, err := sh(ctx, "dmsetup", "suspend", name); err != nil {
				return err
			}
			if _, err := sh(ctx, "dmsetup", "resume", name); err != nil {
				return err
			}
			_, err := sh(ctx, "dmsetup", "message", name, "0", "drop_caches")
			return err
		},
		Close: func() error { return dmRemove(name) },
	}, nil
}

func setupDMWritecache(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
	if o.Format {
		if err := zeroStart(ctx, d.Cache); err != nil {
			return nil, err
		}
	}
	size, err := devSize(d.HDD)
	if err != nil {
		return nil, err
	}
	opt := "0"
	if o.NoWriteback {
		opt = "4 high_watermark 99 low_watermark 98"
	}
	name := v.name("wc")
	table := fmt.Sprintf("0 %d writecache s %s %s 4096 %s", size/512, d.HDD, d.Cache, opt)
	if _, err := sh(ctx, "dmsetup", "create", name, "--table", table); err != nil {
		return nil, err
	}
	status := func(ctx context.Context) (WritecacheStatus, error) {
		out, err := sh(ctx, "dmsetup", "status", name)
		if err != nil {
			return WritecacheStatus{}, err
		}
		return parseWritecacheStatus(out)
	}
	return &vmDev{
		Path: "/dev/mapper/" + name,
		Dirty: func(ctx context.Context) (int64, error) {
			s, err := status(ctx)
			return int64(s.Used()) * 4096, err
		},
		Drain: func(ctx context.Context) error {
			if _, err := sh(ctx, "dmsetup", "message", name, "0", "flush"); err != nil {
				return err
			}
			if _, err := sh(ctx, "dmsetup", "message", name, "0", "cleaner"); err != nil {
				return err
			}
			return pollUntil(ctx, 30*time.Minute, 100*time.Millisecond, func() (bool, error) {
				s, err := status(ctx)
				return err == nil && s.Used() == 0 && s.Writeback == 0, err
			})
		},
		Close: func() error { return dmRemove(name) },
	}, nil
}

// bcacheBucket is the bucket size for a bcache cache of size bytes: 64
// KiB, halved (down to 4 KiB) until the cache holds at least 1024 buckets.
// The kernel refuses a cache of 512 buckets or fewer with EPERM
// (cache_alloc: "ca->sb.nbuckets is too small": its free list is
// roundup_pow_of_two(nbuckets) >> 10 long and must not be empty), and
// make-bcache does not check.
func bcacheBucket(size int64) int64 {
	b := int64(64 << 10)
	for b > 4<<10 && size/b < 1024 {
		b /= 2
	}
	return b
}

// bcacheDevFor finds the bcache device whose backing device is hdd.
func bcacheDevFor(hdd string) (string, error) {
	matches, _ := filepath.Glob("/sys/block/bcache*/slaves/" + filepath.Base(hdd))
	if len(matches) == 0 {
		return "", errors.New("no bcache device over " + hdd)
	}
	return strings.Split(matches[0], "/")[3], nil
}

func setupBcache(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
	if o.Format {
		for _, dev := range []string{d.Cache, d.HDD} {
			if err := zeroStart(ctx, dev); err != nil {
				return nil, err
			}
		}
		size, err := devSize(d.Cache)
		if err != nil {
			return nil, err
		}
		bucket := bcacheBucket(size)
		if _, err := sh(ctx, "make-bcache", "--writeback", "-b", strconv.FormatInt(bucket>>10, 10)+"k", "-w", "4k", "-C", d.Cache, "-B", d.HDD); err != nil {
			return nil, err
		}
	}
	for _, dev := range []string{d.Cache, d.HDD} {
		// register_quiet succeeds on a device already registered (a
		// udev rule's bcache-register may have been first) and fails on
		// anything else: a cache of too few buckets is EPERM, with
		// the reason only in the kernel log.
		if err := writeSysfs("/sys/fs/bcache/register_quiet", dev); err != nil {
			return nil, fmt.Errorf("bcache register (the kernel log says why): %w", err)
		}
	}
	var bdev string
	if err := pollUntil(ctx, 2*time.Minute, 20*time.Millisecond, func() (bool, error) {
		var err error
		bdev, err = bcacheDevFor(d.HDD)
		if err != nil {
			return false, nil
		}
		// Attached to its cache set once cache_mode's file is live and
		// the set's link exists.
		_, err = os.Stat("/sys/block/" + bdev + "/bcache/cache")
		return err == nil, nil
	}); err != nil {
		return nil, fmt.Errorf("bcache device over %s: %w", d.HDD, err)
	}
	sys := "/sys/block/" + bdev + "/bcache/"
	set, err := filepath.EvalSymlinks(sys + "cache")
	if err != nil {
		return nil, fmt.Errorf("bcache cache set: %w", err)
	}
	settings := [][2]string{
		{sys + "cache_mode", "writeback"},
		{sys + "sequential_cutoff", "0"},
		{set + "/congested_read_threshold_us", "0"},
		{set + "/congested_write_threshold_us", "0"},
	}
	if o.NoWriteback {
		settings = append(settings, [2]string{sys + "writeback_running", "0"})
	}
	for _, s := range settings {
		if err := writeSysfs(s[0], s[1]); err != nil {
			return nil, err
		}
	}
	dirty := func(ctx context.Context) (int64, error) {
		s, err := readSysfs(sys + "dirty_data")
		if err != nil {
			return 0, err
		}
		return parseBcacheSize(s)
	}
	return &vmDev{
		Path:  "/dev/" + bdev,
		Dirty: dirty,
		Drain: func(ctx context.Context) error {
			if err := writeSysfs(sys+"writeback_running", "1"); err != nil {
				return err
			}
			if err := writeSysfs(sys+"writeback_percent", "0"); err != nil {
				return err
			}
			return pollUntil(ctx, 30*time.Minute, 100*time.Millisecond, func() (bool, error) {
				st, err := readSysfs(sys + "state")
				if err != nil {
					return false, err
				}
				n, err := dirty(ctx)
				return st == "clean" && n == 0, err
			})
		},
		Close: func() error {
			_ = writeSysfs(sys+"stop", "1")
			_ = writeSysfs(set+"/stop", "1")
			return pollUntil(context.Background(), time.Minute, 50*time.Millisecond, func() (bool, error) {
				_, err1 := os.Stat("/sys/block/" + bdev)
				_, err2 := os.Stat(set)
				return os.IsNotExist(err1) && os.IsNotExist(err2), nil
			})
		},
	}, nil
}

// attachNBD attaches the export on sock through `writeboost attach`.
func attachNBD(ctx context.Context, v *vmEnv, sock, volume, method string) (string, func() error, error) {
	args := []string{"attach", "--socket", sock, "--volume-id", volume, "--state-dir", v.attachDir}
	if method != "" {
		args = append(args, "--method", method)
	}
	dev, err := sh(ctx, v.writeboost, args...)
	if err != nil {
		return "", nil, err
	}
	dev = lastLine(dev)
	return dev, func() error {
		_, err := sh(context.Background(), v.writeboost, "detach", "--state-dir", v.attachDir, dev)
		return err
	}, nil
}

// startVMProc starts a server in the background and waits for its socket;
// it returns the process id and a stop function.
func startVMProc(ctx context.Context, dir, sock string, name string, args ...string) (int, func(), error) {
	logf, err := os.Create(filepath.Join(dir, filepath.Base(sock)+".log"))
	if err != nil {
		return 0, nil, err
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return 0, nil, fmt.Errorf("start %s: %w", name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	stop := func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(2 * time.Minute):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		logf.Close()
	}
	if err := waitSocket(ctx, sock, cmd, exited, &waitErr); err != nil {
		stop()
		b, _ := os.ReadFile(logf.Name())
		return 0, nil, fmt.Errorf("%w: %s", err, lastLine(string(b)))
	}
	return cmd.Process.Pid, stop, nil
}

func setupWriteboost(method string) func(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
	return func(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
		name := v.name("wbs")
		dir := filepath.Join(v.work, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		sock, ctl := filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "control.sock")
		// The RAM buffers' file is named after the cache device, so a
		// server started again after a power cut replays it (none
		// survives a real one: /dev/shm is RAM).
		buf := "/dev/shm/benchvm-" + filepath.Base(d.Cache) + ".buf"
		args := []string{"serve", "--data-dir", dir, "--backing", d.HDD, "--cache", d.Cache, "--direct",
			"--socket", sock, "--control", ctl, "--buffer-file", buf}
		if o.Format {
			os.Remove(buf)
			args = append(args, "--reformat")
		}
		if o.NoWriteback {
			args = append(args, "--writeback-threshold", "0")
		}
		pid, stop, err := startVMProc(ctx, dir, sock, v.writeboost, args...)
		if err != nil {
			return nil, err
		}
		dev, detach, err := attachNBD(ctx, v, sock, name, method)
		if err != nil {
			stop()
			return nil, err
		}
		return &vmDev{
			Path: dev, PID: pid,
			Dirty: func(ctx context.Context) (int64, error) {
				s, err := engineSnapshot(ctx, v.writeboost, ctl)
				if err != nil {
					return 0, err
				}
				return int64(s.NrDirtyCacheBlocks) * 4096, nil
			},
			Drain: func(ctx context.Context) error {
				_, err := sh(ctx, v.writeboost, "drain", "--control", ctl)
				return err
			},
			Engine: func(ctx context.Context) (*EngineSnapshot, error) {
				return engineSnapshot(ctx, v.writeboost, ctl)
			},
			Close: func() error {
				err := detach()
				stop()
				os.Remove(buf)
				return err
			},
		}, nil
	}
}

func setupRawCache(_ context.Context, _ *vmEnv, d vmDevices, _ setupOpts) (*vmDev, error) {
	return &vmDev{Path: d.Cache, Close: func() error { return nil }}, nil
}

func setupRawHDD(_ context.Context, _ *vmEnv, d vmDevices, _ setupOpts) (*vmDev, error) {
	return &vmDev{Path: d.HDD, Close: func() error { return nil }}, nil
}

func setupNBDRef(kind string) func(ctx context.Context, v *vmEnv, d vmDevices, o setupOpts) (*vmDev, error) {
	return func(ctx context.Context, v *vmEnv, d vmDevices, _ setupOpts) (*vmDev, error) {
		size, err := devSize(d.HDD)
		if err != nil {
			return nil, err
		}
		name := v.name(kind)
		dir := filepath.Join(v.work, name)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, err
		}
		sock := filepath.Join(dir, "nbd.sock")
		var pid int
		var stop func()
		if kind == "nbdkit" {
			pid, stop, err = startVMProc(ctx, dir, sock, "nbdkit", "-f", "-U", sock, "memory", "size="+strconv.FormatInt(size, 10))
		} else {
			pid, stop, err = startVMProc(ctx, dir, sock, v.self, "nbd-serve", "--kind", "mem", "--size", strconv.FormatInt(size, 10), "--socket", sock)
		}
		if err != nil {
			return nil, err
		}
		dev, detach, err := attachNBD(ctx, v, sock, name, "")
		if err != nil {
			stop()
			return nil, err
		}
		return &vmDev{Path: dev, PID: pid, Close: func() error { err := detach(); stop(); return err }}, nil
	}
}
