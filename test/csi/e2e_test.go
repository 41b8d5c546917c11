package csi

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var mountCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

var testParams = map[string]string{
	"cacheSize": "16Mi", "writebackThreshold": "50", "maxBatchedWriteback": "8", "syncDataInterval": "1",
	"csi.storage.k8s.io/pvc/name": "claim", "csi.storage.k8s.io/fstype": "ext4",
}

func (e *env) capacity(t *testing.T) int64 {
	t.Helper()
	r, err := e.ctrl().GetCapacity(ctx(t), &csi.GetCapacityRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return r.AvailableCapacity
}

func (e *env) create(t *testing.T, name string, size int64) *csi.Volume {
	t.Helper()
	r, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: name, Parameters: testParams,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	return r.Volume
}

func (e *env) stage(t *testing.T, v *csi.Volume) string {
	t.Helper()
	p := filepath.Join(e.base, "staging", v.VolumeId)
	if _, err := e.node().NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: p, VolumeCapability: mountCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatalf("NodeStageVolume: %v", err)
	}
	e.checkMethod(t, v.VolumeId)
	return p
}

func (e *env) publish(t *testing.T, v *csi.Volume, staging string) string {
	t.Helper()
	p := filepath.Join(e.base, "pods", v.VolumeId, "mount")
	if _, err := e.node().NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, TargetPath: p, VolumeCapability: mountCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatalf("NodePublishVolume: %v", err)
	}
	return p
}

func (e *env) unpublishUnstage(t *testing.T, v *csi.Volume, staging, target string) {
	t.Helper()
	if _, err := e.node().NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: v.VolumeId, TargetPath: target}); err != nil {
		t.Fatalf("NodeUnpublishVolume: %v", err)
	}
	if _, err := e.node().NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume: %v", err)
	}
}

func writeSynced(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func checkFile(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read back %s: %v", path, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: %d bytes read back differ from the %d written", path, len(got), len(want))
	}
}

func dropCaches() { os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) }

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * int64(st.Bsize)
}

// TestLifecycle follows kubelet's order of calls.
func TestLifecycle(t *testing.T) { testLifecycle(t, newEnv(t)) }

func testLifecycle(t *testing.T, e *env) {
	before := e.capacity(t)
	v := e.create(t, "pvc-lifecycle", 64<<20)
	if after := e.capacity(t); before-after < 64<<20 {
		t.Fatalf("capacity fell by %d after a 64 MiB volume", before-after)
	}
	if seg := v.AccessibleTopology[0].Segments["topology.writeboost.csi.io/node"]; seg != "node-1" {
		t.Fatalf("topology %v", v.AccessibleTopology)
	}
	// Idempotent by name.
	if again := e.create(t, "pvc-lifecycle", 64<<20); again.VolumeId != v.VolumeId {
		t.Fatalf("second CreateVolume gave %s, first %s", again.VolumeId, v.VolumeId)
	}

	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	big, small := randBytes(3<<20+123), []byte("hello writeboost\n")
	writeSynced(t, filepath.Join(target, "big"), big)
	writeSynced(t, filepath.Join(target, "small"), small)
	e.unpublishUnstage(t, v, staging, target)

	staging = e.stage(t, v)
	target = e.publish(t, v, staging)
	dropCaches()
	checkFile(t, filepath.Join(target, "big"), big)
	checkFile(t, filepath.Join(target, "small"), small)
	oldSize := fsSize(t, target)
	e.unpublishUnstage(t, v, staging, target)

	// Offline expansion: grow the backing, stage (the engine takes the grown
	// backing), grow the filesystem.
	r, err := e.ctrl().ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: mountCap})
	if err != nil {
		t.Fatalf("ControllerExpandVolume: %v", err)
	}
	if r.CapacityBytes != 128<<20 || !r.NodeExpansionRequired {
		t.Fatalf("ControllerExpandVolume: %+v", r)
	}
	staging = e.stage(t, v)
	nr, err := e.node().NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{VolumeId: v.VolumeId, VolumePath: staging,
		StagingTargetPath: staging, CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}, VolumeCapability: mountCap})
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	if nr.CapacityBytes != 128<<20 {
		t.Fatalf("NodeExpandVolume capacity %d", nr.CapacityBytes)
	}
	target = e.publish(t, v, staging)
	if newSize := fsSize(t, target); newSize < oldSize+(50<<20) {
		t.Fatalf("filesystem %d bytes after expansion, was %d", newSize, oldSize)
	}
	checkFile(t, filepath.Join(target, "big"), big)
	st, err := e.node().NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	if st.VolumeCondition.GetAbnormal() || len(st.Usage) != 2 || st.Usage[0].Used < int64(len(big)) {
		t.Fatalf("stats: %+v", st)
	}
	// A staged volume cannot be deleted.
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("DeleteVolume of a staged volume: %v", err)
	}
	e.unpublishUnstage(t, v, staging, target)
	for i := 0; i < 2; i++ {
		if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
			t.Fatalf("DeleteVolume #%d: %v", i+1, err)
		}
	}
	for _, dir := range []string{e.hdd, e.nvme} {
		if e.lvm {
			break // the LVM test looks at its groups' LVs
		}
		if ents, _ := filepath.Glob(filepath.Join(dir, "*.img")); len(ents) != 0 {
			t.Fatalf("files left after delete: %v", ents)
		}
	}
	// A pool may give a deleted volume's space back only once it reads as
	// zeros (LVM: the wiper's background work), but it must come back.
	for begin := time.Now(); ; time.Sleep(200 * time.Millisecond) {
		after := e.capacity(t)
		if after == before {
			break
		}
		if time.Since(begin) > 2*time.Minute {
			t.Fatalf("capacity not returned: %d before, %d two minutes after delete", before, after)
		}
	}
	if err := e.stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
}

