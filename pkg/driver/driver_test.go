package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/membudget"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

// fakeRuntime records what the driver asks of the data path.
type fakeRuntime struct {
	mu      sync.Mutex
	running map[string]volume.Spec
	err     error // engine error reported by Get
	health  engine.Health
	stages  int
	grows   int
}

func (f *fakeRuntime) Stage(_ context.Context, s volume.Spec) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running == nil {
		f.running = map[string]volume.Spec{}
	}
	f.running[s.ID] = s
	f.stages++
	return "/dev/fake-" + s.ID, nil
}

func (f *fakeRuntime) Unstage(_ context.Context, id, _ string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.running, id)
	return nil
}

func (f *fakeRuntime) Get(id string) (volume.Info, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.running[id]
	if !ok {
		return volume.Info{}, false
	}
	fi, _ := os.Stat(s.BackingPath)
	return volume.Info{Device: "/dev/fake-" + id, Size: fi.Size(), Err: f.err, Status: engine.Status{Health: f.health}}, true
}

// Grow checks that the pool grew the backing first, as the engine does.
func (f *fakeRuntime) Grow(_ context.Context, id string, size int64) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.running[id]
	if !ok {
		return "", fmt.Errorf("volume %s is not running", id)
	}
	if fi, err := os.Stat(s.BackingPath); err != nil || fi.Size() < size {
		return "", fmt.Errorf("grow %s to %d: the backing has not grown (%v)", id, size, err)
	}
	f.grows++
	return "/dev/fake-" + id, nil
}

func (f *fakeRuntime) Drain(context.Context, string) error { return nil }
func (f *fakeRuntime) IDs() []string                       { return nil }
func (f *fakeRuntime) FlushAll() error                     { return nil }
func (f *fakeRuntime) Shutdown() error                     { return nil }

// fakeMounter keeps a mount table in memory.
type fakeMounter struct {
	mu     sync.Mutex
	mounts map[string]string
}

func (m *fakeMounter) FormatAndMount(source, target, _ string, _ []string) error {
	return m.Mount(source, target, "", nil)
}

func (m *fakeMounter) Mount(source, target, _ string, _ []string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.mounts == nil {
		m.mounts = map[string]string{}
	}
	m.mounts[target] = source
	return nil
}

func (m *fakeMounter) Unmount(target string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.mounts[target]; !ok {
		return errors.New("not mounted")
	}
	delete(m.mounts, target)
	return nil
}

func (m *fakeMounter) IsMountPoint(path string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.mounts[path]
	return ok, nil
}

func (m *fakeMounter) Resize(string, string) error  { return nil }
func (m *fakeMounter) ResizeUnmounted(string) error { return nil }

func newTestDriver(t *testing.T, maxVolumes int) (*Driver, *fakeRuntime) {
	return newTestDriverIn(t, t.TempDir(), maxVolumes, 1<<40)
}

// newTestDriverIn makes a driver over the pools and state in dir (a
// restart, when called again), with a memory budget of budget bytes.
func newTestDriverIn(t *testing.T, dir string, maxVolumes int, budget int64) (*Driver, *fakeRuntime) {
	hdd, _ := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "hdd")})
	nvme, _ := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "nvme")})
	st, err := nodestate.Open(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	rt := &fakeRuntime{}
	d, err := New(Options{NodeID: "n1", HDD: hdd, NVMe: nvme, State: st, Runtime: rt, Mounter: &fakeMounter{},
		MaxVolumes: maxVolumes, MinCacheSize: 8 << 20, Budget: membudget.New(budget)})
	if err != nil {
		t.Fatal(err)
	}
	return d, rt
}

var blockCap = &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER}}

func createReq(name string, size int64, p map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{Name: name, Parameters: p, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{blockCap}}
}

