package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/writeboost-csi/writeboost-csi/pkg/engine"
	"github.com/writeboost-csi/writeboost-csi/pkg/layout"
	"github.com/writeboost-csi/writeboost-csi/pkg/nodestate"
	"github.com/writeboost-csi/writeboost-csi/pkg/params"
	"github.com/writeboost-csi/writeboost-csi/pkg/pool"
	"github.com/writeboost-csi/writeboost-csi/pkg/volume"
)

// NodeServer implements csi.NodeServer.
type NodeServer struct {
	csi.UnimplementedNodeServer
	d *Driver
}

// lookupForStage finds the volume's record, or makes one for a static PV
// whose context names a backing block device.
func (d *Driver) lookupForStage(id string, vctx map[string]string) (nodestate.Volume, error) {
	if v, ok := d.opts.State.Get(id); ok {
		return v, nil
	}
	dev := vctx[CtxBackingDevice]
	if dev == "" {
		return nodestate.Volume{}, status.Errorf(codes.NotFound, "volume %s not found on node %s", id, d.opts.NodeID)
	}
	fi, err := os.Stat(dev)
	if err != nil || fi.Mode()&os.ModeDevice == 0 {
		return nodestate.Volume{}, status.Errorf(codes.NotFound, "static volume %s: backing device %s is not a block device on this node: %v", id, dev, err)
	}
	p := map[string]string{}
	for k, v := range vctx {
		if k != CtxBackingDevice {
			p[k] = v
		}
	}
	return nodestate.Volume{ID: id, Params: volumeParams(p), BackingDevice: dev}, nil
}

// paramsFromContext parses what the node needs of the volume context
// (cacheSize, tunables, fstype); keys set by other tools are ignored.
func paramsFromContext(m map[string]string) (*params.Volume, error) {
	known := map[string]bool{}
	for _, k := range params.Keys() {
		known[k] = true
	}
	f := map[string]string{}
	for k, v := range m {
		if known[k] {
			f[k] = v
		}
	}
	return params.Parse(f)
}

// NodeStageVolume implements csi.NodeServer.
func (s NodeServer) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	d := s.d
	id, target := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path is missing")
	}
	c := req.GetVolumeCapability()
	if why := checkCapability(c); why != "" {
		return nil, status.Error(codes.InvalidArgument, why)
	}
	vctx := req.GetVolumeContext()
	p, err := paramsFromContext(vctx)
	if err != nil {
		return nil, paramError(err)
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.lookupForStage(id, vctx)
	if err != nil {
		return nil, err
	}
	block := c.GetBlock() != nil
	if st := v.Staged; st != nil {
		if st.StagingPath != target || st.Block != block {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is already staged at %s (block=%v)", id, st.StagingPath, st.Block)
		}
	}

	fsType := c.GetMount().GetFsType()
	if fsType == "" {
		fsType = p.FSType
	}
	if fsType == "" {
		fsType = params.DefaultFSType
	}
	wasStaged := v.Staged != nil
	_, hadRecord := d.opts.State.Get(id)
	if err := d.stage(ctx, &v, p, target, block, fsType, c.GetMount().GetMountFlags()); err != nil {
		if !wasStaged {
			// Leave nothing behind: kubelet takes a final error to mean
			// "not staged" and may never call NodeUnstageVolume.
			d.rollbackStage(ctx, id, target, hadRecord)
		}
		return nil, err
	}
	return &csi.NodeStageVolumeResponse{}, nil
}

