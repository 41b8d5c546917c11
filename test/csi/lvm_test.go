package csi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// TestKernelLVMLifecycle (issue 12 §3): the plugin on LVM pools for real,
// two volume groups on loop devices in the real kernel (device-mapper:
// the host has none, so elsewhere the LVM pool meets only a scripted
// volume group). The kubelet-order lifecycle of testLifecycle on them:
// create (capacity falls), stage, publish, write, restage and read back,
// expand (lvextend, the engine takes the grown backing, resize2fs),
// delete (the LVs are renamed for the wiper, which zeroes and removes
// them), capacity back; then no LV is left in either group.
func TestKernelLVMLifecycle(t *testing.T) {
	e := newLVMKernelEnv(t)
	testLifecycle(t, e.env)
	for _, vg := range e.vgs {
		if lvs := lvNames(t, vg); len(lvs) != 0 {
			t.Fatalf("volume group %s still holds %v after every volume was deleted and wiped", vg, lvs)
		}
	}
}

// newLVMKernelEnv is newKernelEnv with LVM pools: a 320 MiB group for the
// HDD pool and a 160 MiB one for the NVMe pool, each on a loop device over
// a sparse file, named in the plugin's config file. The pools adopt their
// groups as a user's would (zeroFreeSpace's default: the free space is
// wiped before it is offered); the env is ready once no wipe LV is left.
func newLVMKernelEnv(t *testing.T) *lvmEnv {
	requireEnv(t)
	requireKernelNBD(t)
	testenv.RequireKernelFeature(t, "/dev/mapper/control", "device-mapper")
	testenv.RequireTools(t, "pvcreate", "vgcreate", "vgremove", "pvremove", "lvcreate", "lvextend", "lvreduce",
		"lvrename", "lvremove", "lvs", "vgs")
	t.Setenv("DM_DISABLE_UDEV", "1") // no udev in the VM: the lvm tools make the nodes; the plugin inherits it
	base, err := os.MkdirTemp("", "wbcsi-lvm-")
	if err != nil {
		t.Fatal(err)
	}
	le := &lvmEnv{}
	suffix := time.Now().UnixNano() % 1_000_000
	var cfg strings.Builder
	cfg.WriteString("pools:\n")
	for _, p := range []struct {
		name string
		size int64
	}{{"hdd", 320 << 20}, {"nvme", 160 << 20}} {
		vg := fmt.Sprintf("wb%s%d", p.name, suffix)
		le.vgs = append(le.vgs, vg)
		img := filepath.Join(base, p.name+".img")
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(p.size)
		f.Close()
		out, err := exec.Command("losetup", "--find", "--show", img).Output()
		if err != nil {
			t.Fatalf("losetup %s: %v", img, err)
		}
		dev := strings.TrimSpace(string(out))
		t.Cleanup(func() { // after the env's own cleanup (registered later, runs first)
			exec.Command("vgremove", "--yes", "--force", vg).Run()
			exec.Command("pvremove", "--yes", dev).Run()
			exec.Command("losetup", "-d", dev).Run()
		})
		for _, c := range [][]string{{"pvcreate", "--yes", dev}, {"vgcreate", "--physicalextentsize", "1m", vg, dev}} {
			if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v: %s", c, err, out)
			}
		}
		fmt.Fprintf(&cfg, "  %s:\n    kind: lvm\n    volumeGroup: %s\n", p.name, vg)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	conf := filepath.Join(base, "config.yaml")
	if err := os.WriteFile(conf, []byte(cfg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, base: filepath.Join(base, "node"), state: filepath.Join(base, "node", "state"),
		run: filepath.Join(base, "node", "run"), socket: filepath.Join(base, "node", "csi.sock"),
		extra: []string{"--config", conf}, kernel: true, lvm: true}
	if err := os.MkdirAll(e.base, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.cleanup)
	e.start()
	le.env = e
	// Adoption: each group's free space went into a wipe LV, offered once wiped.
	for begin := time.Now(); ; time.Sleep(250 * time.Millisecond) {
		busy := false
		for _, vg := range le.vgs {
			busy = busy || len(lvNames(t, vg)) > 0
		}
		if !busy {
			break
		}
		if time.Since(begin) > 3*time.Minute {
			t.Fatalf("the pools' adoption wipe did not finish in 3 minutes; log:\n%s", e.log())
		}
	}
	if c := e.capacity(t); c < 128<<20 {
		t.Fatalf("capacity %d after adoption, want the groups' free space", c)
	}
	return le
}

type lvmEnv struct {
	*env
	vgs []string
}

// lvNames is the logical volumes in vg (volumes and wipe LVs alike).
func lvNames(t *testing.T, vg string) []string {
	t.Helper()
	out, err := exec.Command("lvs", "--noheadings", "-o", "lv_name", vg).CombinedOutput()
	if err != nil {
		t.Fatalf("lvs %s: %v %s", vg, err, out)
	}
	return strings.Fields(string(out))
}
