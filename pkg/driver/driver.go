// Package driver is the CSI plugin writeboost.csi.io: the Identity,
// Controller and Node services over gRPC, for the volumes of one node.
//
// Every node runs the controller for its own volumes (csi-provisioner in
// --node-deployment mode), so the controller allocates from the node's
// pools directly. A volume is a backing volume on the HDD pool and a cache
// slice on the NVMe pool; staging it starts the cache engine, serves it
// over NBD on a private socket and attaches that as a block device
// (package volume), which is then formatted and mounted, or bound as a raw
// block device.
//
// Conventions, after TopoLVM's driver: each call validates its request
// first, takes the volume's lock (a call on a busy volume gets Aborted at
// once, as in csi-driver-host-path), checks the current state so that a
// repeated call is harmless, and turns errors into gRPC codes only here at
// the edge (the end of the call's context keeps its code). A retry after
// any single failure converges, and a NodeStageVolume that fails on a
// volume not staged before undoes itself, since kubelet may never unstage
// it (sweep_test.go fails every step of a volume's life in turn). The node's record of volumes (package nodestate) is written
// atomically before a call reports success, and a restarted plugin
// re-adopts every staged volume (Readopt).
//
// Expansion is online: ControllerExpandVolume grows the backing in its
// pool, and for a staged volume the running engine (crash-safely:
// engine.Grow) and the attached device (attach.Resize: the kernel nbd
// device over netlink, the fallback's loop device by its sizelimit), in
// that order, each step a no-op once done, so a retry after a failure at
// any step converges; NodeExpandVolume then grows the mounted filesystem
// (resize2fs, xfs_growfs). An unstaged volume takes the grown backing
// when next staged (engine.Options.AllowBackingGrowth), its ext4 grown
// before mounting. Static volumes (volume context "backingDevice") are written back
// completely when unstaged, so their device can be used without us.
package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/membudget"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

// Name is the CSI driver name.
const Name = "writeboost.csi.io"

// TopologyKey is the topology segment naming the node of a volume.
const TopologyKey = "topology.writeboost.csi.io/node"

// Volume context keys set by CreateVolume (besides the StorageClass
// parameters) or by the author of a static PV.
const (
	// CtxBackingDevice names an existing block device on the node to use
	// as the backing of a static PV.
	CtxBackingDevice = "backingDevice"
)

// Runtime runs the data path of staged volumes (package volume in
// production; a fake in unit tests).
type Runtime interface {
	Stage(ctx context.Context, s volume.Spec) (device string, err error)
	Unstage(ctx context.Context, id, device string) error
	Drain(ctx context.Context, id string) error
	// Grow grows a running volume live, after its backing grew.
	Grow(ctx context.Context, id string, size int64) (device string, err error)
	Get(id string) (volume.Info, bool)
	IDs() []string
	FlushAll() error
	Shutdown() error
}

// State is the node's record of volumes (*nodestate.Store; tests wrap it
// to inject failures).
type State interface {
	Get(id string) (nodestate.Volume, bool)
	List() []nodestate.Volume
	Put(v nodestate.Volume) error
	Delete(id string) error
}

// Options configure a Driver.
type Options struct {
	NodeID               string
	Version              string
	HDD, NVMe            pool.Pool
	State                State
	Runtime              Runtime
	MaxVolumes           int
	DefaultCacheFraction float64
	MinCacheSize         int64
	// Budget bounds the memory of staged volumes (nil: membudget's
	// DefaultLimit).
	Budget *membudget.Budget
	// Mounter does mounts; nil uses the system's.
	Mounter Mounter
}

// Driver implements the CSI services.
type Driver struct {
	opts  Options
	locks keyLocks
	mnt   Mounter
	// rec tracks the re-adoption after a restart (Readopt).
	rec struct {
		sync.Mutex
		ids     map[string]bool // volumes whose recovery is running
		pending int             // Readopt calls not finished
	}
}