// stage brings the data path up and mounts it; every step checks the
// current state, so a repeated call is harmless.
func (d *Driver) stage(ctx context.Context, v *nodestate.Volume, p *params.Volume, target string, block bool, fsType string, flags []string) error {
	id := v.ID
	spec, err := d.specFor(v, p)
	if err != nil {
		return err
	}
	// A failure from here on is undone by rollbackStage (unstage), which
	// also gives the reservation back.
	if err := d.admitStage(*v); err != nil {
		return err
	}
	dev, err := d.opts.Runtime.Stage(ctx, spec)
	if err != nil {
		return grpcError(codes.Internal, err, "volume %s: start", id)
	}
	stage := &nodestate.Stage{StagingPath: target, Block: block, Device: dev, BackingPath: spec.BackingPath, CachePath: spec.CachePath}
	if !block {
		stage.FSType = fsType
		stage.MountFlags = flags
	}
	// Recorded before mounting: a restart in between re-adopts the engine,
	// and kubelet's retry mounts.
	v.Staged = stage
	if err := d.opts.State.Put(*v); err != nil {
		return grpcError(codes.Internal, err, "volume %s: record", id)
	}
	if block {
		klog.InfoS("Volume staged", "volume", id, "device", dev, "block", true)
		return nil
	}
	if err := ctx.Err(); err != nil {
		return grpcError(codes.Internal, err, "volume %s", id)
	}
	if err := os.MkdirAll(target, 0o750); err != nil {
		return status.Errorf(codes.Internal, "volume %s: staging dir: %v", id, err)
	}
	mounted, err := d.mnt.IsMountPoint(target)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %s: check %s: %v", id, target, err)
	}
	if !mounted && v.GrowFS {
		if err := d.mnt.ResizeUnmounted(dev); err != nil {
			return status.Errorf(codes.Internal, "volume %s: grow filesystem: %v", id, err)
		}
		v.GrowFS = false
		if err := d.opts.State.Put(*v); err != nil {
			return grpcError(codes.Internal, err, "volume %s: record", id)
		}
	}
	if !mounted {
		if err := d.mnt.FormatAndMount(dev, target, fsType, stage.MountFlags); err != nil {
			return status.Errorf(codes.Internal, "volume %s: format and mount %s on %s: %v", id, dev, target, err)
		}
	}
	klog.InfoS("Volume staged", "volume", id, "device", dev, "path", target, "fsType", fsType)
	return nil
}

// rollbackStage undoes a NodeStageVolume that failed part-way on a volume
// that was not staged before, with a context of its own: the call's may
// be what ended.
func (d *Driver) rollbackStage(ctx context.Context, id, target string, hadRecord bool) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	v, ok := d.opts.State.Get(id)
	err := d.unstage(ctx, id, target)
	if err == nil && !hadRecord && !ok {
		// A static volume whose record was never written: its cache
		// slice holds nothing yet (nothing was mounted).
		err = d.opts.NVMe.Delete(cacheName(id))
	}
	if err != nil {
		klog.ErrorS(err, "Undoing a failed NodeStageVolume", "volume", id, "recorded", ok && v.Staged != nil)
		return
	}
	klog.InfoS("Undid a failed NodeStageVolume", "volume", id)
}

// stagedSpec is the spec of a volume staged before (re-adoption after a
// restart): the devices its record names, and everything else as
// NodeStageVolume's specFor sets it, so a restarted plugin runs the volume
// as it ran before (a thin pool's TRIM was not passed down after a
// restart while re-adoption built its own spec).
func (d *Driver) stagedSpec(v nodestate.Volume, p *params.Volume) volume.Spec {
	return volume.Spec{ID: v.ID, BackingPath: v.Staged.BackingPath, CachePath: v.Staged.CachePath,
		Tunables: p.Tunables, RAMBuffers: p.RAMBuffers(layout.DefaultSegmentSize),
		BackingDiscard: v.BackingDevice == "" && pool.PassesDiscards(d.opts.HDD)}
}

