package attach

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// nbdkitServer runs nbdkit in the foreground on a unix socket, so tests can
// kill and restart it like a crashing server.
type nbdkitServer struct {
	t      *testing.T
	socket string
	args   []string
	cmd    *exec.Cmd
}

func startNbdkit(t *testing.T, socket string, args ...string) *nbdkitServer {
	t.Helper()
	testenv.RequireTools(t, "nbdkit")
	s := &nbdkitServer{t: t, socket: socket, args: args}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *nbdkitServer) start() {
	s.t.Helper()
	_ = os.Remove(s.socket) // left behind by a killed server
	args := append([]string{"-f", "-U", s.socket}, s.args...)
	s.cmd = exec.Command("nbdkit", args...)
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("start nbdkit: %v", err)
	}
	// Wait for a connection, not for the socket file: nbdkit binds (the
	// file appears) before it listens, and a dial in between is refused.
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", s.socket); err == nil {
			c.Close()
			return
		}
		if i > 500 {
			s.t.Fatalf("nbdkit did not create %s", s.socket)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill stops the server with SIGKILL, as a crash would.
func (s *nbdkitServer) kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	_ = s.cmd.Wait()
	s.cmd = nil
}

func (s *nbdkitServer) stop() { s.kill() }

// requireFallbackTools skips (fails in CI) unless the fallback can run.
func requireFallbackTools(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "nbdkit", "nbdfuse", "losetup", "fusermount3", "mkfs.ext4", "e2fsck", "mount", "umount")
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Skipf(t, "/dev/fuse missing")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		testenv.Skipf(t, "/dev/loop-control missing")
	}
}

// cleanupUnder detaches every loop device backed by a file under dir and
// unmounts every mount under dir, so a failing test leaves nothing behind.
func cleanupUnder(t *testing.T, dir string) {
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-n", "-O", "NAME,BACK-FILE", "-l").Output(); err == nil {
			for _, line := range strings.Split(string(out), "\n") {
				f := strings.Fields(line)
				if len(f) >= 2 && strings.HasPrefix(f[1], dir) {
					_ = exec.Command("losetup", "-d", f[0]).Run()
				}
			}
		}
		b, _ := os.ReadFile("/proc/self/mountinfo")
		var mounts []string
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasPrefix(unescapeMountPath(f[4]), dir) {
				mounts = append(mounts, unescapeMountPath(f[4]))
			}
		}
		for i := len(mounts) - 1; i >= 0; i-- { // innermost first
			if err := exec.Command("umount", mounts[i]).Run(); err != nil {
				_ = exec.Command("umount", "-l", mounts[i]).Run()
			}
		}
	})
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// countFlushes counts NBD_CMD_FLUSH requests in an nbdkit log filter file.
func countFlushes(t *testing.T, logfile string) int {
	t.Helper()
	f, err := os.Open(logfile)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0
		}
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Request lines look like "... connection=1 Flush id=12 ..."; the
		// reply line is "...Flush id=12 return=0".
		if strings.Contains(sc.Text(), " Flush id=") {
			n++
		}
	}
	return n
}

// writeFiles writes n files of random content and returns their contents.
func writeFiles(t *testing.T, dir, prefix string, n, size int) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	for i := 0; i < n; i++ {
		b := make([]byte, size+i*517)
		if _, err := rand.Read(b); err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("%s-%03d", prefix, i)
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatalf("write %s: %v", name, err)
		}
		files[name] = b
	}
	return files
}

func checkFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if string(got) != string(want) {
			t.Fatalf("%s: content differs (%d bytes read, %d written)", name, len(got), len(want))
		}
	}
}

func mustAttach(t *testing.T, o Options) *Attachment {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := Attach(ctx, o)
	if err != nil {
		t.Fatalf("Attach: %v", err)
	}
	return a
}

func mustDetach(t *testing.T, stateDir, dev string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := Detach(ctx, stateDir, dev); err != nil {
		t.Fatalf("Detach %s: %v", dev, err)
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }

func startNbdkitB(b *testing.B, s *nbdkitServer) {
	_ = os.Remove(s.socket)
	cmd := exec.Command("nbdkit", append([]string{"-f", "-U", s.socket}, s.args...)...)
	if err := cmd.Start(); err != nil {
		b.Skipf("nbdkit: %v", err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 500; i++ {
		if c, err := net.Dial("unix", s.socket); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.Fatal("nbdkit did not start")
}
