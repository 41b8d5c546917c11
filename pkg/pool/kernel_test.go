package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// TestKernelLVMWipe runs the LVM pool against real LVM on a loop device
// whose every byte held older data (device-mapper: the real-kernel tier,
// skipped where the kernel has none). A new LV, one on the extents of a
// deleted LV, and an extension all read as zeros from the first byte to
// the last, and the space of a deleted LV comes back only once wiped.
func TestKernelLVMWipe(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireKernelFeature(t, "/dev/mapper/control", "device-mapper")
	testenv.RequireTools(t, "losetup", "pvcreate", "vgcreate", "vgremove", "lvcreate", "lvs", "vgs")
	t.Setenv("DM_DISABLE_UDEV", "1") // no udev in the VM: lvm makes the nodes
	const size = 96 << 20
	img := filepath.Join(t.TempDir(), "pv.img")
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xEE}, size), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", img).Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	vg := fmt.Sprintf("wbtest%d", time.Now().UnixNano()%1e6)
	t.Cleanup(func() {
		exec.Command("vgremove", "--yes", "--force", vg).Run()
		exec.Command("pvremove", "--yes", dev).Run()
		exec.Command("losetup", "-d", dev).Run()
	})
	// Wipe the PV's signature area only: the extents keep the old bytes.
	for _, c := range [][]string{{"pvcreate", "--yes", dev}, {"vgcreate", "--physicalextentsize", "1m", vg, dev}} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", c, err, out)
		}
	}
	p := &LVM{VG: vg, ZeroFreeSpace: true, WipeChunk: 16 << 20}
	wipe := func() {
		t.Helper()
		if err := p.wipeAll(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := p.WipePending(); n != 0 {
			t.Fatalf("%d bytes still pending after the wipe", n)
		}
	}
	if _, err := p.Create("a", 16<<20); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("create before the adoption wipe: %v (the group's free space must be wiped first)", err)
	}
	before, _ := p.Capacity()
	wipe()
	free, err := p.Capacity()
	if err != nil || free <= before || free < 64<<20 {
		t.Fatalf("capacity %d after the adoption wipe (was %d): %v", free, before, err)
	}
	a, err := p.Create("a", 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	requireZeros(t, a)
	if err := os.WriteFile(a, bytes.Repeat([]byte{0xAA}, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := p.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if c, _ := p.Capacity(); c != free-16<<20 {
		t.Fatalf("capacity %d right after delete, want %d (a is being wiped)", c, free-16<<20)
	}
	wipe()
	if c, _ := p.Capacity(); c != free {
		t.Fatalf("capacity %d after the wipe, want %d", c, free)
	}
	b, err := p.Create("b", free-8<<20) // all of a's extents and more
	if err != nil {
		t.Fatal(err)
	}
	requireZeros(t, b)
	if err := p.Expand("b", free); err != nil {
		t.Fatal(err)
	}
	requireZeros(t, b)
}

func requireZeros(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	var off int64
	for {
		n, err := f.Read(buf)
		if i := bytes.IndexFunc(buf[:n], func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("%s shows older data at byte %d", path, off+int64(i))
		}
		off += int64(n)
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}
