package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	gonbdbackend "github.com/pojntfx/go-nbd/pkg/backend"
	gonbd "github.com/pojntfx/go-nbd/pkg/server"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/hddsim"
	"github.com/writeboost-csi/writeboost-csi/pkg/nbd"
)

// System is one NBD server configuration under test.
type System struct {
	ID    string // "a".."h"
	Name  string
	About string
	// control is the control socket of a writeboost system, relative to
	// its directory ("" for the others).
	control string
	// start brings the system up under dir and returns its NBD URI and a
	// stop function.
	start func(ctx context.Context, env *benchEnv, dir string) (uri string, stop func(), err error)
}

// benchEnv is what every system's setup shares.
type benchEnv struct {
	writeboostBin string
	exportSize    int64 // size of every export, = the fio working set
	cacheSize     int64 // writeboost's cache image for (d)
}

func unixURI(sock string) string { return "nbd+unix:///?socket=" + sock }

var systems = []System{
	{ID: "a", Name: "nbdkit memory", About: "nbdkit's memory plugin: the transport ceiling", start: startNbdkitMemory},
	{ID: "b", Name: "writeboost NBD, RAM", About: "writeboost's NBD server (pkg/nbd) over a RAM backend", start: startOurRAM},
	{ID: "c", Name: "simulated HDD, raw", About: "the simulated HDD (real-sleep clock) served raw by pkg/nbd: no cache", start: startRawHDD},
	{ID: "d", Name: "writeboost", About: "`writeboost serve --simulate-hdd --direct`: cache image on local disk opened with O_DIRECT, as the CSI plugin opens its cache, simulated HDD backing", start: startWriteboost(true), control: "d/control.sock"},
	{ID: "e", Name: "nbdkit cache filter", About: "nbdkit `--filter=cache cache=writeback` over the `nbd` plugin connected to a simulated HDD like (c)", start: startNbdkitCache},
	{ID: "f", Name: "nbdkit file", About: "nbdkit's file plugin on an image on the local disk: the raw cache device", start: startNbdkitFile},
	{ID: "g", Name: "go-nbd v0.3.2, RAM", About: "go-nbd v0.3.2's (serial) server over its RAM backend", start: startGoNBD},
	{ID: "h", Name: "writeboost, page cache", About: "(d) with the cache image in the page cache (`serve --direct=false`)", start: startWriteboost(false), control: "h/control.sock"},
}

// waitSocket waits until something accepts connections on sock.
func waitSocket(ctx context.Context, sock string, proc *exec.Cmd, exited <-chan struct{}, waitErr *error) error {
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited before listening: %v", proc.Path, *waitErr)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s: no listener on %s after 60 s", proc.Path, sock)
}

// startProc starts a server process in its own process group, waits for its
// socket, and returns a stop function sending SIGTERM (SIGKILL after 60 s).
func startProc(ctx context.Context, dir, sock string, env []string, name string, args ...string) (func(), error) {
	logf, err := os.Create(filepath.Join(dir, filepath.Base(name)+".log"))
	if err != nil {
		return nil, fmt.Errorf("create log: %w", err)
	}
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	stop := func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(60 * time.Second):
			klog.InfoS("server did not stop on SIGTERM; killing", "cmd", name)
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		logf.Close()
	}
	if err := waitSocket(ctx, sock, cmd, exited, &waitErr); err != nil {
		stop()
		return nil, fmt.Errorf("%w (log: %s)", err, logf.Name())
	}
	return stop, nil
}

func startNbdkitMemory(ctx context.Context, env *benchEnv, dir string) (string, func(), error) {
	sock := filepath.Join(dir, "a.sock")
	stop, err := startProc(ctx, dir, sock, nil, "nbdkit", "-f", "-U", sock, "memory", "size="+strconv.FormatInt(env.exportSize, 10))
	return unixURI(sock), stop, err
}

func startNbdkitFile(ctx context.Context, env *benchEnv, dir string) (string, func(), error) {
	img := filepath.Join(dir, "f.img")
	if err := blockdev.CreateSparseFile(img, env.exportSize); err != nil {
		return "", nil, fmt.Errorf("create %s: %w", img, err)
	}
	sock := filepath.Join(dir, "f.sock")
	stop, err := startProc(ctx, dir, sock, nil, "nbdkit", "-f", "-U", sock, "file", "file="+img)
	return unixURI(sock), stop, err
}

// serveInProcess serves b with pkg/nbd on a unix socket.
func serveInProcess(sock string, b nbd.Backend, cfg nbd.Config) (func(), error) {
	srv := nbd.NewServer(cfg)
	if err := srv.AddExport(nbd.Export{Name: "", Backend: b}); err != nil {
		return nil, fmt.Errorf("add export: %w", err)
	}
	l, err := nbd.ListenUnix(sock, 0o600)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", sock, err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			klog.ErrorS(err, "in-process NBD server", "socket", sock)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-done
	}, nil
}

