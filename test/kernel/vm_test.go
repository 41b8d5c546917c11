// Package kernel holds the host-driven real-kernel tests (issue 12): each
// test boots its own VMs with hack/vm/run.sh, on virtio disks that are host
// files, and kills QEMU (a power cut) or lets the guest end (a reboot)
// between boots. Inside the guest the same test binary runs again in a
// guest role (TestMain, guestEnv) and reports on its output lines; the
// host decides when to cut and what must have survived.
//
// make vm-test (hack/vm/test.sh) runs these on the host after the shared
// boot of the in-VM TestKernel* tests, in strict mode. Elsewhere (a plain
// go test ./...) they skip: booting VMs is the VM tier's job.
package kernel

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// guestEnv names the guest role this binary plays inside the VM.
const guestEnv = "WB_KERNEL_GUEST"

func TestMain(m *testing.M) {
	if role := os.Getenv(guestEnv); role != "" {
		os.Exit(guestMain(role))
	}
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// guestStart is when the guest role began; phase reports progress
// against it (the host logs it: where a boot's time goes under TCG).
var guestStart = time.Now()

func phase(name string) { fmt.Printf("PHASE %s %.1fs\n", name, time.Since(guestStart).Seconds()) }

// phases is the guest's PHASE lines of one boot, for the host's log.
func (b *boot) phases() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var p []string
	for _, l := range b.out {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "PHASE" {
			p = append(p, f[1]+"@"+f[2])
		}
	}
	return strings.Join(p, " ")
}

func guestMain(role string) int {
	var err error
	switch role {
	case "reboot":
		err = guestReboot()
	case "powercut":
		err = guestPowerCut()
	default:
		err = fmt.Errorf("unknown guest role %q", role)
	}
	if err != nil {
		fmt.Printf("GUEST-FAIL: %v\n", err)
		return 1
	}
	return 0
}

// requireVMTier: these tests boot VMs; only the VM tier runs them.
func requireVMTier(t *testing.T) {
	t.Helper()
	if !testenv.KernelTier() {
		t.Skip("skipping: boots its own VMs (make vm-test runs it, WRITEBOOST_KERNEL_TIER=1)")
	}
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "qemu-system-x86_64", "busybox", "go", "mkfs.ext4", "fsck.ext4", "fstrim")
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// workDir is a directory the guest sees at the same path: not under /tmp
// (the guest's /tmp is its own), so under the cache directory of hack/vm.
func workDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp(workRoot(t), strings.ReplaceAll(t.Name(), "/", "_")+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			os.RemoveAll(dir)
		} else {
			t.Logf("kept %s (disks, console logs)", dir)
		}
	})
	return dir
}

func workRoot(t *testing.T) string {
	t.Helper()
	cache := os.Getenv("WRITEBOOST_CACHE_DIR")
	if cache == "" {
		base := os.Getenv("XDG_CACHE_HOME")
		if base == "" {
			base = filepath.Join(os.Getenv("HOME"), ".cache")
		}
		cache = filepath.Join(base, "writeboost-csi")
	}
	root := filepath.Join(cache, "vm-host-tests")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// binaries builds cmd/writeboost and copies this test binary (the guest
// role) to a directory the guest sees; once per run.
func binaries(t *testing.T) (writeboost, self string) {
	t.Helper()
	buildOnce.Do(func() {
		buildDir = filepath.Join(workRoot(t), fmt.Sprintf("bin-%d", os.Getpid()))
		if buildErr = os.MkdirAll(buildDir, 0o755); buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, "writeboost"), "-ldflags", "-X main.version=vm-test", "./cmd/writeboost")
		cmd.Dir = repoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/writeboost: %v\n%s", err, out)
			return
		}
		exe, err := os.Executable()
		if err != nil {
			buildErr = err
			return
		}
		buildErr = copyFile(exe, filepath.Join(buildDir, "kernel.test"), 0o755)
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, "writeboost"), filepath.Join(buildDir, "kernel.test")
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// sparseFile makes a sparse host file of size bytes: a virtio disk.
func sparseFile(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path
}