func TestCreateIdempotentAndConflicts(t *testing.T) {
	d, _ := newTestDriver(t, 2)
	cs := ControllerServer{d: d}
	ctx := context.Background()
	a, err := cs.CreateVolume(ctx, createReq("a", 10<<20, map[string]string{"cacheSize": "9Mi"}))
	if err != nil {
		t.Fatal(err)
	}
	if a.Volume.CapacityBytes != 10<<20 || a.Volume.VolumeContext["cacheSize"] != fmt.Sprint(9<<20) {
		t.Fatalf("volume %+v", a.Volume)
	}
	b, err := cs.CreateVolume(ctx, createReq("a", 10<<20, map[string]string{"cacheSize": "9Mi", "csi.storage.k8s.io/pvc/name": "x"}))
	if err != nil || b.Volume.VolumeId != a.Volume.VolumeId {
		t.Fatalf("repeat: %v %v", b, err)
	}
	_, err = cs.CreateVolume(ctx, createReq("a", 20<<20, map[string]string{"cacheSize": "9Mi"}))
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other size: %v", err)
	}
	_, err = cs.CreateVolume(ctx, createReq("a", 10<<20, nil))
	if status.Code(err) != codes.AlreadyExists {
		t.Fatalf("other parameters: %v", err)
	}
	if _, err := cs.CreateVolume(ctx, createReq("b", 1<<20, nil)); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CreateVolume(ctx, createReq("c", 1<<20, nil)); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("beyond max volumes: %v", err)
	}
	// Default cache: the minimum (8 MiB) for a small volume.
	_, sz, err := d.opts.NVMe.Lookup(cacheName(volumeID("b")))
	if err != nil || sz != 8<<20 {
		t.Fatalf("default cache slice %d %v", sz, err)
	}
	// A requirement for another node cannot be met here.
	req := createReq("d", 1<<20, nil)
	req.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "n2"}}}}
	if _, err := cs.CreateVolume(ctx, req); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("other node: %v", err)
	}
	// GetCapacity for another node is zero.
	r, err := cs.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: "n2"}}})
	if err != nil || r.AvailableCapacity != 0 {
		t.Fatalf("capacity of n2: %v %v", r, err)
	}
	// A class with a bad parameter gets the pools' capacity, so its pods
	// are scheduled and CreateVolume's error names the parameter.
	plain, err := cs.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil {
		t.Fatal(err)
	}
	bad := map[string]string{"writebackThreshold": "101"}
	r, err = cs.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: bad})
	if err != nil || r.AvailableCapacity != plain.AvailableCapacity {
		t.Fatalf("capacity with a bad parameter: %v %v, want %d", r, err, plain.AvailableCapacity)
	}
	if _, err := cs.CreateVolume(ctx, createReq("bad", 1<<20, bad)); status.Code(err) != codes.InvalidArgument ||
		!strings.Contains(err.Error(), "writebackThreshold") {
		t.Fatalf("CreateVolume with a bad parameter: %v", err)
	}
}

func TestUnsupportedCapabilities(t *testing.T) {
	d, _ := newTestDriver(t, 0)
	cs := ControllerServer{d: d}
	for _, c := range []*csi.VolumeCapability{
		{AccessType: blockCap.AccessType, AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}},
		{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "btrfs"}}, AccessMode: blockCap.AccessMode},
		{AccessMode: blockCap.AccessMode},
	} {
		_, err := cs.CreateVolume(context.Background(), &csi.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csi.VolumeCapability{c}})
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("%v: %v", c, err)
		}
	}
}

