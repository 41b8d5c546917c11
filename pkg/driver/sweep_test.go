package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/pkg/blockdev"
	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

// The retry sweep (pebble's error_test.go style): for every step of a
// volume's life and every kind of failure, fail the k-th operation of that
// kind during the step, for k = 0, 1, 2, ... until the step runs without
// reaching the fault; after each failure, retry the step and assert that
// the retry succeeds, that a second retry is harmless, that the node is in
// exactly the state the step promises (mounts, attachments, runtimes,
// sockets, buffer files, state records), and that the rest of the life
// runs to a node with nothing left.

// injector fails the k-th operation of one kind, once.
type injector struct {
	mu    sync.Mutex
	kind  string
	left  int
	fired bool
	hits  map[string]int
}

var errInjected = errors.New("injected failure")

func (in *injector) arm(kind string, k int) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.kind, in.left, in.fired = kind, k, false
}

func (in *injector) disarm() (fired bool) {
	in.mu.Lock()
	defer in.mu.Unlock()
	fired = in.fired
	in.kind, in.fired = "", false
	return fired
}

func (in *injector) hit(kind, what string) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.hits == nil {
		in.hits = map[string]int{}
	}
	in.hits[kind]++
	if in.kind != kind || in.fired {
		return nil
	}
	if in.left > 0 {
		in.left--
		return nil
	}
	in.fired = true
	return fmt.Errorf("%w: %s %s: %w", errInjected, kind, what, syscall.EIO)
}

// failingMounter wraps fakeMounter.
type failingMounter struct {
	*fakeMounter
	in *injector
}

func (m failingMounter) FormatAndMount(source, target, fs string, o []string) error {
	if err := m.in.hit("mounter", "format and mount"); err != nil {
		return err
	}
	return m.fakeMounter.FormatAndMount(source, target, fs, o)
}

func (m failingMounter) Mount(source, target, fs string, o []string) error {
	if err := m.in.hit("mounter", "mount"); err != nil {
		return err
	}
	return m.fakeMounter.Mount(source, target, fs, o)
}

func (m failingMounter) Unmount(target string) error {
	if err := m.in.hit("mounter", "unmount"); err != nil {
		return err
	}
	return m.fakeMounter.Unmount(target)
}

func (m failingMounter) IsMountPoint(p string) (bool, error) {
	if err := m.in.hit("mounter", "is mount point"); err != nil {
		return false, err
	}
	return m.fakeMounter.IsMountPoint(p)
}

func (m failingMounter) Resize(dev, p string) error {
	if err := m.in.hit("mounter", "resize"); err != nil {
		return err
	}
	return m.fakeMounter.Resize(dev, p)
}

func (m failingMounter) ResizeUnmounted(dev string) error {
	if err := m.in.hit("mounter", "resize unmounted"); err != nil {
		return err
	}
	return m.fakeMounter.ResizeUnmounted(dev)
}

// failingState wraps the real store.
type failingState struct {
	*nodestate.Store
	in *injector
}

func (s failingState) Put(v nodestate.Volume) error {
	if err := s.in.hit("state", "put"); err != nil {
		return err
	}
	return s.Store.Put(v)
}

func (s failingState) Delete(id string) error {
	if err := s.in.hit("state", "delete"); err != nil {
		return err
	}
	return s.Store.Delete(id)
}

// failingPool wraps a real pool; reads are not failed (they are checks).
type failingPool struct {
	pool.Pool
	in *injector
}

func (p failingPool) Create(name string, size int64) (string, error) {
	if err := p.in.hit("pool", "create "+name); err != nil {
		return "", err
	}
	return p.Pool.Create(name, size)
}

func (p failingPool) Expand(name string, size int64) error {
	if err := p.in.hit("pool", "expand "+name); err != nil {
		return err
	}
	return p.Pool.Expand(name, size)
}

func (p failingPool) Delete(name string) error {
	if err := p.in.hit("pool", "delete "+name); err != nil {
		return err
	}
	return p.Pool.Delete(name)
}

