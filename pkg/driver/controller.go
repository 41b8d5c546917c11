package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
)

// ControllerServer implements csi.ControllerServer for this node's volumes.
type ControllerServer struct {
	csi.UnimplementedControllerServer
	d *Driver
}

const (
	defaultVolumeSize = 1 << 30
	// sizeAlign keeps volumes and cache slices whole MiB: the engine and
	// the filesystems want 4 KiB, and MiB keeps sizes readable.
	sizeAlign = 1 << 20
)

var supportedModes = map[csi.VolumeCapability_AccessMode_Mode]bool{
	csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER:        true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER: true,
	csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:  true,
}

// checkCapability returns why c is unsupported, or "".
func checkCapability(c *csi.VolumeCapability) string {
	if c == nil {
		return "capability is missing"
	}
	if c.GetAccessMode() == nil || !supportedModes[c.GetAccessMode().GetMode()] {
		return fmt.Sprintf("access mode %v is not supported (SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER)", c.GetAccessMode().GetMode())
	}
	switch {
	case c.GetBlock() != nil:
	case c.GetMount() != nil:
		if fs := c.GetMount().GetFsType(); fs != "" && fs != "ext4" && fs != "xfs" {
			return fmt.Sprintf("fsType %q is not supported (ext4, xfs)", fs)
		}
	default:
		return "access type must be mount or block"
	}
	return ""
}

func checkCapabilities(cs []*csi.VolumeCapability) error {
	if len(cs) == 0 {
		return status.Error(codes.InvalidArgument, "volume capabilities are missing")
	}
	for _, c := range cs {
		if why := checkCapability(c); why != "" {
			return status.Error(codes.InvalidArgument, why)
		}
	}
	return nil
}

// volumeID derives a stable id from the volume name, so CreateVolume is
// idempotent even when its record was never written.
func volumeID(name string) string {
	h := sha256.Sum256([]byte(name))
	return "wb-" + hex.EncodeToString(h[:12])
}

func cacheName(id string) string { return id + "-cache" }

func paramError(err error) error {
	var pe *params.Error
	if errors.As(err, &pe) {
		return status.Errorf(codes.InvalidArgument, "invalid parameter %s: %s", pe.Key, pe.Msg)
	}
	return status.Errorf(codes.InvalidArgument, "invalid parameters: %v", err)
}

func roundUp(n, a int64) int64 { return (n + a - 1) / a * a }

// cacheSizeFor picks the cache slice of a volume of capacity bytes.
func (d *Driver) cacheSizeFor(p *params.Volume, capacity int64) int64 {
	if p.CacheSize > 0 {
		return roundUp(p.CacheSize, sizeAlign)
	}
	c := int64(math.Ceil(float64(capacity) * d.opts.DefaultCacheFraction))
	if c < d.opts.MinCacheSize {
		c = d.opts.MinCacheSize
	}
	return roundUp(c, sizeAlign)
}

func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: d.opts.NodeID}}
}

// reachable reports whether the topology requirement allows this node.
func (d *Driver) reachable(req *csi.TopologyRequirement) bool {
	if req == nil || len(req.GetRequisite()) == 0 {
		return true
	}
	for _, t := range req.GetRequisite() {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n == d.opts.NodeID {
			return true
		}
	}
	return false
}