// TestKillWhileStaged SIGKILLs the plugin while a volume is staged and
// mounted: the mount keeps working after the restart and synced data is
// intact; then the same across a graceful restart, and after a later
// unstage and stage.
func TestKillWhileStaged(t *testing.T) { testKillWhileStaged(t, newEnv(t)) }

func testKillWhileStaged(t *testing.T, e *env) {
	v := e.create(t, "pvc-kill", 64<<20)
	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	before := randBytes(2<<20 + 7)
	writeSynced(t, filepath.Join(target, "before"), before)

	e.kill()
	e.start()
	if !strings.Contains(e.log(), "Re-adopted attached device") {
		t.Fatal("the restarted plugin did not re-adopt the attached device")
	}
	dropCaches()
	checkFile(t, filepath.Join(target, "before"), before)
	after := randBytes(1 << 20)
	writeSynced(t, filepath.Join(target, "after"), after)
	st, err := e.node().NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: target})
	if err != nil || st.VolumeCondition.GetAbnormal() {
		t.Fatalf("stats after restart: %+v %v", st, err)
	}
	// A graceful stop (SIGTERM) flushes every volume and leaves the device
	// to the next process; then a full unstage and stage shows the data
	// written through the restarted plugin reached the cache for good.
	if err := e.stop(); err != nil {
		t.Fatalf("graceful stop: %v", err)
	}
	if !strings.Contains(e.log(), "Stopped; every volume flushed") {
		t.Fatal("graceful stop did not report flushing")
	}
	e.start()
	dropCaches()
	checkFile(t, filepath.Join(target, "after"), after)
	e.unpublishUnstage(t, v, staging, target)
	staging = e.stage(t, v)
	target = e.publish(t, v, staging)
	dropCaches()
	checkFile(t, filepath.Join(target, "before"), before)
	checkFile(t, filepath.Join(target, "after"), after)
	e.unpublishUnstage(t, v, staging, target)
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
}

func wantCode(t *testing.T, what string, err error, code codes.Code, mention string) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: got %v, want %v", what, err, code)
		return
	}
	if mention != "" && !strings.Contains(status.Convert(err).Message(), mention) {
		t.Errorf("%s: message %q does not mention %q", what, status.Convert(err).Message(), mention)
	}
}

