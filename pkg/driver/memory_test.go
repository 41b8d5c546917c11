package driver

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/writeboost-csi/writeboost-csi/pkg/membudget"
)

// TestMemoryBudget: CreateVolume refuses a volume that would not fit in
// the node's memory budget beside the node's volumes, NodeStage refuses to
// start a data path beyond it, both with ResourceExhausted naming the
// figures; unstaging gives the memory back, and GetCapacity offers only
// what the memory left can cache. Before, nothing checked: every stage was
// started until the plugin was OOM-killed.
func TestMemoryBudget(t *testing.T) {
	ctx := context.Background()
	_, one, err := membudget.Need(16<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	d, _ := newTestDriverIn(t, dir, 0, one+one/2) // room for one volume
	cs := ControllerServer{d: d}
	p := map[string]string{"cacheSize": "16Mi"}
	a, err := cs.CreateVolume(ctx, createReq("a", 32<<20, p))
	if err != nil {
		t.Fatal(err)
	}
	_, err = cs.CreateVolume(ctx, createReq("b", 32<<20, p))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), membudget.Bytes(one)) ||
		!strings.Contains(err.Error(), membudget.Bytes(one+one/2)) {
		t.Fatalf("second volume over the budget: %v", err)
	}
	if _, err := cs.CreateVolume(ctx, createReq("a", 32<<20, p)); err != nil {
		t.Fatalf("a retried CreateVolume of a volume that fits: %v", err)
	}
	capa, err := cs.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: p})
	if err != nil || capa.AvailableCapacity != 0 {
		t.Fatalf("GetCapacity with no memory left: %v %v", capa, err)
	}

	// A bigger budget takes b; then the plugin restarts with the small one.
	d, _ = newTestDriverIn(t, dir, 0, 4*one)
	cs = ControllerServer{d: d}
	if capa, err := cs.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: p}); err != nil || capa.AvailableCapacity == 0 {
		t.Fatalf("GetCapacity with memory left: %v %v", capa, err)
	}
	b, err := cs.CreateVolume(ctx, createReq("b", 32<<20, p))
	if err != nil {
		t.Fatal(err)
	}
	d, _ = newTestDriverIn(t, dir, 0, one+one/2)
	ns := NodeServer{d: d}
	stage := func(v *csi.Volume) error {
		_, err := ns.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
			StagingTargetPath: filepath.Join(dir, v.VolumeId), VolumeCapability: blockCap, VolumeContext: v.VolumeContext})
		return err
	}
	if err := stage(a.Volume); err != nil {
		t.Fatal(err)
	}
	if err := stage(a.Volume); err != nil {
		t.Fatalf("a repeated NodeStage counts once: %v", err)
	}
	err = stage(b.Volume)
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("stage over the budget: %v", err)
	}
	for _, s := range []string{"needs " + membudget.Bytes(one), "hold " + membudget.Bytes(one), membudget.Bytes(one+one/2) + " budget"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%q does not say %q", err, s)
		}
	}
	if _, err := ns.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: a.Volume.VolumeId,
		StagingTargetPath: filepath.Join(dir, a.Volume.VolumeId)}); err != nil {
		t.Fatal(err)
	}
	if err := stage(b.Volume); err != nil {
		t.Fatalf("stage after the other volume gave its memory back: %v", err)
	}
	if got := d.opts.Budget.InUse(); got != one {
		t.Fatalf("in use %d, want %d", got, one)
	}
}