// CreateVolume implements csi.ControllerServer.
func (s ControllerServer) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	d := s.d
	name := req.GetName()
	if name == "" {
		return nil, status.Error(codes.InvalidArgument, "name is missing")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, status.Error(codes.InvalidArgument, "volume content sources (snapshots, clones) are not supported")
	}
	p, err := params.Parse(req.GetParameters())
	if err != nil {
		return nil, paramError(err)
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if required < 0 || limit < 0 {
		return nil, status.Error(codes.InvalidArgument, "capacity must not be negative")
	}
	capacity := required
	if capacity == 0 {
		capacity = defaultVolumeSize
		if limit > 0 && limit < capacity {
			capacity = limit
		}
	}
	capacity = roundUp(capacity, sizeAlign)
	if limit > 0 && capacity > limit {
		return nil, status.Errorf(codes.OutOfRange, "capacity %d rounded to %d exceeds the limit %d", required, capacity, limit)
	}
	if !d.reachable(req.GetAccessibilityRequirements()) {
		return nil, status.Errorf(codes.ResourceExhausted, "volume %s cannot be placed: topology requirement excludes node %s", name, d.opts.NodeID)
	}
	id := volumeID(name)
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()

	if v, ok := d.opts.State.Get(id); ok {
		if v.Name != name {
			return nil, status.Errorf(codes.Internal, "volume id %s of %q is taken by %q", id, name, v.Name)
		}
		if v.Capacity < required || (limit > 0 && v.Capacity > limit) || !sameParams(v.Params, req.GetParameters()) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with capacity %d and other parameters", name, v.Capacity)
		}
		return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
	}
	if n := len(d.opts.State.List()); n >= d.opts.MaxVolumes {
		return nil, status.Errorf(codes.ResourceExhausted, "node %s already has %d volumes (max %d)", d.opts.NodeID, n, d.opts.MaxVolumes)
	}
	cacheSize := d.cacheSizeFor(p, capacity)
	if err := p.CheckRAMBuffers(cacheSize); err != nil {
		return nil, paramError(err)
	}
	if err := d.allocate(id, capacity, cacheSize, p.RAMBuffers(layout.DefaultSegmentSize)); err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err // the memory budget's refusal
		}
		if errors.Is(err, pool.ErrNoSpace) {
			return nil, status.Errorf(codes.ResourceExhausted, "volume %q: %v", name, err)
		}
		return nil, status.Errorf(codes.Internal, "volume %q: %v", name, err)
	}
	v := nodestate.Volume{ID: id, Name: name, Capacity: capacity, CacheSize: cacheSize, Params: volumeParams(req.GetParameters())}
	if err := d.opts.State.Put(v); err != nil {
		_ = d.opts.HDD.Delete(id)
		_ = d.opts.NVMe.Delete(cacheName(id))
		return nil, status.Errorf(codes.Internal, "volume %q: record: %v", name, err)
	}
	klog.InfoS("Volume created", "name", name, "volume", id, "capacity", capacity, "cacheSize", cacheSize)
	return &csi.CreateVolumeResponse{Volume: d.csiVolume(v)}, nil
}

// allocate creates the backing volume and the cache slice, undoing the
// first when the second fails.
func (d *Driver) allocate(id string, capacity, cacheSize int64, ramBuffers int) error {
	if free, err := d.opts.HDD.Capacity(); err == nil && free < capacity {
		return fmt.Errorf("%w: hdd pool has %d bytes free, %d needed", pool.ErrNoSpace, free, capacity)
	}
	if free, err := d.opts.NVMe.Capacity(); err == nil && free < cacheSize {
		return fmt.Errorf("%w: nvme pool has %d bytes free, %d needed", pool.ErrNoSpace, free, cacheSize)
	}
	if err := d.admitCreate(id, cacheSize, ramBuffers); err != nil {
		return err
	}
	if _, err := d.opts.HDD.Create(id, capacity); err != nil {
		return fmt.Errorf("backing: %w", err)
	}
	if _, err := d.opts.NVMe.Create(cacheName(id), cacheSize); err != nil {
		if derr := d.opts.HDD.Delete(id); derr != nil {
			klog.ErrorS(derr, "Undoing a backing volume", "volume", id)
		}
		return fmt.Errorf("cache slice: %w", err)
	}
	return nil
}

// volumeParams keeps the StorageClass parameters that the node needs
// (everything but the sidecars' own keys).
func volumeParams(m map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		if strings.HasPrefix(k, "csi.storage.k8s.io/") && k != params.KeyFSType {
			continue
		}
		out[k] = v
	}
	return out
}

func sameParams(stored, asked map[string]string) bool {
	a := volumeParams(asked)
	if len(a) != len(stored) {
		return false
	}
	for k, v := range a {
		if stored[k] != v {
			return false
		}
	}
	return true
}