func TestVolumeConditionAndReadopt(t *testing.T) {
	d, rt := newTestDriver(t, 0)
	cs, ns := ControllerServer{d: d}, NodeServer{d: d}
	ctx := context.Background()
	v, err := cs.CreateVolume(ctx, createReq("a", 8<<20, map[string]string{"writebackThreshold": "10"}))
	if err != nil {
		t.Fatal(err)
	}
	id := v.Volume.VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := ns.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: blockCap, VolumeContext: v.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	if got := rt.running[id].Tunables.WritebackThreshold; got != 10 {
		t.Fatalf("tunable from the volume context not applied: %d", got)
	}
	target := filepath.Join(t.TempDir(), "dev")
	if _, err := ns.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		TargetPath: target, VolumeCapability: blockCap}); err != nil {
		t.Fatal(err)
	}
	stats := func() *csi.VolumeCondition {
		r, err := ns.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
		if err != nil {
			t.Fatal(err)
		}
		if r.Usage[0].Total != 8<<20 {
			t.Fatalf("block size %d", r.Usage[0].Total)
		}
		return r.VolumeCondition
	}
	if c := stats(); c.Abnormal {
		t.Fatalf("healthy volume abnormal: %v", c)
	}
	rt.err = fmt.Errorf("cache device: %w", engine.ErrIO)
	if c := stats(); !c.Abnormal {
		t.Fatal("engine error not reported as abnormal")
	}
	rt.err = nil
	// Each health the engine reports reaches the condition, with its
	// message; a full, paced log alone is load, not a fault.
	for _, tc := range []struct {
		h        engine.Health
		abnormal bool
		words    []string
	}{
		{engine.Health{State: engine.HealthOK}, false, []string{"healthy"}},
		{engine.Health{State: engine.HealthPassThrough, Causes: []engine.Cause{{Kind: engine.CauseCacheFailed, Message: "the cache device failed (EIO) with nothing dirty"}}},
			true, []string{"pass-through", "the cache device failed (EIO) with nothing dirty"}},
		{engine.Health{State: engine.HealthFailed, StrandedBlocks: 3, Causes: []engine.Cause{{Kind: engine.CauseCacheFailed, Message: "3 dirty blocks"}}},
			true, []string{"cache failed holding data not yet written back", "3 dirty blocks"}},
		{engine.Health{State: engine.HealthDegraded, Causes: []engine.Cause{{Kind: engine.CauseWritebackFailing, Message: "writeback is failing"}, {Kind: engine.CauseBackingIOErrors, Message: "2 I/O errors"}}},
			true, []string{"degraded", "writeback is failing", "2 I/O errors"}},
		{engine.Health{State: engine.HealthDegraded, LostFlushedSegments: 2, Causes: []engine.Cause{{Kind: engine.CauseLostFlushedSegments, Message: "2 log segments lost"}}},
			true, []string{"2 log segments lost"}},
		{engine.Health{State: engine.HealthDegraded, Causes: []engine.Cause{{Kind: engine.CauseLogFull, Message: "the log is 90% full: writes are slowed"}}},
			false, []string{"the log is 90% full"}},
	} {
		rt.mu.Lock()
		rt.health = tc.h
		rt.mu.Unlock()
		c := stats()
		if c.Abnormal != tc.abnormal {
			t.Fatalf("health %+v: condition %v, want abnormal %v", tc.h, c, tc.abnormal)
		}
		for _, w := range tc.words {
			if !strings.Contains(c.Message, w) {
				t.Fatalf("health %+v: message %q does not say %q", tc.h, c.Message, w)
			}
		}
	}
	rt.mu.Lock()
	rt.health = engine.Health{}
	rt.mu.Unlock()
	// A volume whose recovery after a restart is running says so.
	d.markRecovering([]nodestate.Volume{{ID: id}})
	if c := stats(); !c.Abnormal || !strings.Contains(c.Message, "recovering") {
		t.Fatalf("recovering volume: %v", c)
	}
	d.doneRecovering(id)
	d.readoptFinished()

	// A new driver over the same state (a restarted plugin) re-adopts the
	// staged volume.
	rt2 := &fakeRuntime{}
	d2, err := New(Options{NodeID: "n1", HDD: d.opts.HDD, NVMe: d.opts.NVMe, State: d.opts.State, Runtime: rt2, Mounter: &fakeMounter{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Readopt(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := rt2.running[id]; !ok || rt2.running[id].Tunables.WritebackThreshold != 10 {
		t.Fatalf("not re-adopted: %+v", rt2.running)
	}
	// Delete refused while staged; fine after unstage, twice.
	if _, err := cs.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("delete staged: %v", err)
	}
	ns.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
	for i := 0; i < 2; i++ {
		if _, err := ns.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
		if _, err := cs.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}
}

func TestConfigStrict(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	os.WriteFile(good, []byte("pools:\n  hdd: {kind: directory, path: /a}\n  nvme: {kind: lvm, volumeGroup: vg}\ndefaultCacheFraction: 0.2\nminCacheSize: 64Mi\nmaxVolumes: 10\n"), 0o600)
	c, err := LoadFileConfig(good)
	if err != nil {
		t.Fatal(err)
	}
	if c.Pools.NVMe.VolumeGroup != "vg" || c.DefaultCacheFraction != 0.2 || c.MaxVolumes != 10 {
		t.Fatalf("%+v", c)
	}
	for _, bad := range []string{"pools: {hdd: {kind: directory, pth: /a}}\n", "colour: blue\n", "defaultCacheFraction: 2\n", "minCacheSize: lots\n"} {
		p := filepath.Join(dir, "bad.yaml")
		os.WriteFile(p, []byte(bad), 0o600)
		if _, err := LoadFileConfig(p); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestIdentityAndProbe(t *testing.T) {
	d, _ := newTestDriver(t, 0)
	is := IdentityServer{d: d}
	info, err := is.GetPluginInfo(context.Background(), &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != Name {
		t.Fatalf("%v %v", info, err)
	}
	if r, err := is.Probe(context.Background(), &csi.ProbeRequest{}); err != nil || !r.Ready.GetValue() {
		t.Fatalf("probe with usable pools: %v %v", r, err)
	}
	os.RemoveAll(d.opts.HDD.(*pool.Directory).Dir)
	if _, err := is.Probe(context.Background(), &csi.ProbeRequest{}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("probe with a missing pool: %v", err)
	}
	ni, err := NodeServer{d: d}.NodeGetInfo(context.Background(), &csi.NodeGetInfoRequest{})
	if err != nil || ni.NodeId != "n1" || ni.AccessibleTopology.Segments[TopologyKey] != "n1" || ni.MaxVolumesPerNode != 64 {
		t.Fatalf("node info %v %v", ni, err)
	}
}

// TestStagedSpecSurvivesRestart: what NodeStageVolume gives the data path
// (ramBufferSize's RAM buffers, a thin pool's TRIM passed down) is what a
// restarted plugin gives it when it re-adopts the volume. Re-adoption
// built its own spec and dropped BackingDiscard, so after a restart a
// thin pool's space was no longer given back on TRIM.
func TestStagedSpecSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	hdd, err := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "hdd"), Discard: true})
	if err != nil {
		t.Fatal(err)
	}
	nvme, _ := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "nvme")})
	st, err := nodestate.Open(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	rt := &fakeRuntime{}
	d, err := New(Options{NodeID: "n1", HDD: hdd, NVMe: nvme, State: st, Runtime: rt, Mounter: &fakeMounter{}, MinCacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cs, ns := ControllerServer{d: d}, NodeServer{d: d}
	ctx := context.Background()
	// More than half the cache slice is refused, naming the parameter.
	_, err = cs.CreateVolume(ctx, createReq("big", 64<<20, map[string]string{"cacheSize": "16Mi", "ramBufferSize": "9Mi"}))
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "ramBufferSize") {
		t.Fatalf("ramBufferSize over half the slice: %v", err)
	}
	v, err := cs.CreateVolume(ctx, createReq("a", 64<<20, map[string]string{"cacheSize": "32Mi", "ramBufferSize": "3Mi"}))
	if err != nil {
		t.Fatal(err)
	}
	id := v.Volume.VolumeId
	staging := filepath.Join(t.TempDir(), "staging")
	if _, err := ns.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging,
		VolumeCapability: blockCap, VolumeContext: v.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	staged := rt.running[id]
	if staged.RAMBuffers != 6 || !staged.BackingDiscard {
		t.Fatalf("staged spec: %d RAM buffers (want 6 of 512 KiB for 3Mi), BackingDiscard %v (want true on a discard pool)",
			staged.RAMBuffers, staged.BackingDiscard)
	}
	rt2 := &fakeRuntime{}
	d2, err := New(Options{NodeID: "n1", HDD: hdd, NVMe: nvme, State: st, Runtime: rt2, Mounter: &fakeMounter{}, MinCacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Readopt(ctx); err != nil {
		t.Fatal(err)
	}
	if got := rt2.running[id]; got != staged {
		t.Fatalf("re-adopted with %+v, staged with %+v", got, staged)
	}
}