// specFor finds (or for static PVs creates) the devices of v.
func (d *Driver) specFor(v *nodestate.Volume, p *params.Volume) (volume.Spec, error) {
	spec := volume.Spec{ID: v.ID, Tunables: p.Tunables, RAMBuffers: p.RAMBuffers(layout.DefaultSegmentSize)}
	if v.BackingDevice != "" {
		spec.BackingPath = v.BackingDevice
		if _, err := os.Stat(v.BackingDevice); err != nil {
			return spec, status.Errorf(codes.NotFound, "volume %s: backing %s: %v", v.ID, v.BackingDevice, err)
		}
		if v.CacheSize == 0 {
			size, err := blockSize(v.BackingDevice)
			if err != nil {
				return spec, status.Errorf(codes.Internal, "volume %s: %v", v.ID, err)
			}
			v.Capacity = size
			v.CacheSize = d.cacheSizeFor(p, size)
		}
		if err := p.CheckRAMBuffers(v.CacheSize); err != nil {
			return spec, paramError(err)
		}
		path, err := d.opts.NVMe.Create(cacheName(v.ID), v.CacheSize)
		if err != nil {
			return spec, status.Errorf(codes.ResourceExhausted, "volume %s: cache slice: %v", v.ID, err)
		}
		spec.CachePath = path
		return spec, nil
	}
	backing, _, err := d.opts.HDD.Lookup(v.ID)
	if err != nil {
		return spec, status.Errorf(codes.NotFound, "volume %s: backing: %v", v.ID, err)
	}
	cache, _, err := d.opts.NVMe.Lookup(cacheName(v.ID))
	if err != nil {
		return spec, status.Errorf(codes.NotFound, "volume %s: cache slice: %v", v.ID, err)
	}
	spec.BackingPath, spec.CachePath = backing, cache
	spec.BackingDiscard = pool.PassesDiscards(d.opts.HDD)
	return spec, nil
}

func blockSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := f.Seek(0, 2)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return n, nil
}

// NodeUnstageVolume implements csi.NodeServer.
func (s NodeServer) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	d := s.d
	id, target := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path is missing")
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.unstage(ctx, id, target); err != nil {
		return nil, err
	}
	return &csi.NodeUnstageVolumeResponse{}, nil
}

// unstage unmounts the staging path, stops the data path and clears the
// record; after a failure at any step, calling it again finishes the job.
func (d *Driver) unstage(ctx context.Context, id, target string) error {
	if err := d.unmount(target); err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	v, ok := d.opts.State.Get(id)
	device := ""
	if ok && v.Staged != nil {
		device = v.Staged.Device
	}
	static := ok && v.BackingDevice != ""
	if static {
		// A static volume's backing device may be used without us later:
		// write everything back before letting go of it.
		if _, running := d.opts.Runtime.Get(id); running {
			if err := d.opts.Runtime.Drain(ctx, id); err != nil {
				return grpcError(codes.Internal, err, "volume %s: write back to %s", id, v.BackingDevice)
			}
		}
	}
	if err := d.opts.Runtime.Unstage(ctx, id, device); err != nil {
		return grpcError(codes.Internal, err, "volume %s: stop", id)
	}
	d.releaseMemory(id)
	if ok && v.Staged != nil {
		v.Staged = nil
		if static {
			// A static volume lives here only while staged; its cache
			// slice is empty of dirty data now.
			if err := d.opts.NVMe.Delete(cacheName(id)); err != nil {
				return status.Errorf(codes.Internal, "volume %s: cache slice: %v", id, err)
			}
			if err := d.opts.State.Delete(id); err != nil {
				return status.Errorf(codes.Internal, "volume %s: record: %v", id, err)
			}
		} else if err := d.opts.State.Put(v); err != nil {
			return status.Errorf(codes.Internal, "volume %s: record: %v", id, err)
		}
	}
	klog.InfoS("Volume unstaged", "volume", id, "path", target)
	return nil
}