func startOurRAM(_ context.Context, env *benchEnv, dir string) (string, func(), error) {
	sock := filepath.Join(dir, "b.sock")
	stop, err := serveInProcess(sock, nbd.NewMemBackend(env.exportSize), nbd.Config{})
	return unixURI(sock), stop, err
}

func newRealHDD(dir, name string, size int64) (*hddsim.Disk, error) {
	img := filepath.Join(dir, name)
	if err := blockdev.CreateSparseFile(img, size); err != nil {
		return nil, fmt.Errorf("create %s: %w", img, err)
	}
	f, err := blockdev.OpenFile(img, blockdev.FileOptions{})
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", img, err)
	}
	return hddsim.New(f, hddsim.DefaultModel(), hddsim.RealSleep), nil
}

func startRawHDD(_ context.Context, env *benchEnv, dir string) (string, func(), error) {
	disk, err := newRealHDD(dir, "c-hdd.img", env.exportSize)
	if err != nil {
		return "", nil, err
	}
	sock := filepath.Join(dir, "c.sock")
	stop, err := serveInProcess(sock, disk, nbd.Config{NoInline: true})
	if err != nil {
		disk.Close()
		return "", nil, err
	}
	return unixURI(sock), func() { stop(); disk.Close() }, nil
}

func startNbdkitCache(ctx context.Context, env *benchEnv, dir string) (string, func(), error) {
	disk, err := newRealHDD(dir, "e-hdd.img", env.exportSize)
	if err != nil {
		return "", nil, err
	}
	hddSock := filepath.Join(dir, "e-hdd.sock")
	stopHDD, err := serveInProcess(hddSock, disk, nbd.Config{NoInline: true})
	if err != nil {
		disk.Close()
		return "", nil, err
	}
	cacheDir := filepath.Join(dir, "e-cachedir")
	if err := os.MkdirAll(cacheDir, 0o700); err != nil {
		stopHDD()
		disk.Close()
		return "", nil, fmt.Errorf("mkdir: %w", err)
	}
	sock := filepath.Join(dir, "e.sock")
	stop, err := startProc(ctx, dir, sock, []string{"TMPDIR=" + cacheDir}, "nbdkit", "-f", "-U", sock,
		"--filter=cache", "nbd", "socket="+hddSock, "cache=writeback")
	if err != nil {
		stopHDD()
		disk.Close()
		return "", nil, err
	}
	return unixURI(sock), func() { stop(); stopHDD(); disk.Close() }, nil
}

// startWriteboost runs `writeboost serve --simulate-hdd`, with the cache
// image opened with O_DIRECT when direct (the CSI plugin always opens its
// devices so: a node's page cache should not hold a second copy of every
// cached block, charged to the plugin pod's memory).
func startWriteboost(direct bool) func(ctx context.Context, env *benchEnv, dir string) (string, func(), error) {
	return func(ctx context.Context, env *benchEnv, dir string) (string, func(), error) {
		name := "d"
		extra := []string{"--direct"}
		if !direct {
			// serve opens both devices with O_DIRECT by default now.
			name, extra = "h", []string{"--direct=false"}
		}
		return runWriteboost(ctx, env, filepath.Join(dir, name), extra)
	}
}

func runWriteboost(ctx context.Context, env *benchEnv, d string, extra []string) (string, func(), error) {
	if err := os.MkdirAll(d, 0o700); err != nil {
		return "", nil, fmt.Errorf("mkdir: %w", err)
	}
	sock := filepath.Join(d, "nbd.sock")
	buf := fmt.Sprintf("/dev/shm/writeboost-bench-%d.buf", os.Getpid())
	args := append([]string{"serve",
		"--data-dir", d,
		"--backing", filepath.Join(d, "backing.img"), "--backing-size", strconv.FormatInt(env.exportSize, 10),
		"--cache", filepath.Join(d, "cache.img"), "--cache-size", strconv.FormatInt(env.cacheSize, 10),
		"--socket", sock, "--buffer-file", buf, "--simulate-hdd"}, extra...)
	stop, err := startProc(ctx, d, sock, nil, env.writeboostBin, args...)
	if err != nil {
		os.Remove(buf)
		return "", nil, err
	}
	return unixURI(sock), func() { stop(); os.Remove(buf) }, nil
}

// startGoNBD serves go-nbd's handler on a unix socket, one goroutine per
// connection (the handler itself serves one request at a time).
func startGoNBD(_ context.Context, env *benchEnv, dir string) (string, func(), error) {
	sock := filepath.Join(dir, "g.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		return "", nil, fmt.Errorf("listen %s: %w", sock, err)
	}
	be := gonbdbackend.NewMemoryBackend(make([]byte, env.exportSize))
	exports := []*gonbd.Export{{Name: "", Backend: be}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = gonbd.Handle(c, exports, &gonbd.Options{SupportsMultiConn: true})
			}()
		}
	}()
	return unixURI(sock), func() { l.Close(); <-done }, nil
}