// New returns a driver.
func New(o Options) (*Driver, error) {
	if o.NodeID == "" {
		return nil, errors.New("driver: node id is required")
	}
	if o.HDD == nil || o.NVMe == nil || o.State == nil || o.Runtime == nil {
		return nil, errors.New("driver: pools, state and runtime are required")
	}
	if o.MaxVolumes <= 0 {
		o.MaxVolumes = 64
	}
	if o.DefaultCacheFraction <= 0 || o.DefaultCacheFraction > 1 {
		o.DefaultCacheFraction = 0.1
	}
	if o.MinCacheSize <= 0 {
		o.MinCacheSize = 64 << 20
	}
	if o.MinCacheSize < params.MinCacheSize {
		o.MinCacheSize = params.MinCacheSize // the engine's own floor
	}
	if o.Budget == nil {
		limit, _ := membudget.DefaultLimit()
		o.Budget = membudget.New(limit)
	}
	m := o.Mounter
	if m == nil {
		m = newSystemMounter()
	}
	return &Driver{opts: o, mnt: m}, nil
}

// keyLocks serialises calls per volume (TopoLVM's lock.go). A call that
// finds its volume busy is refused with Aborted at once rather than queued
// (csi-driver-host-path does the same): the caller retries with backoff,
// and a waiting call would hold its deadline hostage to another's.
type keyLocks struct {
	mu    sync.Mutex
	locks map[string]bool
}

// tryLock takes key's lock, or reports false when it is held.
func (k *keyLocks) tryLock(key string) (unlock func(), ok bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.locks == nil {
		k.locks = map[string]bool{}
	}
	if k.locks[key] {
		return nil, false
	}
	k.locks[key] = true
	return func() {
		k.mu.Lock()
		delete(k.locks, key)
		k.mu.Unlock()
	}, true
}

// lockVolume takes the volume's lock or returns the Aborted error, or
// Unavailable while the volume recovers after a restart of the plugin.
func (d *Driver) lockVolume(id string) (func(), error) {
	if d.recovering(id) {
		return nil, status.Errorf(codes.Unavailable, "volume %s is recovering after a restart of the plugin (replaying its cache log); try again shortly", id)
	}
	unlock, ok := d.locks.tryLock(id)
	if !ok {
		return nil, status.Errorf(codes.Aborted, "an operation on volume %s is already in progress", id)
	}
	return unlock, nil
}

// grpcError turns an error of the layers below into a gRPC status, here
// at the edge and nowhere else: the context's end keeps its own code, so
// the caller knows that the call may still be in progress and retries.
func grpcError(code codes.Code, err error, format string, args ...any) error {
	if _, ok := status.FromError(err); ok {
		return err // already a status (from a helper at this edge)
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, pool.ErrNoSpace):
		code = codes.ResourceExhausted
	}
	return status.Errorf(code, "%s: %v", fmt.Sprintf(format, args...), err)
}

// Readopt restarts the data path of every volume recorded as staged, after
// a restart of the plugin: the engine recovers, serves again and keeps (or
// reattaches) its device, so mounted filesystems carry on. Volumes come
// back in parallel (recoveries are I/O bound, each on its own devices);
// until a volume's recovery ends, calls on it answer Unavailable, and until
// all have, Probe reports not ready. ctx bounds the recoveries (the
// plugin's shutdown abandons them; an abandoned recovery is a crash, which
// the next one handles).
func (d *Driver) Readopt(ctx context.Context) error {
	return d.finishReadopt(ctx, d.beginReadopt())
}

// beginReadopt marks every staged volume as recovering (and the plugin as
// not ready) and returns them; finishReadopt brings them back. Serve calls
// the first before it listens and runs the second in the background.
func (d *Driver) beginReadopt() []nodestate.Volume {
	var staged []nodestate.Volume
	for _, v := range d.opts.State.List() {
		if v.Staged != nil {
			staged = append(staged, v)
		}
	}
	d.markRecovering(staged)
	return staged
}