// sweepAttacher plays the kernel: it negotiates over the volume's real
// NBD socket and holds the connection while attached.
type sweepAttacher struct {
	in    *injector
	mu    sync.Mutex
	conns map[string]net.Conn // device -> connection
	n     int
	// per volume: its device, socket and the size the "kernel" shows
	devs, socks map[string]string
	sizes       map[string]int64
}

func (a *sweepAttacher) Attach(ctx context.Context, o attach.Options) (attach.Attachment, error) {
	if err := a.in.hit("attacher", "attach"); err != nil {
		return attach.Attachment{}, err
	}
	c, info, err := attach.UnixDialer(o.Socket, o.Export, 5*time.Second)(ctx)
	if err != nil {
		return attach.Attachment{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.n++
	dev := fmt.Sprintf("/dev/sweep%d", a.n)
	a.conns[dev] = c
	a.devs[o.VolumeID], a.socks[o.VolumeID], a.sizes[o.VolumeID] = dev, o.Socket, int64(info.Size)
	return attach.Attachment{Device: dev, Method: "fake", VolumeID: o.VolumeID, Size: int64(info.Size), Flags: info.Flags}, nil
}

func (a *sweepAttacher) Detach(_ context.Context, _, device string) error {
	if err := a.in.hit("attacher", "detach"); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if c := a.conns[device]; c != nil {
		c.Close()
	}
	delete(a.conns, device)
	return nil
}

// Resize checks that the export already serves the new size (the engine
// grew before the device), as a kernel's device then addresses it.
func (a *sweepAttacher) Resize(ctx context.Context, _, volumeID string, size int64) (attach.Attachment, error) {
	if err := a.in.hit("attacher", "resize"); err != nil {
		return attach.Attachment{}, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	dev, sock := a.devs[volumeID], a.socks[volumeID]
	if dev == "" || a.conns[dev] == nil {
		return attach.Attachment{}, fmt.Errorf("sweep resize: %s is not attached", volumeID)
	}
	c, info, err := attach.UnixDialer(sock, "", 5*time.Second)(ctx)
	if err != nil {
		return attach.Attachment{}, err
	}
	c.Close()
	if int64(info.Size) < size {
		return attach.Attachment{}, fmt.Errorf("sweep resize of %s to %d: the export serves only %d", dev, size, info.Size)
	}
	a.sizes[volumeID] = size
	return attach.Attachment{Device: dev, Method: "fake", VolumeID: volumeID, Size: size, Flags: info.Flags}, nil
}

func (a *sweepAttacher) attached() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// devicePair is a volume's in-memory devices: Counting(Faulty(Mem)), so a
// sweep can fail the k-th read, write or flush of either and see whether
// the fault was reached.
type devicePair struct {
	cache, backing    *blockdev.Counting
	cacheF, backingF  *blockdev.Faulty
	cacheMem, backMem *blockdev.Mem
}

type sweepEnv struct {
	t      *testing.T
	d      *Driver
	in     *injector
	mnt    *fakeMounter
	att    *sweepAttacher
	mgr    *volume.Manager
	runDir string
	dir    string

	mu   sync.Mutex
	devs map[string]*devicePair
	// armed is the device fault of the step running, applied to devices
	// made during it too (Stage opens them).
	armedKind string
	armedK    int

	id, staging, target string
}

func newSweepEnv(t *testing.T) *sweepEnv {
	t.Helper()
	dir := t.TempDir()
	// Socket paths must stay under 108 bytes: not under the test's name.
	runDir, err := os.MkdirTemp("", "wbsw")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(runDir) })
	e := &sweepEnv{t: t, in: &injector{}, mnt: &fakeMounter{}, dir: dir, runDir: runDir,
		devs: map[string]*devicePair{}}
	e.att = &sweepAttacher{in: e.in, conns: map[string]net.Conn{}, devs: map[string]string{}, socks: map[string]string{}, sizes: map[string]int64{}}
	hdd, err := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "hdd")})
	if err != nil {
		t.Fatal(err)
	}
	nvme, err := pool.New(pool.Config{Kind: pool.KindDirectory, Path: filepath.Join(dir, "nvme")})
	if err != nil {
		t.Fatal(err)
	}
	st, err := nodestate.Open(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	e.mgr = &volume.Manager{RunDir: e.runDir, AttachStateDir: filepath.Join(dir, "attach"), Attacher: e.att,
		Devices: e.devices}
	e.d, err = New(Options{NodeID: "n1", HDD: failingPool{hdd, e.in}, NVMe: failingPool{nvme, e.in},
		State: failingState{st, e.in}, Runtime: e.mgr, Mounter: failingMounter{e.mnt, e.in}, MinCacheSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	e.staging = filepath.Join(dir, "staging")
	e.target = filepath.Join(dir, "target")
	t.Cleanup(func() { _ = e.mgr.Shutdown() })
	return e
}

// devices gives a volume its in-memory devices, sized as its pool files;
// a grown backing file gets a grown device with the old contents.
func (e *sweepEnv) devices(s volume.Spec) (blockdev.Device, blockdev.Device, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	cfi, err := os.Stat(s.CachePath)
	if err != nil {
		return nil, nil, err
	}
	bfi, err := os.Stat(s.BackingPath)
	if err != nil {
		return nil, nil, err
	}
	p := e.devs[s.ID]
	if p == nil {
		p = &devicePair{cacheMem: blockdev.NewMem(cfi.Size(), nil), backMem: blockdev.NewMem(bfi.Size(), nil)}
		e.devs[s.ID] = p
	}
	if bfi.Size() > p.backMem.Size() {
		grown := blockdev.NewMem(bfi.Size(), nil)
		buf := make([]byte, 1<<20)
		for off := int64(0); off < p.backMem.Size(); off += int64(len(buf)) {
			if _, err := p.backMem.ReadAt(buf, off); err != nil {
				return nil, nil, err
			}
			if _, err := grown.WriteAt(buf, off); err != nil {
				return nil, nil, err
			}
		}
		if err := grown.Flush(); err != nil {
			return nil, nil, err
		}
		p.backMem = grown
	}
	p.cacheF, p.backingF = blockdev.NewFaulty(p.cacheMem), blockdev.NewFaulty(p.backMem)
	p.cache, p.backing = blockdev.NewCounting(p.cacheF), blockdev.NewCounting(p.backingF)
	if e.armedKind != "" {
		armFaulty(p, e.armedKind, e.armedK)
	}
	return p.cache, p.backing, nil
}

var mountCap = &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}

const (
	sweepSize   = 16 << 20
	sweepGrown  = 24 << 20 // online, while published
	sweepGrown2 = 32 << 20 // offline, while unstaged
)

// A volume's life, step by step; each step's promise is its state.
type sweepStep struct {
	name string
	run  func(e *sweepEnv, ctx context.Context) error
	want sweepState
}

type sweepState struct {
	exists, staged, published bool
	capacity                  int64
}

var sweepLife = []sweepStep{
	{"CreateVolume", (*sweepEnv).create, sweepState{exists: true, capacity: sweepSize}},
	{"NodeStageVolume", (*sweepEnv).stage, sweepState{exists: true, staged: true, capacity: sweepSize}},
	{"NodePublishVolume", (*sweepEnv).publish, sweepState{exists: true, staged: true, published: true, capacity: sweepSize}},
	{"ControllerExpandVolume(online)", expandTo(sweepGrown), sweepState{exists: true, staged: true, published: true, capacity: sweepGrown}},
	{"NodeExpandVolume(online)", nodeExpandTo(sweepGrown), sweepState{exists: true, staged: true, published: true, capacity: sweepGrown}},
	{"NodeUnpublishVolume", (*sweepEnv).unpublish, sweepState{exists: true, staged: true, capacity: sweepGrown}},
	{"NodeUnstageVolume", (*sweepEnv).unstage, sweepState{exists: true, capacity: sweepGrown}},
	{"ControllerExpandVolume", expandTo(sweepGrown2), sweepState{exists: true, capacity: sweepGrown2}},
	{"NodeStageVolume(grown)", (*sweepEnv).stage, sweepState{exists: true, staged: true, capacity: sweepGrown2}},
	{"NodeExpandVolume", nodeExpandTo(sweepGrown2), sweepState{exists: true, staged: true, capacity: sweepGrown2}},
	{"NodeUnstageVolume(grown)", (*sweepEnv).unstage, sweepState{exists: true, capacity: sweepGrown2}},
	{"DeleteVolume", (*sweepEnv).delete, sweepState{}},
}

func (e *sweepEnv) create(ctx context.Context) error {
	r, err := ControllerServer{d: e.d}.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-1",
		CapacityRange: &csi.CapacityRange{RequiredBytes: sweepSize}, VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
	if err == nil {
		e.id = r.Volume.VolumeId
	}
	return err
}

// createStaged creates a volume of size bytes with StorageClass params and
// stages it with the volume context CreateVolume gave, as kubelet does.
func (e *sweepEnv) createStaged(t *testing.T, name string, size int64, params map[string]string) {
	t.Helper()
	ctx := context.Background()
	r, err := ControllerServer{d: e.d}.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, Parameters: params,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
	if err != nil {
		t.Fatal(err)
	}
	e.id = r.Volume.VolumeId
	if _, err := (NodeServer{d: e.d}).NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: e.id,
		StagingTargetPath: e.staging, VolumeCapability: mountCap, VolumeContext: r.Volume.VolumeContext}); err != nil {
		t.Fatal(err)
	}
}

