package csi

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// The TestKernel* tests run the plugin's scenarios again where the kernel
// has nbd (make vm-test, hack/vm): the production attach path, kernel NBD
// over netlink, instead of the nbdfuse + loop fallback of the host. Every
// staged volume's attachment record must say kernel-netlink, and the
// plugin must never have fallen back.

func requireKernelNBD(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		_ = exec.Command("modprobe", "nbd").Run()
	}
	testenv.RequireKernelFeature(t, "/dev/nbd0", "kernel nbd driver")
}

func newKernelEnv(t *testing.T, extra ...string) *env { return newNode(t, true, extra...) }

// checkMethod: on a kernel node, volumeID's attachment record (the one a
// restarted plugin re-adopts) names the kernel-netlink method.
func (e *env) checkMethod(t *testing.T, volumeID string) {
	t.Helper()
	if !e.kernel {
		return
	}
	recs, _ := filepath.Glob(filepath.Join(e.state, "attach", "*.json"))
	for _, r := range recs {
		var a attach.Attachment
		if b, err := os.ReadFile(r); err != nil || json.Unmarshal(b, &a) != nil || a.VolumeID != volumeID {
			continue
		}
		if a.Method != attach.MethodNetlink || !strings.HasPrefix(a.Device, "/dev/nbd") {
			t.Fatalf("volume %s attached by %s on %s; want %s on /dev/nbd*", volumeID, a.Method, a.Device, attach.MethodNetlink)
		}
		return
	}
	t.Fatalf("no attachment record for staged volume %s in %s", volumeID, filepath.Join(e.state, "attach"))
}

// checkKernelLog: the plugin attached over netlink and never fell back.
func (e *env) checkKernelLog() {
	b, err := os.ReadFile(filepath.Join(e.base, "plugin.log")) // all of it: e.log keeps only the tail
	if err != nil {
		e.t.Errorf("plugin log: %v", err)
		return
	}
	log := string(b)
	if !strings.Contains(log, `method="`+attach.MethodNetlink+`"`) {
		e.t.Errorf("the plugin never attached by %s; log:\n%s", attach.MethodNetlink, e.log())
	}
	for _, m := range []string{attach.MethodFallback, attach.MethodIoctl} {
		if strings.Contains(log, `method="`+m+`"`) {
			e.t.Errorf("the plugin attached by %s on a kernel with nbd netlink; log:\n%s", m, e.log())
		}
	}
}

// TestKernelLifecycle is TestLifecycle (kubelet's order of calls, offline
// expansion, delete) on kernel NBD.
func TestKernelLifecycle(t *testing.T) { testLifecycle(t, newKernelEnv(t)) }

// TestKernelKillWhileStaged is TestKillWhileStaged on kernel NBD: the
// restarted plugin reconfigures the live /dev/nbdX (RECONFIGURE) under the
// mounted filesystem, after a SIGKILL and after a graceful restart.
func TestKernelKillWhileStaged(t *testing.T) { testKillWhileStaged(t, newKernelEnv(t)) }

// TestKernelBlockKillWhileStaged is TestBlockKillWhileStaged (a raw block
// volume) on kernel NBD.
func TestKernelBlockKillWhileStaged(t *testing.T) { testBlockKillWhileStaged(t, newKernelEnv(t)) }

// TestKernelSanity is csi-sanity, Mount and Block, on kernel NBD.
func TestKernelSanity(t *testing.T) { testSanity(t, newKernelEnv) }

// TestKernelRestartUnderWriter: a writer appends to a file on a mounted
// kernel-NBD volume, fsyncing every chunk, while the plugin is SIGKILLed
// and restarted, then stopped gracefully (SIGTERM) and replaced by a new
// process (an upgrade). The restarted plugin reattaches the live device
// (RECONFIGURE); the writer never sees an error, and after an unstage and
// a stage every byte it wrote reads back.
func TestKernelRestartUnderWriter(t *testing.T) {
	e := newKernelEnv(t)
	v := e.create(t, "pvc-writer", 64<<20)
	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	path := filepath.Join(target, "stream")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		written []byte
		werr    error
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			chunk := randBytes(64<<10 + i%7)
			if _, err := f.Write(chunk); err != nil {
				mu.Lock()
				werr = fmt.Errorf("write %d: %w", i, err)
				mu.Unlock()
				return
			}
			if err := f.Sync(); err != nil {
				mu.Lock()
				werr = fmt.Errorf("fsync %d: %w", i, err)
				mu.Unlock()
				return
			}
			mu.Lock()
			written = append(written, chunk...)
			mu.Unlock()
		}
	}()
	progress := func(what string) {
		t.Helper()
		mu.Lock()
		n := len(written)
		mu.Unlock()
		deadline := time.Now().Add(2 * time.Minute)
		for {
			mu.Lock()
			m, err := len(written), werr
			mu.Unlock()
			if err != nil {
				t.Fatalf("writer %s: %v", what, err)
			}
			if m >= n+(1<<20) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("writer made no progress %s (%d bytes)", what, m)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	progress("before the kill")
	e.kill()
	e.start()
	progress("after the SIGKILL and restart")
	if err := e.stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	e.start()
	progress("after the graceful restart")
	close(stop)
	<-done
	if werr != nil {
		t.Fatalf("writer: %v", werr)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(e.log(), "Re-adopted attached device"); n < 2 {
		t.Fatalf("re-adopted the attached device %d times over two restarts", n)
	}
	e.unpublishUnstage(t, v, staging, target)
	staging = e.stage(t, v)
	target = e.publish(t, v, staging)
	dropCaches()
	checkFile(t, filepath.Join(target, "stream"), written)
	t.Logf("writer wrote %d bytes across a SIGKILL and an upgrade", len(written))
	e.unpublishUnstage(t, v, staging, target)
}
