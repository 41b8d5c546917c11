package serve

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// attachment is a served volume made into a block device the way the
// fallback attach path does it: nbdfuse exposes the export as a file on a
// private FUSE mount, and a loop device sits on that file.
type attachment struct {
	t      *testing.T
	fuse   *exec.Cmd
	fdone  chan struct{}
	mntDir string // FUSE mount point; the file is mntDir/nbd
	loop   string
}

func attach(t *testing.T, s *server, dir string) *attachment {
	t.Helper()
	a := &attachment{t: t, mntDir: dir, fdone: make(chan struct{})}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var out testenv.SyncBuffer
	a.fuse = exec.Command("nbdfuse", dir, "--unix", s.socket)
	a.fuse.Stdout, a.fuse.Stderr = &out, &out
	if err := a.fuse.Start(); err != nil {
		t.Fatalf("nbdfuse: %v", err)
	}
	go func() { a.fuse.Wait(); close(a.fdone) }()
	t.Cleanup(a.detach)
	file := filepath.Join(dir, "nbd")
	deadline := time.Now().Add(30 * time.Second)
	for {
		if st, err := os.Stat(file); err == nil && st.Size() > 0 {
			break
		}
		select {
		case <-a.fdone:
			t.Fatalf("nbdfuse exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdfuse file %s did not appear: %s", file, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	loop, _ := run(t, time.Minute, false, "losetup", "--find", "--show", file)
	a.loop = strings.TrimSpace(loop)
	return a
}

// detach undoes attach; safe to call twice and after the server died.
func (a *attachment) detach() {
	if a.loop != "" {
		run(a.t, time.Minute, true, "losetup", "-d", a.loop)
		a.loop = ""
	}
	if a.fuse != nil {
		run(a.t, time.Minute, true, "fusermount3", "-u", a.mntDir)
		select {
		case <-a.fdone:
		case <-time.After(10 * time.Second):
			a.fuse.Process.Kill()
			<-a.fdone
		}
		a.fuse = nil
	}
}

func mount(t *testing.T, dev, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	run(t, time.Minute, false, "mount", dev, dir)
	t.Cleanup(func() {
		// Lazy, for the case of a filesystem whose device died under it.
		run(t, time.Minute, true, "umount", "-l", dir)
	})
}

// writeFiles writes n files of random content under dir and returns their
// hashes by name.
func writeFiles(t *testing.T, dir, prefix string, n, size int, seed int64) map[string][32]byte {
	t.Helper()
	r := rand.New(rand.NewSource(seed))
	sums := map[string][32]byte{}
	buf := make([]byte, size)
	for i := 0; i < n; i++ {
		r.Read(buf)
		name := fmt.Sprintf("%s-%03d", prefix, i)
		if err := os.WriteFile(filepath.Join(dir, name), buf, 0o644); err != nil {
			t.Fatal(err)
		}
		sums[name] = sha256.Sum256(buf)
	}
	return sums
}

func verifyFiles(t *testing.T, dir string, sums map[string][32]byte) {
	t.Helper()
	for name, want := range sums {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if sha256.Sum256(got) != want {
			t.Errorf("%s: content differs from what was written and synced", name)
		}
	}
}

func syncFS(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatalf("syncfs %s: %v", dir, err)
	}
}

func fsckClean(t *testing.T, dev string) {
	t.Helper()
	out, err := run(t, 5*time.Minute, true, "fsck.ext4", "-n", "-f", dev)
	if err != nil {
		t.Fatalf("fsck -n %s is not clean (%v):\n%s", dev, err, out)
	}
}

// TestServeFilesystemSurvivesKill: ext4 on the served volume through
// nbdfuse and a loop device; written, synced, unmounted and checked; then
// serve is SIGKILLed while files are being written, restarted, and every
// file synced before the kill reads back intact with fsck clean.
func TestServeFilesystemSurvivesKill(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount")
	dir := t.TempDir()
	args := []string{"--backing-size", "1GiB", "--cache-size", "256MiB"}
	s := startServe(t, dir, args...)
	a := attach(t, s, filepath.Join(dir, "fuse"))
	run(t, 2*time.Minute, false, "mkfs.ext4", "-q", a.loop)
	mnt := filepath.Join(dir, "mnt")
	mount(t, a.loop, mnt)
	first := writeFiles(t, mnt, "first", 32, 256<<10, 1)
	syncFS(t, mnt)
	run(t, time.Minute, false, "umount", mnt)
	fsckClean(t, a.loop)

	mount(t, a.loop, mnt)
	verifyFiles(t, mnt, first)
	synced := writeFiles(t, mnt, "synced", 32, 256<<10, 2)
	syncFS(t, mnt)

	// A writer keeps going while serve is killed under it.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := bytes.Repeat([]byte("unsynced"), 32<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if os.WriteFile(filepath.Join(mnt, fmt.Sprintf("late-%04d", i)), buf, 0o644) != nil {
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	if code := s.stop(syscall.SIGKILL); code != -1 {
		t.Logf("serve exit code after SIGKILL: %d", code)
	}
	close(stop)
	wg.Wait()
	run(t, time.Minute, true, "umount", "-l", mnt)
	a.detach()

	// The killed server left an unclean but consistent cache.
	out, err := wb(t, true, "check", "--cache", filepath.Join(s.dataDir, "cache.img"))
	if err != nil || !strings.Contains(out, "clean shutdown: no") {
		t.Errorf("check after SIGKILL (%v):\n%s", err, out)
	}
	s = startServe(t, dir, args...)
	a = attach(t, s, filepath.Join(dir, "fuse"))
	mount(t, a.loop, mnt) // replays the ext4 journal
	verifyFiles(t, mnt, first)
	verifyFiles(t, mnt, synced)
	run(t, time.Minute, false, "umount", mnt)
	fsckClean(t, a.loop)
	a.detach()
	if code := s.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("serve exited %d after SIGTERM", code)
	}
	out, err = wb(t, true, "check", "--cache", filepath.Join(s.dataDir, "cache.img"))
	if err != nil || !strings.Contains(out, "clean shutdown: yes") {
		t.Fatalf("check after the restart's clean stop: %v\n%s", err, out)
	}
}

// TestServeAttach: serve --attach makes a block device and removes it on
// SIGTERM, exiting 0.
func TestServeAttach(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireTools(t, "nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4")
	dir := t.TempDir()
	s := startServe(t, dir, "--attach", "--backing-size", "256MiB", "--cache-size", "64MiB")
	deadline := time.Now().Add(2 * time.Minute)
	var dev string
	for dev == "" {
		for _, line := range strings.Split(s.out.String(), "\n") {
			if rest, ok := strings.CutPrefix(line, "Attached as "); ok {
				dev, _, _ = strings.Cut(rest, " ")
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve --attach printed no device:\n%s", s.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	back, _ := run(t, time.Minute, false, "losetup", "--noheadings", "-O", "BACK-FILE", dev)
	back = strings.TrimSpace(back)
	if back == "" {
		t.Fatalf("%s has no backing file", dev)
	}
	run(t, 2*time.Minute, false, "mkfs.ext4", "-q", dev)
	fsckClean(t, dev)
	if code := s.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("serve --attach exited %d after SIGTERM", code)
	}
	out, _ := run(t, time.Minute, false, "losetup", "-a")
	if strings.Contains(out, "("+back+")") {
		t.Fatalf("loop device over %s still attached after serve exited:\n%s", back, out)
	}
}