func (e *sweepEnv) stage(ctx context.Context) error {
	_, err := NodeServer{d: e.d}.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: e.id,
		StagingTargetPath: e.staging, VolumeCapability: mountCap})
	return err
}

func (e *sweepEnv) publish(ctx context.Context) error {
	_, err := NodeServer{d: e.d}.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: e.id,
		StagingTargetPath: e.staging, TargetPath: e.target, VolumeCapability: mountCap})
	return err
}

func (e *sweepEnv) unpublish(ctx context.Context) error {
	_, err := NodeServer{d: e.d}.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: e.id, TargetPath: e.target})
	return err
}

func (e *sweepEnv) unstage(ctx context.Context) error {
	_, err := NodeServer{d: e.d}.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: e.id, StagingTargetPath: e.staging})
	return err
}

func expandTo(size int64) func(e *sweepEnv, ctx context.Context) error {
	return func(e *sweepEnv, ctx context.Context) error {
		_, err := ControllerServer{d: e.d}.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: e.id,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: mountCap})
		return err
	}
}

func nodeExpandTo(size int64) func(e *sweepEnv, ctx context.Context) error {
	return func(e *sweepEnv, ctx context.Context) error {
		_, err := NodeServer{d: e.d}.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: e.id, VolumePath: e.staging,
			CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: mountCap})
		return err
	}
}

