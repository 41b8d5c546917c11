package driver

import (
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
	"github.com/writeboost-csi/writeboost-csi/pkg/membudget"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
)

// The node's memory budget (package membudget): NodeStage reserves a
// volume's worst-case memory before its data path starts and refuses what
// does not fit; CreateVolume refuses a volume that would not fit beside
// every volume already on the node, staged or not, so that a volume the
// scheduler placed here can always be staged.

// memoryNeed is the worst-case memory of a volume with a cache slice of
// cacheSize bytes and ramBuffers RAM buffers (0: the engine's default).
func memoryNeed(id string, cacheSize int64, ramBuffers int) (int64, error) {
	_, need, err := membudget.Need(cacheSize, ramBuffers)
	if errors.Is(err, engine.ErrUnaddressable) {
		return 0, status.Errorf(codes.OutOfRange, "volume %s: cache slice of %d bytes: %v", id, cacheSize, err)
	}
	if err != nil {
		return 0, status.Errorf(codes.InvalidArgument, "volume %s: cache slice of %d bytes: %v", id, cacheSize, err)
	}
	return need, nil
}

// ramBuffersOf is the RAM buffers v's parameters ask for (0: the
// engine's default; parameters that no longer parse count as that too:
// staging them is refused anyway).
func ramBuffersOf(v nodestate.Volume) int {
	p, err := params.Parse(v.Params)
	if err != nil {
		return 0
	}
	return p.RAMBuffers(layout.DefaultSegmentSize)
}

// committedMemory is what the node's volumes other than id need, staged
// or not (a static volume counts while it is staged).
func (d *Driver) committedMemory(except string) int64 {
	var sum int64
	seen := map[string]bool{except: true}
	for _, v := range d.opts.State.List() {
		if seen[v.ID] || v.CacheSize == 0 {
			continue
		}
		seen[v.ID] = true
		if n, err := memoryNeed(v.ID, v.CacheSize, ramBuffersOf(v)); err == nil {
			sum += n
		}
	}
	for id, n := range d.opts.Budget.Reservations() {
		if !seen[id] {
			sum += n
		}
	}
	return sum
}

// admitCreate refuses a new volume whose memory would not fit beside the
// node's volumes.
func (d *Driver) admitCreate(id string, cacheSize int64, ramBuffers int) error {
	need, err := memoryNeed(id, cacheSize, ramBuffers)
	if err != nil {
		return err
	}
	if err := d.opts.Budget.Commit(id, need, d.committedMemory(id)); err != nil {
		return status.Errorf(codes.ResourceExhausted, "volume %s on node %s: %v", id, d.opts.NodeID, err)
	}
	return nil
}

// admitStage reserves v's memory before its data path starts. A volume
// whose data path already runs is counted whatever the budget says.
func (d *Driver) admitStage(v nodestate.Volume) error {
	need, err := memoryNeed(v.ID, v.CacheSize, ramBuffersOf(v))
	if err != nil {
		return err
	}
	if _, running := d.opts.Runtime.Get(v.ID); running {
		d.forceMemory(v.ID, need)
		return nil
	}
	if err := d.opts.Budget.Reserve(v.ID, need); err != nil {
		return status.Errorf(codes.ResourceExhausted, "volume %s on node %s: %v", v.ID, d.opts.NodeID, err)
	}
	return nil
}

// forceMemory counts a volume that runs already (re-adopted after a
// restart); refusing it would free nothing.
func (d *Driver) forceMemory(id string, need int64) {
	if d.opts.Budget.Force(id, need) {
		klog.InfoS("Memory budget exceeded by volumes that were already staged", "volume", id,
			"inUse", d.opts.Budget.InUse(), "budget", d.opts.Budget.Limit())
	}
}

// releaseMemory drops a volume's reservation once its data path stopped.
func (d *Driver) releaseMemory(id string) { d.opts.Budget.Release(id) }

// budgetFigures reports the budget for the metrics.
func (d *Driver) budgetFigures() (int64, map[string]int64) {
	return d.opts.Budget.Limit(), d.opts.Budget.Reservations()
}

// memoryCapacityLimit bounds GetCapacity by the memory left: the largest
// cache slice whose volume still fits, or 0 when not even the smallest
// does (-1: no bound).
func (d *Driver) memoryCacheLimit() int64 {
	free := d.opts.Budget.Limit() - d.committedMemory("")
	small, err := memoryNeed("", d.opts.MinCacheSize, 0)
	if err != nil || free < small {
		return 0
	}
	// Beyond the smallest slice, each 4 KiB cache block costs its index
	// entry (about 13 bytes; the other terms do not grow with the cache).
	return d.opts.MinCacheSize + (free-small)/13*4096
}
