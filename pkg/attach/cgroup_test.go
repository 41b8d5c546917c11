package attach

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// A cgroup v1 (hybrid) node with the cgroupfs driver, as on the e2e
// machine: the container sees the runtime's view of its own subtree on
// every hierarchy and the host's whole /sys/fs/cgroup mounted over it
// (the chart's hostPath /sys).
func TestAttachCgroupDirsV1Hybrid(t *testing.T) {
	self := `12:pids:/kubepods/besteffort/pod1/ctr
11:cpu,cpuacct:/kubepods/besteffort/pod1/ctr
10:name=systemd:/kubepods/besteffort/pod1/ctr
4:memory:/process_api/x/kubepods/besteffort/pod1/ctr
0::/`
	mi := `30 20 0:26 / /sys rw - sysfs sysfs rw
31 30 0:27 /kubepods/besteffort/pod1/ctr /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids
32 30 0:28 /kubepods/besteffort/pod1/ctr /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 /kubepods/besteffort/pod1/ctr /sys/fs/cgroup/systemd ro - cgroup cgroup rw,xattr,name=systemd
34 30 0:30 /process_api/x/kubepods/besteffort/pod1/ctr /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
40 20 0:26 / /sys rw shared:1 - sysfs sysfs rw
41 40 0:27 / /sys/fs/cgroup/pids rw shared:2 - cgroup cgroup rw,pids
42 40 0:28 / /sys/fs/cgroup/cpu,cpuacct rw shared:3 - cgroup cgroup rw,cpuacct,cpu
43 40 0:29 / /sys/fs/cgroup/systemd rw shared:4 - cgroup cgroup rw,xattr,name=systemd
44 40 0:30 / /sys/fs/cgroup/memory rw shared:5 - cgroup cgroup rw,memory
45 40 0:31 / /sys/fs/cgroup/unified rw shared:6 - cgroup2 cgroup2 rw`
	dirs, err := attachCgroupDirs(parseCgroups([]byte(self)), parseCgroupMounts([]byte(mi)))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"/sys/fs/cgroup/pids/writeboost-csi-attach",
		"/sys/fs/cgroup/cpu,cpuacct/writeboost-csi-attach",
		"/sys/fs/cgroup/systemd/writeboost-csi-attach",
		"/sys/fs/cgroup/memory/process_api/x/writeboost-csi-attach",
	}
	if !reflect.DeepEqual(dirs, want) {
		t.Fatalf("dirs %q, want %q", dirs, want)
	}
}

// cgroup2 with the systemd driver, host cgroup namespace (privileged).
func TestAttachCgroupDirsV2Systemd(t *testing.T) {
	self := "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope\n"
	mi := "50 40 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
	dirs, err := attachCgroupDirs(parseCgroups([]byte(self)), parseCgroupMounts([]byte(mi)))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/sys/fs/cgroup/writeboost-csi-attach"}; !reflect.DeepEqual(dirs, want) {
		t.Fatalf("dirs %q, want %q", dirs, want)
	}
}

// Not in a pod: nothing to leave. In a pod that sees only its own subtree:
// an error that says what to mount.
func TestAttachCgroupDirsOutsideAPodAndHidden(t *testing.T) {
	dirs, err := attachCgroupDirs(parseCgroups([]byte("0::/user.slice/session-1.scope\n4:memory:/\n")), nil)
	if err != nil || dirs != nil {
		t.Fatalf("outside a pod: dirs %q, err %v; want none", dirs, err)
	}
	self := "0::/kubepods/pod1/ctr\n"
	mi := "50 40 0:31 /kubepods/pod1/ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
	_, err = attachCgroupDirs(parseCgroups([]byte(self)), parseCgroupMounts([]byte(mi)))
	if err == nil || !strings.Contains(err.Error(), "/sys/fs/cgroup") {
		t.Fatalf("hidden hierarchy: err %v, want one naming /sys/fs/cgroup", err)
	}
}

