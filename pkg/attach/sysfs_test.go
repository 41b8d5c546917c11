package attach

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// fakeSys builds a /sys/block look-alike and points sysBlock at it.
func fakeSys(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for p, v := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := sysBlock
	sysBlock = dir
	t.Cleanup(func() { sysBlock = old })
	return dir
}

func TestFindByBackend(t *testing.T) {
	fakeSys(t, map[string]string{
		"nbd0/backend":  "vol-a\n",
		"nbd1/size":     "0\n", // never connected: no backend file
		"nbd12/backend": "vol-b\n",
		"nbd3/backend":  "vol-b-suffix\n",
		"loop0/backend": "vol-c\n", // not an nbd device
	})
	for id, want := range map[string]int{"vol-a": 0, "vol-b": 12} {
		if got, err := findByBackend(id); err != nil || got != want {
			t.Errorf("findByBackend(%q) = %d, %v; want %d", id, got, err, want)
		}
	}
	for _, id := range []string{"vol-c", "vol", "vol-b-", ""} {
		if got, err := findByBackend(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("findByBackend(%q) = %d, %v; want ErrNotFound", id, got, err)
		}
	}
}

func TestRaiseMaxSectors(t *testing.T) {
	dir := fakeSys(t, map[string]string{
		"nbd0/queue/max_hw_sectors_kb": "32768\n",
		"nbd0/queue/max_sectors_kb":    "128\n",
		"nbd1/queue/max_hw_sectors_kb": "junk\n",
		"nbd1/queue/max_sectors_kb":    "128\n",
	})
	if err := raiseMaxSectors("nbd0"); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "nbd0/queue/max_sectors_kb")); string(b) != "32768" {
		t.Fatalf("max_sectors_kb = %q; want 32768", b)
	}
	if err := raiseMaxSectors("nbd1"); err == nil {
		t.Fatal("junk max_hw_sectors_kb accepted")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "nbd1/queue/max_sectors_kb")); string(b) != "128\n" {
		t.Fatalf("max_sectors_kb changed to %q on error", b)
	}
	if err := raiseMaxSectors("nbd9"); err == nil {
		t.Fatal("missing device accepted")
	}
}

func TestStateRoundTripAndValidation(t *testing.T) {
	dir := t.TempDir()
	st := &state{Attachment: Attachment{Device: "/dev/loop7", Method: MethodFallback, VolumeID: "pvc/1"}, MountDir: "/x", NbdfusePID: 42}
	if err := saveState(dir, st); err != nil {
		t.Fatal(err)
	}
	got, err := loadState(dir, "pvc/1")
	if err != nil || *got != *st {
		t.Fatalf("loadState = %+v, %v; want %+v", got, err, st)
	}
	if got, err := findStateByDevice(dir, "/dev/loop7"); err != nil || got.VolumeID != "pvc/1" {
		t.Fatalf("findStateByDevice = %+v, %v", got, err)
	}
	if _, err := findStateByDevice(dir, "/dev/loop8"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("unknown device: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
	if err := removeState(dir, "pvc/1"); err != nil {
		t.Fatal(err)
	}
	if err := removeState(dir, "pvc/1"); err != nil {
		t.Fatalf("second remove: %v", err)
	}

	for name, o := range map[string]Options{
		"no socket":    {VolumeID: "v", StateDir: dir},
		"no volume":    {Socket: "s", StateDir: dir},
		"no state dir": {Socket: "s", VolumeID: "v"},
		"newline id":   {Socket: "s", VolumeID: "a\nb", StateDir: dir},
		"bad method":   {Socket: "s", VolumeID: "v", StateDir: dir, PreferMethod: "magic"},
		"negative":     {Socket: "s", VolumeID: "v", StateDir: dir, Connections: -1},
	} {
		if _, err := Attach(t.Context(), o); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