func (e *sweepEnv) delete(ctx context.Context) error {
	_, err := ControllerServer{d: e.d}.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: e.id})
	return err
}

// check asserts that the node is in state w and that nothing else of the
// volume exists.
func (e *sweepEnv) check(w sweepState) {
	t := e.t
	t.Helper()
	id := e.id
	v, ok := e.d.opts.State.Get(id)
	if ok != w.exists {
		t.Errorf("record exists=%v, want %v", ok, w.exists)
	}
	if ok && (v.Staged != nil) != w.staged {
		t.Errorf("record staged=%v, want %v", v.Staged != nil, w.staged)
	}
	if ok && v.Capacity != w.capacity {
		t.Errorf("record capacity %d, want %d", v.Capacity, w.capacity)
	}
	for _, p := range []pool.Pool{e.d.opts.HDD, e.d.opts.NVMe} {
		name := id
		if p == e.d.opts.NVMe {
			name = cacheName(id)
		}
		if _, _, err := p.Lookup(name); (err == nil) != w.exists {
			t.Errorf("pool %s: %s exists=%v, want %v", p, name, err == nil, w.exists)
		}
	}
	var wantMounts []string
	if w.staged {
		wantMounts = append(wantMounts, e.staging)
	}
	if w.published {
		wantMounts = append(wantMounts, e.target)
	}
	e.mnt.mu.Lock()
	var mounts []string
	for m := range e.mnt.mounts {
		mounts = append(mounts, m)
	}
	e.mnt.mu.Unlock()
	sort.Strings(mounts)
	if strings.Join(mounts, ",") != strings.Join(wantMounts, ",") {
		t.Errorf("mounts %v, want %v", mounts, wantMounts)
	}
	wantRunning := 0
	if w.staged {
		wantRunning = 1
	}
	if n := len(e.mgr.IDs()); n != wantRunning {
		t.Errorf("%d runtimes, want %d", n, wantRunning)
	}
	if n := e.att.attached(); n != wantRunning {
		t.Errorf("%d attachments, want %d", n, wantRunning)
	}
	for _, f := range []string{id + ".sock", id + ".control", id + ".buf"} {
		_, err := os.Stat(filepath.Join(e.runDir, f))
		if (err == nil) != w.staged {
			t.Errorf("run dir: %s exists=%v, want %v", f, err == nil, w.staged)
		}
	}
	if w.staged {
		info, ok := e.mgr.Get(id)
		if !ok || info.Size != w.capacity {
			t.Errorf("served size %d (running %v), want %d", info.Size, ok, w.capacity)
		}
		e.att.mu.Lock()
		dev := e.att.sizes[id]
		e.att.mu.Unlock()
		if dev != w.capacity {
			t.Errorf("attached device of %d bytes, want %d", dev, w.capacity)
		}
		if c, err := net.Dial("unix", filepath.Join(e.runDir, id+".sock")); err != nil {
			t.Errorf("NBD socket: %v", err)
		} else {
			c.Close()
		}
	}
}