func (d *Driver) csiVolume(v nodestate.Volume) *csi.Volume {
	ctx := map[string]string{}
	for k, val := range v.Params {
		ctx[k] = val
	}
	ctx[params.KeyCacheSize] = strconv.FormatInt(v.CacheSize, 10)
	return &csi.Volume{VolumeId: v.ID, CapacityBytes: v.Capacity, VolumeContext: ctx,
		AccessibleTopology: []*csi.Topology{d.topology()}}
}

// DeleteVolume implements csi.ControllerServer.
func (s ControllerServer) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	d := s.d
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, ok := d.opts.State.Get(id)
	if ok && v.Staged != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged at %s; unstage it first", id, v.Staged.StagingPath)
	}
	if ok && v.BackingDevice != "" {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is a static volume on %s; it is not deleted by the driver", id, v.BackingDevice)
	}
	if _, running := d.opts.Runtime.Get(id); running {
		// Not recorded as staged but still served (a NodeStageVolume that
		// failed and could not be undone): its files must not go.
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still served on this node; unstage it first", id)
	}
	if !strings.HasPrefix(id, "wb-") {
		return &csi.DeleteVolumeResponse{}, nil // never ours: nothing to delete
	}
	if err := d.opts.NVMe.Delete(cacheName(id)); err != nil {
		return nil, grpcError(codes.Internal, err, "volume %s: cache slice", id)
	}
	if err := d.opts.HDD.Delete(id); err != nil {
		return nil, grpcError(codes.Internal, err, "volume %s: backing", id)
	}
	if err := d.opts.State.Delete(id); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: record: %v", id, err)
	}
	klog.InfoS("Volume deleted", "volume", id, "name", v.Name)
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities implements csi.ControllerServer.
func (s ControllerServer) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities are missing")
	}
	if _, ok := s.d.opts.State.Get(id); !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	if _, err := params.Parse(req.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	for _, c := range req.GetVolumeCapabilities() {
		if why := checkCapability(c); why != "" {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: why}, nil
		}
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters()}}, nil
}

// ControllerGetCapabilities implements csi.ControllerServer.
func (s ControllerServer) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_EXPAND_VOLUME,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// GetCapacity implements csi.ControllerServer: what a new volume can get on
// this node, limited by both pools (the cache slice takes its fraction).
func (s ControllerServer) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	d := s.d
	if t := req.GetAccessibleTopology(); t != nil {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n != d.opts.NodeID {
			return &csi.GetCapacityResponse{AvailableCapacity: 0}, nil
		}
	}
	// A StorageClass with a bad parameter still gets the pools' capacity
	// (as with no cacheSize): refusing it here leaves the class without a
	// CSIStorageCapacity, the scheduler then reports only "not enough free
	// storage" for its pods, and CreateVolume, whose ProvisioningFailed
	// event names the parameter, is never called.
	p, err := params.Parse(req.GetParameters())
	if err != nil {
		klog.V(4).InfoS("GetCapacity: ignoring the StorageClass's parameters", "err", err)
		p = &params.Volume{}
	}
	if len(d.opts.State.List()) >= d.opts.MaxVolumes {
		return &csi.GetCapacityResponse{AvailableCapacity: 0}, nil
	}
	hdd, err := d.opts.HDD.Capacity()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "hdd pool: %v", err)
	}
	nvme, err := d.opts.NVMe.Capacity()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "nvme pool: %v", err)
	}
	avail := hdd
	switch {
	case p.CacheSize > 0:
		if nvme < p.CacheSize {
			avail = 0
		}
	case nvme < d.opts.MinCacheSize:
		avail = 0
	default:
		if byCache := int64(float64(nvme) / d.opts.DefaultCacheFraction); byCache < avail {
			avail = byCache
		}
	}
	// Memory: the largest cache slice the budget still has room for.
	if mc := d.memoryCacheLimit(); p.CacheSize > 0 && mc < p.CacheSize {
		avail = 0
	} else if p.CacheSize == 0 {
		if byMem := int64(float64(mc) / d.opts.DefaultCacheFraction); byMem < avail {
			avail = byMem
		}
	}
	avail = avail / sizeAlign * sizeAlign
	return &csi.GetCapacityResponse{AvailableCapacity: avail}, nil
}

