// Package csi tests the CSI plugin end to end: csi-sanity and a
// kubelet-order lifecycle against the real plugin process, with real pools
// in temporary directories, real engines, the real NBD server and the
// fallback attach path (nbdfuse + loop), and real mounts. It needs root and
// the tools; elsewhere the tests skip (and fail in CI, see testenv).
package csi

import (
	"context"
	"encoding/json"
	goflag "flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/driver"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

const childEnv = "WRITEBOOST_CSI_TEST_CHILD"

// TestMain lets this test binary be the plugin: with childEnv set it runs
// the `csi` command exactly as cmd/writeboost does (pkg/driver.NewCommand),
// including the nbd-relay that nbdfuse starts. WRITEBOOST_BIN names a built
// writeboost binary to test instead.
func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		root := &cobra.Command{Use: "writeboost", SilenceUsage: true}
		fs := goflag.NewFlagSet("klog", goflag.ContinueOnError)
		klog.InitFlags(fs)
		root.PersistentFlags().AddGoFlagSet(fs)
		root.AddCommand(driver.NewCommand("test"))
		root.SetArgs(os.Args[1:])
		if err := root.Execute(); err != nil {
			fmt.Fprintln(os.Stderr, "writeboost:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func pluginCommand(args ...string) *exec.Cmd {
	if bin := os.Getenv("WRITEBOOST_BIN"); bin != "" {
		return exec.Command(bin, args...)
	}
	c := exec.Command(os.Args[0], args...)
	c.Env = append(os.Environ(), childEnv+"=1")
	return c
}

func requireEnv(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "mkfs.xfs", "resize2fs", "blkid")
}

// env is one node: pools, state and run dirs, and a plugin process.
type env struct {
	t                                   *testing.T
	base, hdd, nvme, state, run, socket string
	extra                               []string
	kernel                              bool // every attach must be kernel-netlink (kernel_test.go)
	lvm                                 bool // the pools are volume groups, not hdd and nvme (lvm_test.go)
	cmd                                 *exec.Cmd
	logf                                *os.File
	conn                                *grpc.ClientConn
}

func newEnv(t *testing.T, extra ...string) *env { return newNode(t, false, extra...) }

// newNode is newEnv; kernel: the node's kernel has nbd (the real-kernel
// tier) and every attach must take the kernel-netlink path.
func newNode(t *testing.T, kernel bool, extra ...string) *env {
	requireEnv(t)
	if kernel {
		requireKernelNBD(t)
	}
	base, err := os.MkdirTemp("", "wbcsi-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, base: base, hdd: filepath.Join(base, "hdd"), nvme: filepath.Join(base, "nvme"),
		state: filepath.Join(base, "state"), run: filepath.Join(base, "run"), socket: filepath.Join(base, "csi.sock"), extra: extra, kernel: kernel}
	t.Cleanup(e.cleanup)
	// Pools on filesystems of their own, so capacity is exact and can run out.
	e.mkfs(e.hdd, 768<<20)
	e.mkfs(e.nvme, 256<<20)
	e.start()
	return e
}

func (e *env) mkfs(dir string, size int64) {
	e.t.Helper()
	img := dir + ".img"
	f, err := os.Create(img)
	if err != nil {
		e.t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		e.t.Fatalf("mkfs %s: %v %s", img, err, out)
	}
	os.MkdirAll(dir, 0o700)
	if out, err := exec.Command("mount", "-o", "loop", img, dir).CombinedOutput(); err != nil {
		e.t.Fatalf("mount %s: %v %s", img, err, out)
	}
}

// start runs the plugin and waits until it listens and its Probe reports
// ready (a restarted plugin re-adopts its staged volumes in the
// background, not ready until they are back).
func (e *env) start() {
	e.t.Helper()
	e.launch()
	e.waitReady(2 * time.Minute)
}

// waitReady polls Probe until it reports ready and returns how long that
// took.
func (e *env) waitReady(limit time.Duration) time.Duration {
	e.t.Helper()
	begin := time.Now()
	for {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		r, err := csi.NewIdentityClient(e.conn).Probe(c, &csi.ProbeRequest{})
		cancel()
		if err == nil && r.GetReady().GetValue() {
			return time.Since(begin)
		}
		if time.Since(begin) > limit {
			e.t.Fatalf("plugin not ready after %s (last probe: %v %v); log:\n%s", limit, r, err, e.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// launch runs the plugin and waits until it listens.
func (e *env) launch() {
	e.t.Helper()
	args := []string{"csi", "--endpoint", "unix://" + e.socket, "--node-id", "node-1",
		"--state-dir", e.state, "--run-dir", e.run, "-v=2"}
	if !e.lvm { // LVM pools come from the config file in extra (lvm_test.go)
		args = append(args, "--hdd-pool", e.hdd, "--nvme-pool", e.nvme)
	}
	args = append(args, e.extra...)
	e.cmd = pluginCommand(args...)
	var err error
	if e.logf == nil {
		if e.logf, err = os.Create(filepath.Join(e.base, "plugin.log")); err != nil {
			e.t.Fatal(err)
		}
	}
	e.cmd.Stdout, e.cmd.Stderr = e.logf, e.logf
	if err := e.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	// Notice an early exit without reaping (kill/stop call Wait).
	exited, watched := make(chan struct{}), make(chan struct{})
	defer close(watched)
	go func(pid int) {
		for {
			var si unix.Siginfo
			if err := unix.Waitid(unix.P_PID, pid, &si, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil); err == nil && si.Signo != 0 {
				close(exited)
				return
			}
			select {
			case <-watched:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}(e.cmd.Process.Pid)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(e.socket); err == nil {
			break
		}
		select {
		case <-exited:
			e.t.Fatalf("plugin exited; log:\n%s", e.log())
		default:
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("plugin did not listen; log:\n%s", e.log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.conn, err = grpc.NewClient("unix://"+e.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) log() string {
	b, _ := os.ReadFile(filepath.Join(e.base, "plugin.log"))
	if len(b) > 20000 {
		b = b[len(b)-20000:]
	}
	return string(b)
}

// kill SIGKILLs the plugin (the devices and mounts stay).
func (e *env) kill() {
	if e.conn != nil {
		e.conn.Close()
	}
	e.cmd.Process.Kill()
	e.cmd.Wait()
	os.Remove(e.socket) // a killed process leaves its socket behind
}

// stop sends SIGTERM and waits for a graceful exit.
func (e *env) stop() error {
	if e.conn != nil {
		e.conn.Close()
	}
	e.cmd.Process.Signal(syscall.SIGTERM)
	return e.cmd.Wait()
}

func (e *env) cleanup() {
	if e.kernel {
		e.checkKernelLog()
	}
	if e.cmd != nil && e.cmd.ProcessState == nil {
		if err := e.stop(); err != nil {
			e.t.Errorf("plugin exit: %v", err)
		}
	}
	// Whatever a failed test left: mounts under base, then attachments.
	if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
		lines := strings.Split(string(b), "\n")
		for i := len(lines) - 1; i >= 0; i-- {
			f := strings.Fields(lines[i])
			if len(f) > 1 && strings.HasPrefix(f[1], e.base) && !strings.Contains(f[1], "/attach/fuse/") &&
				f[1] != e.hdd && f[1] != e.nvme {
				exec.Command("umount", "-l", f[1]).Run()
			}
		}
	}
	recs, _ := filepath.Glob(filepath.Join(e.state, "attach", "*.json"))
	for _, r := range recs {
		var a struct {
			Device string `json:"device"`
		}
		if b, err := os.ReadFile(r); err == nil && json.Unmarshal(b, &a) == nil && a.Device != "" {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if err := attach.Detach(ctx, filepath.Join(e.state, "attach"), a.Device); err != nil {
				e.t.Logf("cleanup detach %s: %v", a.Device, err)
			}
			cancel()
		}
	}
	for _, p := range []string{e.hdd, e.nvme} {
		if e.lvm {
			break
		}
		if out, err := exec.Command("umount", p).CombinedOutput(); err != nil {
			e.t.Logf("umount pool %s: %v %s", p, err, out)
			exec.Command("umount", "-l", p).Run()
		}
	}
	if e.t.Failed() {
		e.t.Logf("plugin log (tail):\n%s", e.log())
	}
	if e.logf != nil {
		e.logf.Close()
	}
	os.RemoveAll(e.base)
}

func (e *env) ctrl() csi.ControllerClient { return csi.NewControllerClient(e.conn) }
func (e *env) node() csi.NodeClient       { return csi.NewNodeClient(e.conn) }

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return c
}
