package driver

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func buildWith(t *testing.T, config string) (*Driver, error) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return Build(Config{NodeID: "n1", ConfigFile: path, StateDir: filepath.Join(dir, "state"), RunDir: filepath.Join(dir, "run")})
}

func TestBuildPoolsAndBudget(t *testing.T) {
	dir := t.TempDir()
	pools := "pools:\n  hdd: {kind: directory, path: " + dir + "/hdd}\n  nvme: {kind: directory, path: " + dir + "/nvme}\n"
	d, err := buildWith(t, pools+"memoryBudget: 3Gi\n")
	if err != nil {
		t.Fatal(err)
	}
	if got := d.opts.Budget.Limit(); got != 3<<30 {
		t.Fatalf("memoryBudget 3Gi gave a budget of %d", got)
	}
	if _, err := buildWith(t, pools+"memoryBudget: lots\n"); err == nil || !strings.Contains(err.Error(), "memoryBudget") {
		t.Fatalf("bad memoryBudget: %v", err)
	}
	if _, err := buildWith(t, "pools:\n  hdd: {kind: lvm, volumeGroup: vg}\n  nvme: {kind: lvm, volumeGroup: vg}\n"); err == nil ||
		!strings.Contains(err.Error(), "share the volume group vg") {
		t.Fatalf("two pools on one volume group: %v", err)
	}
	if _, err := buildWith(t, "pools:\n  hdd: {kind: directory, path: "+dir+"/h, zeroFreeSpace: false}\n  nvme: {kind: directory, path: "+dir+"/n}\n"); err == nil {
		t.Fatal("zeroFreeSpace accepted on a directory pool")
	}
}
