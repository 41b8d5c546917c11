package main

import (
	"math"
	"strings"
	"testing"
)

func fakeVM(iops map[string]map[string]float64) *VMResults {
	m := &VMPhase{CPUs: 2, Fio: map[string]map[string]VMFio{}}
	m.Config.CacheBytes = 64 << 20
	for job, bySys := range iops {
		m.Fio[job] = map[string]VMFio{}
		for id, v := range bySys {
			x := VMFio{DirtyAfter: -1}
			x.WriteIOPS, x.WriteBW, x.RuntimeSec, x.WriteP99Ms = v, v*4096, 8, 1
			m.Fio[job][id] = x
		}
	}
	return &VMResults{Main: m}
}

func TestVMGoals(t *testing.T) {
	r := fakeVM(map[string]map[string]float64{
		"fsync": {"wbk": 300, "dmwb": 100, "dmwc": 250},
		"qd32":  {"wbk": 790, "dmwb": 1000},
		"qd1":   {"wbk": 400, "dmwb": 1000, "nbdkit": 800, "ournbd": 700},
		"sus2":  {"wbk": 200, "dmwb": 100},
	})
	r.Main.EngineAlone = map[string]VMEngineAlone{"qd1": {IOPS: 5000}, "fsync": {IOPS: 900}}
	// A failed job is "not measured", never a ratio.
	r.Main.Fio["sus2"]["dmwc"] = VMFio{FioResult: FioResult{WriteIOPS: 1, Error: "boom"}}
	byID := map[string]Goal{}
	for _, g := range evaluateVMGoals(r) {
		byID[g.ID] = g
	}
	for id, want := range map[string]struct {
		v      float64
		status string
	}{
		"vm-fsync-dmwb": {3, "met"},
		"vm-fsync-dmwc": {1.2, "MISSED"},
		"vm-qd32-dmwb":  {0.79, "MISSED"},
		"vm-qd1-lat":    {2.5, "met"},
		"vm-sus2-dmwb":  {2, "met"},
		"vm-sus2-dmwc":  {math.NaN(), "not measured"},
		"vm-sus05-dmwb": {math.NaN(), "not measured"},
	} {
		g, ok := byID[id]
		if !ok {
			t.Fatalf("no goal %s", id)
		}
		if g.Status != want.status || (math.IsNaN(want.v) != math.IsNaN(g.Measured)) || (!math.IsNaN(want.v) && math.Abs(g.Measured-want.v) > 1e-9) {
			t.Errorf("%s: got %v %s, want %v %s", id, g.Measured, g.Status, want.v, want.status)
		}
		if g.Status == "MISSED" && g.Note == "" {
			t.Errorf("%s: missed without a reason", id)
		}
	}
	// The QD1 reason splits the time per request with the references
	// and the engine alone (the server side).
	if n := qd1Breakdown(r); !strings.Contains(n, "2500 µs through writeboost") || !strings.Contains(n, "nbdkit memory) took 1250 µs") ||
		!strings.Contains(n, "engine alone (in-process on the same kind of devices, no NBD) took 200 µs per write, so 2300 µs (92 %)") ||
		!strings.Contains(n, "at most 1250 µs (50 %) is ours to remove") {
		t.Errorf("QD1 breakdown: %s", n)
	}
	// The fsync reason compares the server side with the client side.
	if n := byID["vm-fsync-dmwc"].Note; !strings.Contains(n, "did 900 IOPS where writeboost through kernel nbd did 300, so the NBD path takes 67 %") ||
		!strings.Contains(n, "3.60× dm-writecache") {
		t.Errorf("fsync note: %s", n)
	}
}

func TestInsertVMSection(t *testing.T) {
	page := "# B\n\n## Goals\n\nx\n\n## Reproduce\n\nmake bench\n"
	got := insertVMSection(page, "## VM\n\ny\n\n")
	if want := "# B\n\n## Goals\n\nx\n\n## VM\n\ny\n\n## Reproduce\n\nmake bench\n"; got != want {
		t.Fatalf("got %q", got)
	}
	if got := insertVMSection("# B\n", "## VM\n"); got != "# B\n\n## VM\n" {
		t.Fatalf("no Reproduce: got %q", got)
	}
}