func (d *Driver) finishReadopt(ctx context.Context, staged []nodestate.Volume) error {
	defer d.readoptFinished()
	start := time.Now()
	sem := make(chan struct{}, readoptParallel)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for _, v := range staged {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer d.doneRecovering(v.ID)
			sem <- struct{}{}
			defer func() { <-sem }()
			vstart := time.Now()
			err := d.readoptOne(ctx, v)
			if err != nil {
				klog.ErrorS(err, "Re-adopting a staged volume failed", "volume", v.ID)
				mu.Lock()
				errs = append(errs, fmt.Errorf("volume %s: %w", v.ID, err))
				mu.Unlock()
				return
			}
			klog.InfoS("Re-adopted staged volume", "volume", v.ID, "seconds", time.Since(vstart).Seconds())
		}()
	}
	wg.Wait()
	klog.InfoS("Re-adoption done", "volumes", len(staged), "failed", len(errs), "seconds", time.Since(start).Seconds())
	return errors.Join(errs...)
}

// readoptParallel bounds the recoveries run at once.
const readoptParallel = 8

// markRecovering marks vs as recovering and the driver as not ready.
func (d *Driver) markRecovering(vs []nodestate.Volume) {
	d.rec.Lock()
	defer d.rec.Unlock()
	if d.rec.ids == nil {
		d.rec.ids = map[string]bool{}
	}
	for _, v := range vs {
		d.rec.ids[v.ID] = true
	}
	d.rec.pending++
}

func (d *Driver) doneRecovering(id string) {
	d.rec.Lock()
	defer d.rec.Unlock()
	delete(d.rec.ids, id)
}

// readoptFinished ends the not-ready period of one Readopt.
func (d *Driver) readoptFinished() {
	d.rec.Lock()
	defer d.rec.Unlock()
	d.rec.pending--
}

// recovering reports whether id's recovery after a restart is running.
func (d *Driver) recovering(id string) bool {
	d.rec.Lock()
	defer d.rec.Unlock()
	return d.rec.ids[id]
}

// recoveringIDs lists the volumes whose recovery is running (metrics).
func (d *Driver) recoveringIDs() []string {
	d.rec.Lock()
	defer d.rec.Unlock()
	ids := make([]string, 0, len(d.rec.ids))
	for id := range d.rec.ids {
		ids = append(ids, id)
	}
	return ids
}

// readopting reports how many volumes are still recovering, and whether a
// re-adoption is running at all.
func (d *Driver) readopting() (int, bool) {
	d.rec.Lock()
	defer d.rec.Unlock()
	return len(d.rec.ids), d.rec.pending > 0
}

func (d *Driver) readoptOne(ctx context.Context, v nodestate.Volume) error {
	p, err := params.Parse(v.Params)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if need, err := memoryNeed(v.ID, v.CacheSize, ramBuffersOf(v)); err == nil {
		d.forceMemory(v.ID, need) // it was staged: counted, never refused
	}
	dev, err := d.opts.Runtime.Stage(ctx, d.stagedSpec(v, p))
	if err != nil {
		return err
	}
	if dev != v.Staged.Device {
		// The old device is gone (a reboot emptied /run, or the attachment
		// died with its processes): the old mounts are dead. Record the new
		// device; kubelet's next NodeStage mounts it again.
		klog.InfoS("Staged volume came back on another device", "volume", v.ID, "old", v.Staged.Device, "new", dev)
		v.Staged.Device = dev
		return d.opts.State.Put(v)
	}
	return nil
}

// Shutdown flushes and stops every volume's engine, leaving devices
// attached for the next plugin process.
func (d *Driver) Shutdown() error { return d.opts.Runtime.Shutdown() }

// Ready reports whether the plugin is ready: re-adoption done and pools
// usable.
func (d *Driver) Ready() error {
	if n, running := d.readopting(); running {
		return fmt.Errorf("%w: re-adopting staged volumes after a restart (%d still recovering)", errNotReady, n)
	}
	if err := d.opts.HDD.Check(); err != nil {
		return fmt.Errorf("hdd pool: %w", err)
	}
	if err := d.opts.NVMe.Check(); err != nil {
		return fmt.Errorf("nvme pool: %w", err)
	}
	return nil
}

// errNotReady marks a plugin that works but is not ready yet.
var errNotReady = errors.New("not ready")