// boot is one run of hack/vm/run.sh: the guest's output lines arrive on
// lines; wait returns run.sh's exit code.
type boot struct {
	t       *testing.T
	cmd     *exec.Cmd
	pidfile string
	console string
	lines   chan string
	mu      sync.Mutex
	out     []string
	stderr  testenv.SyncBuffer // run.sh's and QEMU's own messages
	done    chan struct{}
	rc      int
}

// startBoot boots the VM with disks and runs this binary in guest role
// with env (KEY=VALUE), its working directory dir.
func startBoot(t *testing.T, dir, name string, disks []string, env ...string) *boot {
	t.Helper()
	_, self := binaries(t)
	b := &boot{t: t, pidfile: filepath.Join(dir, name+".pid"), console: filepath.Join(dir, name+"-console.log"),
		lines: make(chan string, 4096), done: make(chan struct{})}
	args := []string{filepath.Join(repoRoot(), "hack/vm/run.sh"), "--mem", "1024", "--cpus", strconv.Itoa(runtime.NumCPU()),
		"--console", b.console, "--pidfile", b.pidfile, "--timeout", "900"}
	for _, d := range disks {
		args = append(args, "--disk", d)
	}
	args = append(args, "--", "/usr/bin/env")
	args = append(args, env...)
	args = append(args, self)
	b.cmd = exec.Command("bash", args...)
	b.cmd.Dir = dir
	stdout, err := b.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// run.sh's and QEMU's own messages apart from the guest's lines: a
	// warning written between two chunks of a guest line would mangle it.
	b.cmd.Stderr = &b.stderr
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A failed test leaves no VM running.
		select {
		case <-b.done:
		default:
			if pb, err := os.ReadFile(b.pidfile); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(pb))); err == nil && pid > 0 {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			<-b.done
		}
	})
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			l := strings.TrimRight(sc.Text(), "\r")
			b.mu.Lock()
			b.out = append(b.out, l)
			b.mu.Unlock()
			select {
			case b.lines <- l:
			default: // nobody listens any more
			}
		}
		err := b.cmd.Wait()
		b.rc = 0
		if ee, ok := err.(*exec.ExitError); ok {
			b.rc = ee.ExitCode()
		} else if err != nil {
			b.rc = -1
		}
		close(b.lines)
		close(b.done)
	}()
	return b
}

// output is everything the guest printed so far.
func (b *boot) output() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.out, "\n")
}

// cut is the power cut: SIGKILL to QEMU, nothing flushed on the way.
func (b *boot) cut() {
	b.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		pb, err := os.ReadFile(b.pidfile)
		if pid, perr := strconv.Atoi(strings.TrimSpace(string(pb))); err == nil && perr == nil && pid > 0 {
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				b.t.Fatalf("kill QEMU %d: %v", pid, err)
			}
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("no QEMU pid in %s", b.pidfile)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// wait waits for run.sh to return and gives its exit code (125: the VM
// ended without one, as after a power cut).
func (b *boot) wait() int {
	b.t.Helper()
	select {
	case <-b.done:
	case <-time.After(16 * time.Minute):
		b.t.Fatalf("run.sh did not return")
	}
	return b.rc
}

// fail reports a failed boot: the console's tail, the guest's last lines,
// run.sh's own messages, and the reason last (CI shows a log's end).
func (b *boot) fail(format string, args ...any) {
	b.t.Helper()
	cons, _ := os.ReadFile(b.console)
	if len(cons) > 6000 {
		cons = cons[len(cons)-6000:]
	}
	b.mu.Lock()
	out := b.out
	if len(out) > 150 {
		out = out[len(out)-150:]
	}
	guest := strings.Join(out, "\n")
	b.mu.Unlock()
	why := fmt.Sprintf(format, args...)
	b.t.Fatalf("%s\n--- console (tail):\n%s\n--- guest output (last %d lines):\n%s\n--- run.sh and QEMU:\n%s\n--- so: %s",
		why, cons, len(out), guest, b.stderr.String(), why)
}

// guestFailure is the guest's GUEST-FAIL line, if it printed one.
func (b *boot) guestFailure() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.out {
		if strings.HasPrefix(l, "GUEST-FAIL") {
			return l
		}
	}
	return ""
}