// faultKinds are the failures swept: one-shot failures of the seams the
// driver calls, and device faults that last for the whole step.
var faultKinds = []string{"mounter", "state", "pool", "attacher",
	"cache-write", "cache-flush", "cache-read", "backing-write", "backing-flush", "backing-read"}

func (e *sweepEnv) armDevice(kind string, k int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.armedKind, e.armedK = kind, k
	for _, p := range e.devs {
		armFaulty(p, kind, k)
	}
}

func armFaulty(p *devicePair, kind string, k int) {
	f := p.cacheF
	if strings.HasPrefix(kind, "backing") {
		f = p.backingF
	}
	switch {
	case strings.HasSuffix(kind, "-write"):
		f.FailWritesAfter(k, syscall.EIO)
	case strings.HasSuffix(kind, "-flush"):
		f.FailFlushesAfter(k, syscall.EIO)
	case strings.HasSuffix(kind, "-read"):
		f.FailReadsAfter(k, syscall.EIO)
	}
}

func (e *sweepEnv) deviceErrors() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	var n int64
	for _, p := range e.devs {
		for _, c := range []*blockdev.Counting{p.cache, p.backing} {
			if c != nil {
				s := c.Snapshot()
				n += s.ReadErrors + s.WriteErrors + s.FlushErrors
			}
		}
	}
	return n
}

func (e *sweepEnv) resetDevices() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.armedKind = ""
	for _, p := range e.devs {
		if p.cacheF != nil {
			p.cacheF.Reset()
			p.backingF.Reset()
		}
	}
}

func isDeviceKind(kind string) bool { return strings.Contains(kind, "-") }

// TestRetrySweep runs the sweep; its size is logged (steps x kinds, and the
// failure points reached).
func TestRetrySweep(t *testing.T) {
	points := 0
	for i, st := range sweepLife {
		for _, kind := range faultKinds {
			for k := 0; ; k++ {
				if k > 200 {
					t.Fatalf("%s/%s: still failing at k=%d", st.name, kind, k)
				}
				reached := sweepOne(t, i, kind, k)
				if !reached {
					break
				}
				points++
			}
		}
	}
	t.Logf("retry sweep: %d steps x %d failure kinds, %d failure points injected", len(sweepLife), len(faultKinds), points)
}