// unmount unmounts path when it is mounted and removes it.
func (d *Driver) unmount(path string) error {
	for {
		mounted, err := d.mnt.IsMountPoint(path)
		if err != nil {
			return fmt.Errorf("check %s: %w", path, err)
		}
		if !mounted {
			break
		}
		if err := d.mnt.Unmount(path); err != nil {
			return fmt.Errorf("unmount %s: %w", path, err)
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// NodePublishVolume implements csi.NodeServer.
func (s NodeServer) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	d := s.d
	id, target, staging := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is missing")
	}
	if staging == "" {
		return nil, status.Error(codes.InvalidArgument, "staging target path is missing")
	}
	c := req.GetVolumeCapability()
	if why := checkCapability(c); why != "" {
		return nil, status.Error(codes.InvalidArgument, why)
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
	if v.Staged == nil || v.Staged.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged at %s", id, staging)
	}
	block := c.GetBlock() != nil
	if block != v.Staged.Block {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s was staged with block=%v", id, v.Staged.Block)
	}
	opts := []string{"bind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	source := staging
	if block {
		source = v.Staged.Device
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: create %s: %v", id, target, err)
		}
		f.Close()
	} else {
		opts = append(opts, c.GetMount().GetMountFlags()...)
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
		}
	}
	mounted, err := d.mnt.IsMountPoint(target)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: check %s: %v", id, target, err)
	}
	if !mounted {
		if err := d.mnt.Mount(source, target, "", opts); err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: bind %s on %s: %v", id, source, target, err)
		}
	}
	if req.GetReadonly() {
		// A bind mount ignores "ro" on first mount in older kernels and
		// util-linux: remount to be sure. Also on a repeated call: the
		// earlier one may have bound the volume and failed here.
		if err := d.mnt.Mount(source, target, "", []string{"bind", "remount", "ro"}); err != nil {
			_ = d.mnt.Unmount(target)
			return nil, status.Errorf(codes.Internal, "volume %s: remount read-only: %v", id, err)
		}
	}
	klog.InfoS("Volume published", "volume", id, "target", target, "readonly", req.GetReadonly(), "block", block)
	return &csi.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume implements csi.NodeServer.
func (s NodeServer) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	d := s.d
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if target == "" {
		return nil, status.Error(codes.InvalidArgument, "target path is missing")
	}
	unlock, err := d.lockVolume(id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := d.unmount(target); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
	}
	klog.InfoS("Volume unpublished", "volume", id, "target", target)
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats implements csi.NodeServer.
func (s NodeServer) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	d := s.d
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if path == "" {
		return nil, status.Error(codes.InvalidArgument, "volume path is missing")
	}
	v, ok := d.opts.State.Get(id)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "volume %s not found", id)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s: path %s: %v", id, path, err)
	}
	info, running := d.opts.Runtime.Get(id)
	cond := volumeCondition(info, running, d.recovering(id))
	if !fi.IsDir() {
		size := v.Capacity
		if running {
			size = info.Size
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: size}},
			VolumeCondition: cond}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: statfs %s: %v", id, path, err)
	}
	bs := int64(st.Bsize)
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs,
			Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csi.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}, VolumeCondition: cond}, nil
}