func TestErrorCodes(t *testing.T) {
	e := newEnv(t)
	create := func(name string, size int64, p map[string]string) error {
		_, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: name, Parameters: p,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
		return err
	}
	for k, v := range map[string]string{"writebackThreshold": "101", "maxBatchedWriteback": "0", "readCacheThreshold": "x",
		"writeAround": "maybe", "cacheSize": "lots", "csi.storage.k8s.io/fstype": "btrfs", "bogus": "1"} {
		wantCode(t, "bad "+k, create("bad", 64<<20, map[string]string{k: v}), codes.InvalidArgument, k)
	}
	wantCode(t, "full pool", create("huge", 1<<50, nil), codes.ResourceExhausted, "")
	wantCode(t, "cache too big", create("hugecache", 64<<20, map[string]string{"cacheSize": "1Pi"}), codes.ResourceExhausted, "")
	if _, err := os.Stat(filepath.Join(e.hdd, "")); err != nil {
		t.Fatal(err)
	}
	if ents, _ := filepath.Glob(filepath.Join(e.hdd, "*.img")); len(ents) != 0 {
		t.Errorf("failed creations left files: %v", ents)
	}
	const ghost = "wb-000000000000000000000000"
	_, err := e.node().NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: ghost,
		StagingTargetPath: filepath.Join(e.base, "s"), VolumeCapability: mountCap})
	wantCode(t, "stage unknown", err, codes.NotFound, ghost)
	_, err = e.ctrl().ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: ghost,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 30}})
	wantCode(t, "expand unknown", err, codes.NotFound, ghost)
	_, err = e.node().NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: ghost, VolumePath: e.base})
	wantCode(t, "stats unknown", err, codes.NotFound, ghost)
	_, err = e.ctrl().ValidateVolumeCapabilities(ctx(t), &csi.ValidateVolumeCapabilitiesRequest{VolumeId: ghost,
		VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
	wantCode(t, "validate unknown", err, codes.NotFound, ghost)
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: ghost}); err != nil {
		t.Errorf("DeleteVolume of an unknown volume: %v", err)
	}
}

var blockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER},
}

// TestBlockKillWhileStaged: a raw block volume published to a "pod" keeps
// its synced data across a SIGKILL and restart of the plugin.
func TestBlockKillWhileStaged(t *testing.T) { testBlockKillWhileStaged(t, newEnv(t)) }

func testBlockKillWhileStaged(t *testing.T, e *env) {
	r, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: "pvc-block", Parameters: testParams,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 32 << 20}, VolumeCapabilities: []*csi.VolumeCapability{blockCap}})
	if err != nil {
		t.Fatal(err)
	}
	v := r.Volume
	staging := filepath.Join(e.base, "staging", v.VolumeId)
	if _, err := e.node().NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, VolumeCapability: blockCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	e.checkMethod(t, v.VolumeId)
	target := filepath.Join(e.base, "pods", "blk", "dev")
	if _, err := e.node().NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, TargetPath: target, VolumeCapability: blockCap}); err != nil {
		t.Fatal(err)
	}
	data := randBytes(4 << 20)
	f, err := os.OpenFile(target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(data, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	e.kill()
	e.start()
	dropCaches()
	f, err = os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 8<<20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if !bytes.Equal(got, data) {
		t.Fatal("block data differs after the plugin was killed and restarted")
	}
	st, err := e.node().NodeGetVolumeStats(ctx(t), &csi.NodeGetVolumeStatsRequest{VolumeId: v.VolumeId, VolumePath: target})
	if err != nil || st.Usage[0].Total != 32<<20 || st.VolumeCondition.GetAbnormal() {
		t.Fatalf("block stats: %+v %v", st, err)
	}
	if _, err := e.node().NodeUnpublishVolume(ctx(t), &csi.NodeUnpublishVolumeRequest{VolumeId: v.VolumeId, TargetPath: target}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.node().NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
}