// sweepOne runs the life with the k-th operation of kind failing during
// step i and reports whether the fault was reached.
func sweepOne(t *testing.T, i int, kind string, k int) (reached bool) {
	name := fmt.Sprintf("%s/%s/%d", sweepLife[i].name, kind, k)
	t.Run(name, func(t *testing.T) {
		e := newSweepEnv(t)
		ctx := context.Background()
		for _, st := range sweepLife[:i] {
			if err := st.run(e, ctx); err != nil {
				t.Fatalf("%s before the fault: %v", st.name, err)
			}
		}
		st := sweepLife[i]
		before := e.deviceErrors()
		if isDeviceKind(kind) {
			e.armDevice(kind, k)
		} else {
			e.in.arm(kind, k)
		}
		err := st.run(e, ctx)
		if isDeviceKind(kind) {
			e.resetDevices()
			reached = e.deviceErrors() > before
		} else {
			reached = e.in.disarm()
		}
		if err != nil {
			if !reached {
				t.Fatalf("%s failed without the fault: %v", st.name, err)
			}
			if s, ok := status.FromError(err); !ok || s.Code() == codes.Unknown || s.Code() == codes.OK {
				t.Errorf("%s: error is not a gRPC status: %v", st.name, err)
			}
			if !isDeviceKind(kind) && st.name == "NodeStageVolume" && status.Code(err) == codes.Internal {
				// A final error: kubelet may never unstage. Nothing may
				// be left running.
				e.check(sweepLife[i-1].want)
			}
			if err := st.run(e, ctx); err != nil {
				t.Fatalf("retry of %s after %v: %v", st.name, err, err)
			}
		}
		if err := st.run(e, ctx); err != nil {
			t.Fatalf("repeated %s: %v", st.name, err)
		}
		e.check(st.want)
		for _, rest := range sweepLife[i+1:] {
			if err := rest.run(e, ctx); err != nil {
				t.Fatalf("%s after the retried %s: %v", rest.name, st.name, err)
			}
			e.check(rest.want)
		}
	})
	return reached
}

// A call on a busy volume is refused at once with Aborted.
func TestBusyVolumeAborted(t *testing.T) {
	e := newSweepEnv(t)
	ctx := context.Background()
	if err := e.create(ctx); err != nil {
		t.Fatal(err)
	}
	unlock, ok := e.d.locks.tryLock(e.id)
	if !ok {
		t.Fatal("lock of an idle volume refused")
	}
	start := time.Now()
	for _, st := range sweepLife[1:] {
		if err := st.run(e, ctx); status.Code(err) != codes.Aborted {
			t.Errorf("%s on a busy volume: %v, want Aborted", st.name, err)
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("refusals took %s: they must not wait", d)
	}
	unlock()
	if err := e.stage(ctx); err != nil {
		t.Fatalf("after the lock was released: %v", err)
	}
}

// A call whose deadline has passed stops with DeadlineExceeded and leaves
// nothing running.
func TestDeadlineHonoured(t *testing.T) {
	e := newSweepEnv(t)
	if err := e.create(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	if err := e.stage(ctx); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("stage past its deadline: %v", err)
	}
	e.check(sweepLife[0].want)
	if err := e.stage(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.check(sweepLife[1].want)
}

// TestRAMBufferSizeReachesTheEngine: a StorageClass's ramBufferSize sizes
// the RAM buffers of the engine the real runtime starts (in-memory
// devices), and the default applies without it.
func TestRAMBufferSizeReachesTheEngine(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		params map[string]string
		want   int
	}{{map[string]string{"cacheSize": "64Mi", "ramBufferSize": "3Mi"}, 6}, {map[string]string{"cacheSize": "64Mi"}, 16}} {
		e := newSweepEnv(t)
		e.createStaged(t, "pvc-1", 256<<20, c.params)
		info, ok := e.mgr.Get(e.id)
		if !ok {
			t.Fatal("staged volume not running")
		}
		if want := int64(engine.BufferBytes(layout.DefaultSegmentSize, c.want)); info.Status.Memory.Buffers != want {
			t.Errorf("%v: the engine holds %d bytes of RAM buffers, want %d buffers (%d bytes)", c.params, info.Status.Memory.Buffers, c.want, want)
		}
		if err := e.unstage(ctx); err != nil {
			t.Fatal(err)
		}
	}
}
