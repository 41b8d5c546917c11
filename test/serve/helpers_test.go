// Package serve holds end-to-end tests of the built writeboost binary:
// `writeboost serve` with real NBD clients (nbdinfo, qemu-io, nbdfuse),
// a real filesystem on a loop device, kills and restarts, and the control
// commands through the control socket.
package serve

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
	buildDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// binary builds cmd/writeboost once per test run (with -race when the
// tests run with it, so races in serve end to end are caught too).
func binary(t *testing.T) string {
	t.Helper()
	testenv.RequireTools(t, "go")
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "writeboost-e2e-")
		if buildErr != nil {
			return
		}
		binPath = filepath.Join(buildDir, "writeboost")
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		args := []string{"build", "-o", binPath, "-ldflags", "-X main.version=e2e-test"}
		if raceEnabled {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, "./cmd/writeboost")...)
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/writeboost: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// server is one running `writeboost serve`.
type server struct {
	t       *testing.T
	cmd     *exec.Cmd
	out     *testenv.SyncBuffer
	dataDir string
	socket  string
	control string
	uri     string
	done    chan struct{}
	waitErr error
}

// startServe runs `writeboost serve args...` in dir and waits until it
// prints its NBD URI (it has opened the cache and listens by then).
func startServe(t *testing.T, dir string, args ...string) *server {
	t.Helper()
	bin := binary(t)
	s := &server{t: t, out: &testenv.SyncBuffer{}, done: make(chan struct{}),
		dataDir: filepath.Join(dir, "writeboost-data")}
	s.socket = filepath.Join(s.dataDir, "nbd.sock")
	s.control = filepath.Join(s.dataDir, "control.sock")
	s.uri = "nbd+unix:///?socket=" + s.socket
	s.cmd = exec.Command(bin, append([]string{"serve", "-v=2"}, args...)...)
	s.cmd.Dir = dir
	s.cmd.Stdout = s.out
	s.cmd.Stderr = s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("start serve: %v", err)
	}
	go func() {
		s.waitErr = s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Kill()
			<-s.done
		}
		if t.Failed() {
			t.Logf("serve output:\n%s", s.out.String())
		}
	})
	deadline := time.After(2 * time.Minute)
	for !strings.Contains(s.out.String(), "NBD URI: ") {
		select {
		case <-s.done:
			t.Fatalf("serve exited before serving (%v):\n%s", s.waitErr, s.out.String())
		case <-deadline:
			t.Fatalf("serve did not print its NBD URI within 2 minutes:\n%s", s.out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if want := "NBD URI: " + s.uri + "\n"; !strings.Contains(s.out.String(), want) {
		t.Fatalf("serve printed no %q:\n%s", want, s.out.String())
	}
	return s
}

// stop sends sig and waits for the process; it returns its exit code.
func (s *server) stop(sig syscall.Signal) int {
	s.t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("signal serve: %v", err)
	}
	select {
	case <-s.done:
	case <-time.After(3 * time.Minute):
		s.t.Fatalf("serve did not exit within 3 minutes of %v:\n%s", sig, s.out.String())
	}
	if s.cmd.ProcessState == nil {
		s.t.Fatalf("serve: %v", s.waitErr)
	}
	return s.cmd.ProcessState.ExitCode()
}

// run runs a command with a timeout and returns its combined output; it
// fails the test on a non-zero exit unless allowFail.
func run(t *testing.T, timeout time.Duration, allowFail bool, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// nbdsh and friends must find the system python, not a user's.
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	if err != nil && !allowFail {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), err
}

// wb runs the built binary.
func wb(t *testing.T, allowFail bool, args ...string) (string, error) {
	t.Helper()
	return run(t, 3*time.Minute, allowFail, binary(t), args...)
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// runIn runs a command in dir, expecting it to exit by itself.
func runIn(t *testing.T, dir string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	return string(out), err
}
