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
// first, takes the volume's lock, checks the current state so that a
// repeated call is harmless, and turns errors into gRPC codes only here at
// the edge. The node's record of volumes (package nodestate) is written
// atomically before a call reports success, and a restarted plugin
// re-adopts every staged volume (Readopt).
//
// Expansion is offline: ControllerExpandVolume grows the backing of an
// unstaged volume, and the next NodeStageVolume opens the engine with the
// grown backing (engine.Options.AllowBackingGrowth) and grows an ext4
// filesystem before mounting it (online ext4 resizing needs
// CAP_SYS_RESOURCE, and the nbdfuse fallback cannot change a live device's
// size). Static volumes (volume context "backingDevice") are written back
// completely when unstaged, so their device can be used without us.
package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"

	"k8s.io/klog/v2"

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
	Get(id string) (volume.Info, bool)
	IDs() []string
	FlushAll() error
	Shutdown() error
}

// Options configure a Driver.
type Options struct {
	NodeID               string
	Version              string
	HDD, NVMe            pool.Pool
	State                *nodestate.Store
	Runtime              Runtime
	MaxVolumes           int
	DefaultCacheFraction float64
	MinCacheSize         int64
	// Mounter does mounts; nil uses the system's.
	Mounter Mounter
}

// Driver implements the CSI services.
type Driver struct {
	opts  Options
	locks keyLocks
	mnt   Mounter
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
	m := o.Mounter
	if m == nil {
		m = newSystemMounter()
	}
	return &Driver{opts: o, mnt: m}, nil
}

// keyLocks serialises calls per volume (TopoLVM's lock.go).
type keyLocks struct {
	mu    sync.Mutex
	locks map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	refs int
}

func (k *keyLocks) lock(key string) func() {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyLock{}
	}
	l := k.locks[key]
	if l == nil {
		l = &keyLock{}
		k.locks[key] = l
	}
	l.refs++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		l.refs--
		if l.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// Readopt restarts the data path of every volume recorded as staged, after
// a restart of the plugin: the engine recovers, serves again and keeps (or
// reattaches) its device, so mounted filesystems carry on.
func (d *Driver) Readopt(ctx context.Context) error {
	var errs []error
	for _, v := range d.opts.State.List() {
		if v.Staged == nil {
			continue
		}
		unlock := d.locks.lock(v.ID)
		err := d.readoptOne(ctx, v)
		unlock()
		if err != nil {
			klog.ErrorS(err, "Re-adopting a staged volume failed", "volume", v.ID)
			errs = append(errs, fmt.Errorf("volume %s: %w", v.ID, err))
		}
	}
	return errors.Join(errs...)
}

func (d *Driver) readoptOne(ctx context.Context, v nodestate.Volume) error {
	p, err := params.Parse(v.Params)
	if err != nil {
		return err
	}
	dev, err := d.opts.Runtime.Stage(ctx, volume.Spec{ID: v.ID, BackingPath: v.Staged.BackingPath,
		CachePath: v.Staged.CachePath, Tunables: p.Tunables})
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
	klog.InfoS("Re-adopted staged volume", "volume", v.ID, "device", dev)
	return nil
}

// Shutdown flushes and stops every volume's engine, leaving devices
// attached for the next plugin process.
func (d *Driver) Shutdown() error { return d.opts.Runtime.Shutdown() }

// Ready reports whether the pools are usable.
func (d *Driver) Ready() error {
	if err := d.opts.HDD.Check(); err != nil {
		return fmt.Errorf("hdd pool: %w", err)
	}
	if err := d.opts.NVMe.Check(); err != nil {
		return fmt.Errorf("nvme pool: %w", err)
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