// For real, on this machine's cgroups: a process in a made-up pod cgroup
// ("kubepods-wbtest-N/ctr" in every hierarchy) moves a child chain out of
// it into the attach cgroup, in every hierarchy, and the chain survives the
// "pod" being killed.
func TestLeaveCgroupsForReal(t *testing.T) {
	testenv.RequireRoot(t)
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	mounts := parseCgroupMounts(mi)
	pod := fmt.Sprintf("kubepods-wbtest-%d", os.Getpid())
	// The pod's directory in every hierarchy we are in.
	var podDirs []string
	for _, l := range parseCgroups(self) {
		for _, m := range mounts {
			if sameControllers(m.controllers, l.controllers) && strings.HasPrefix(l.path, m.root) {
				podDirs = append(podDirs, filepath.Join(m.point, strings.TrimPrefix(l.path, m.root), pod, "ctr"))
				break
			}
		}
	}
	if len(podDirs) == 0 {
		testenv.Skipf(t, "no writable cgroup hierarchy in /proc/self/mountinfo")
	}
	start := func() *exec.Cmd {
		c := exec.Command("sleep", "300")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Process.Kill(); _ = c.Wait() })
		return c
	}
	ref, moved := start(), start()
	var attachDirs []string
	t.Cleanup(func() {
		_ = ref.Process.Kill()
		_ = moved.Process.Kill()
		_ = ref.Wait()
		_ = moved.Wait()
		for _, d := range append(podDirs, attachDirs...) {
			for dd := d; strings.Contains(dd, pod) || strings.HasSuffix(dd, AttachCgroup); dd = filepath.Dir(dd) {
				_ = os.Remove(dd)
			}
		}
	})
	for _, d := range podDirs {
		if err := mkdirCgroup(d); err != nil {
			t.Fatal(err)
		}
		for _, p := range []int{ref.Process.Pid, moved.Process.Pid} {
			if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(p)), 0o644); err != nil {
				t.Fatalf("put %d in %s: %v", p, d, err)
			}
		}
	}
	dirs, err := attachCgroupDirs(parseCgroups(mustRead(t, fmt.Sprintf("/proc/%d/cgroup", ref.Process.Pid))), mounts)
	if err != nil {
		t.Fatal(err)
	}
	attachDirs = dirs
	if err := leaveCgroupsOf(strconv.Itoa(ref.Process.Pid), []int{moved.Process.Pid}); err != nil {
		t.Fatal(err)
	}
	after := string(mustRead(t, fmt.Sprintf("/proc/%d/cgroup", moved.Process.Pid)))
	for _, l := range parseCgroups([]byte(after)) {
		if strings.Contains(l.path, pod) {
			t.Errorf("hierarchy %q: still in the pod: %s", l.controllers, l.path)
		}
	}
	if !strings.Contains(after, AttachCgroup) {
		t.Fatalf("moved process's cgroups %q name no %s", after, AttachCgroup)
	}
	// Kill the pod as a runtime does: every process in its cgroup.
	for _, d := range podDirs {
		for _, f := range strings.Fields(string(mustRead(t, filepath.Join(d, "cgroup.procs")))) {
			if p, _ := strconv.Atoi(f); p > 0 {
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
	}
	_ = ref.Wait()
	time.Sleep(50 * time.Millisecond)
	if err := moved.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the moved process died with the pod: %v", err)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestProcessTreeFindsChildren(t *testing.T) {
	c := exec.Command("sh", "-c", "sleep 300 & sleep 300 & wait")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Process.Kill(); _ = c.Wait() }()
	var tree []int
	for i := 0; i < 200; i++ {
		if tree = processTree(c.Process.Pid); len(tree) == 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(tree) != 3 || tree[0] != c.Process.Pid {
		t.Fatalf("tree of sh: %v, want sh and its two sleeps", tree)
	}
	for _, p := range tree[1:] {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
}