// ControllerExpandVolume implements csi.ControllerServer: grows the backing
// volume (the cache slice stays) and, when the volume is staged, the
// running engine and the attached device, live; the filesystem grows in
// NodeExpandVolume. An unstaged volume takes the grown backing when next
// staged. Each step is a no-op once done, and the new capacity is
// recorded last, so a retry after any failure converges.
func (s ControllerServer) ControllerExpandVolume(ctx context.Context, req *csi.ControllerExpandVolumeRequest) (*csi.ControllerExpandVolumeResponse, error) {
	d := s.d
	id := req.GetVolumeId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if req.GetCapacityRange() == nil {
		return nil, status.Error(codes.InvalidArgument, "capacity range is missing")
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	if c := req.GetVolumeCapability(); c != nil {
		if why := checkCapability(c); why != "" {
			return nil, status.Error(codes.InvalidArgument, why)
		}
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, ok := d.opts.State.Get(id)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	if v.BackingDevice != "" {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is static on %s: grow the device yourself", id, v.BackingDevice)
	}
	nodeExpand := req.GetVolumeCapability().GetBlock() == nil
	size := roundUp(required, sizeAlign)
	if limit > 0 && size > limit {
		return nil, status.Errorf(codes.OutOfRange, "capacity %d rounded to %d exceeds the limit %d", required, size, limit)
	}
	if size <= v.Capacity {
		return &csi.ControllerExpandVolumeResponse{CapacityBytes: v.Capacity, NodeExpansionRequired: nodeExpand}, nil
	}
	if err := d.opts.HDD.Expand(id, size); err != nil {
		if errors.Is(err, pool.ErrNoSpace) {
			return nil, status.Errorf(codes.ResourceExhausted, "volume %s: %v", id, err)
		}
		return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	if v.Staged != nil {
		if _, running := d.opts.Runtime.Get(id); !running {
			// Recovering after a restart: it takes the grown backing at
			// open; the retry then finds it running and converges.
			return nil, status.Errorf(codes.Unavailable, "volume %s is staged but its engine is not running yet", id)
		}
		dev, err := d.opts.Runtime.Grow(ctx, id, size)
		if err != nil {
			return nil, grpcError(codes.Internal, err, "volume %s: grow live to %d bytes", id, size)
		}
		klog.InfoS("Volume grown live", "volume", id, "device", dev, "from", v.Capacity, "to", size)
	}
	v.Capacity = size
	v.GrowFS = nodeExpand
	if err := d.opts.State.Put(v); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: record: %v", id, err)
	}
	klog.InfoS("Volume expanded", "volume", id, "capacity", size)
	return &csi.ControllerExpandVolumeResponse{CapacityBytes: size, NodeExpansionRequired: nodeExpand}, nil
}

// ListVolumes implements csi.ControllerServer: this node's volumes, in id
// order; the token is the index of the next entry.
func (s ControllerServer) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	if req.GetMaxEntries() < 0 {
		return nil, status.Error(codes.InvalidArgument, "max_entries must not be negative")
	}
	vols := s.d.opts.State.List()
	sort.Slice(vols, func(i, j int) bool { return vols[i].ID < vols[j].ID })
	start := 0
	if tok := req.GetStartingToken(); tok != "" {
		n, err := strconv.Atoi(tok)
		if err != nil || n < 0 || n > len(vols) {
			return nil, status.Errorf(codes.Aborted, "starting token %q is not valid", tok)
		}
		start = n
	}
	end := len(vols)
	if m := int(req.GetMaxEntries()); m > 0 && start+m < end {
		end = start + m
	}
	resp := &csi.ListVolumesResponse{}
	for _, v := range vols[start:end] {
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: s.d.csiVolume(v)})
	}
	if end < len(vols) {
		resp.NextToken = strconv.Itoa(end)
	}
	return resp, nil
}