// NodeExpandVolume implements csi.NodeServer: grows the mounted filesystem
// online to the device (resize2fs for ext4, xfs_growfs for xfs), which
// ControllerExpandVolume grew live (or which took the grown backing when
// staged). A device still smaller than the recorded capacity (a restart
// between the steps) is grown first. Block volumes need nothing more.
func (s NodeServer) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	d := s.d
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is missing")
	}
	if path == "" {
		return nil, status.Error(codes.InvalidArgument, "volume path is missing")
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
	if _, err := os.Stat(path); err != nil {
		return nil, status.Errorf(codes.NotFound, "volume %s: path %s: %v", id, path, err)
	}
	if v.Staged == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is not staged", id)
	}
	info, running := d.opts.Runtime.Get(id)
	if !running {
		return nil, status.Errorf(codes.Unavailable, "volume %s: engine not running", id)
	}
	if required := req.GetCapacityRange().GetRequiredBytes(); required > info.Size {
		if v.Capacity < required {
			return nil, status.Errorf(codes.FailedPrecondition,
				"volume %s: device is %d bytes, %d asked, and the volume has %d: expand it first (ControllerExpandVolume)", id, info.Size, required, v.Capacity)
		}
		if _, err := d.opts.Runtime.Grow(ctx, id, v.Capacity); err != nil {
			return nil, grpcError(codes.Internal, err, "volume %s: grow live to %d bytes", id, v.Capacity)
		}
		if info, running = d.opts.Runtime.Get(id); !running {
			return nil, status.Errorf(codes.Unavailable, "volume %s: engine not running", id)
		}
	}
	if v.Staged.Block || req.GetVolumeCapability().GetBlock() != nil {
		return &csi.NodeExpandVolumeResponse{CapacityBytes: info.Size}, nil
	}
	if err := d.mnt.Resize(v.Staged.Device, v.Staged.StagingPath); err != nil {
		return nil, status.Errorf(codes.Internal, "volume %s: grow filesystem on %s: %v", id, v.Staged.Device, err)
	}
	if v.GrowFS {
		v.GrowFS = false
		if err := d.opts.State.Put(v); err != nil {
			return nil, grpcError(codes.Internal, err, "volume %s: record", id)
		}
	}
	klog.InfoS("Filesystem expanded", "volume", id, "device", v.Staged.Device, "size", info.Size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: info.Size}, nil
}

// NodeGetCapabilities implements csi.NodeServer.
func (s NodeServer) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_VOLUME_CONDITION,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
	} {
		caps = append(caps, &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{
			Rpc: &csi.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// NodeGetInfo implements csi.NodeServer.
func (s NodeServer) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: s.d.opts.NodeID, MaxVolumesPerNode: int64(s.d.opts.MaxVolumes),
		AccessibleTopology: s.d.topology()}, nil
}

// volumeCondition says, for a person reading `kubectl describe` or the
// kubelet's events, what is wrong with a volume (the engine's Health) and
// what it means for their data. A log that is full and paced is reported
// but not abnormal: it is the load outrunning the backing device, not a
// fault.
func volumeCondition(info volume.Info, running, recovering bool) *csi.VolumeCondition {
	switch {
	case recovering:
		return &csi.VolumeCondition{Abnormal: true, Message: "recovering: the plugin restarted and the volume's cache is being reopened and its log replayed; I/O to the volume resumes when that finishes"}
	case !running:
		return &csi.VolumeCondition{Abnormal: true, Message: "the cache engine of this volume is not running: I/O to the volume fails until it is staged again"}
	}
	h := info.Status.Health
	if h.State == "" || (h.State == engine.HealthOK && info.Err != nil) {
		// A runtime that does not report health: the sticky error.
		if info.Err != nil {
			return &csi.VolumeCondition{Abnormal: true, Message: fmt.Sprintf("I/O error on the cache or backing device: %v", info.Err)}
		}
		return &csi.VolumeCondition{Message: "healthy"}
	}
	if h.State == engine.HealthOK {
		return &csi.VolumeCondition{Message: "healthy"}
	}
	abnormal := false
	for _, c := range h.Causes {
		abnormal = abnormal || c.Kind != engine.CauseLogFull
	}
	abnormal = abnormal || h.State == engine.HealthFailed || h.State == engine.HealthPassThrough
	return &csi.VolumeCondition{Abnormal: abnormal, Message: fmt.Sprintf("%s: %s", healthSummary(h.State), h.Message())}
}

// healthSummary is the first words of a condition's message.
func healthSummary(s engine.HealthState) string {
	switch s {
	case engine.HealthPassThrough:
		return "cache failed, volume running uncached (pass-through)"
	case engine.HealthFailed:
		return "cache failed holding data not yet written back: writes, and reads of that data, fail"
	}
	return string(s)
}
