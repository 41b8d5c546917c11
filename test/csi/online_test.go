package csi

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/writeboost-csi/writeboost-csi/pkg/attach"
	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

// Online expansion (issue 14 §4): a published volume grows while a file
// is open on it: ControllerExpandVolume grows the backing, the engine and
// the attached device live; NodeExpandVolume grows the mounted filesystem
// (resize2fs, xfs_growfs); the open file then takes more data than the
// old filesystem had room for. Host: xfs on the nbdfuse fallback (the
// host's root lacks CAP_SYS_RESOURCE, which online ext4 resizing needs).
// VM tier: ext4 and xfs on kernel NBD, and ext4 on the fallback.

// TestResizeOnlineXFS is the host variant: xfs over the nbdfuse fallback.
func TestResizeOnlineXFS(t *testing.T) {
	testenv.RequireTools(t, "xfs_growfs", "mkfs.xfs")
	testResizeOnline(t, newEnv(t), "xfs", attach.MethodFallback)
}

// TestKernelResizeOnlineExt4: ext4 on kernel NBD (netlink RECONFIGURE).
func TestKernelResizeOnlineExt4(t *testing.T) {
	testenv.RequireTools(t, "resize2fs")
	testResizeOnline(t, newKernelEnv(t), "ext4", attach.MethodNetlink)
}

// TestKernelResizeOnlineXFS: xfs on kernel NBD.
func TestKernelResizeOnlineXFS(t *testing.T) {
	testenv.RequireTools(t, "xfs_growfs", "mkfs.xfs")
	testResizeOnline(t, newKernelEnv(t), "xfs", attach.MethodNetlink)
}

// TestKernelResizeOnlineFallbackExt4: ext4 on the nbdfuse fallback, in the
// VM, where root has CAP_SYS_RESOURCE (the plugin is told to take the
// fallback although the kernel has nbd).
func TestKernelResizeOnlineFallbackExt4(t *testing.T) {
	requireKernelNBD(t)
	testenv.RequireTools(t, "resize2fs")
	testResizeOnline(t, newEnv(t, "--debug-attach-method="+attach.MethodFallback), "ext4", attach.MethodFallback)
}

func testResizeOnline(t *testing.T, e *env, fstype, method string) {
	from, to := int64(64<<20), int64(160<<20)
	if fstype == "xfs" { // mkfs.xfs's floor is 300 MiB
		from, to = 320<<20, 448<<20
	}
	fsCap := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fstype}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
	r, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: "pvc-online-" + fstype,
		Parameters:    map[string]string{"csi.storage.k8s.io/fstype": fstype, "cacheSize": "32Mi"},
		CapacityRange: &csi.CapacityRange{RequiredBytes: from}, VolumeCapabilities: []*csi.VolumeCapability{fsCap}})
	if err != nil {
		t.Fatal(err)
	}
	v := r.Volume
	staging := filepath.Join(e.base, "staging", v.VolumeId)
	target := filepath.Join(e.base, "pods", v.VolumeId, "mount")
	if _, err := e.node().NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, VolumeCapability: fsCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.node().NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, TargetPath: target, VolumeCapability: fsCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatal(err)
	}
	rec := attachRecord(t, e, v.VolumeId)
	if rec.Method != method {
		t.Fatalf("attached by %s on %s, want %s", rec.Method, rec.Device, method)
	}
	devBefore := sysSize(t, rec.Device)
	fsBefore := fsSize(t, target)

	// A file open across the grow: written before, appended after.
	f, err := os.OpenFile(filepath.Join(target, "open"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	head := randBytes(4 << 20)
	if _, err := f.Write(head); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}

	for i := 0; i < 2; i++ { // the second call is a retry of a done expansion
		cr, err := e.ctrl().ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
			CapacityRange: &csi.CapacityRange{RequiredBytes: to}, VolumeCapability: fsCap})
		if err != nil {
			t.Fatalf("ControllerExpandVolume #%d while published: %v", i+1, err)
		}
		if cr.CapacityBytes != to || !cr.NodeExpansionRequired {
			t.Fatalf("ControllerExpandVolume: %+v", cr)
		}
		if got := sysSize(t, rec.Device); got != to {
			t.Fatalf("%s is %d bytes after ControllerExpandVolume, want %d", rec.Device, got, to)
		}
		nr, err := e.node().NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{VolumeId: v.VolumeId, VolumePath: target,
			StagingTargetPath: staging, CapacityRange: &csi.CapacityRange{RequiredBytes: to}, VolumeCapability: fsCap})
		if err != nil {
			t.Fatalf("NodeExpandVolume #%d: %v\n%s", i+1, err, e.log())
		}
		if nr.CapacityBytes != to {
			t.Fatalf("NodeExpandVolume capacity %d, want %d", nr.CapacityBytes, to)
		}
	}
	fsAfter := fsSize(t, target)
	if fsAfter < fsBefore+(to-from)*3/4 {
		t.Fatalf("%s is %d bytes after the expansion, was %d: want about %d more", fstype, fsAfter, fsBefore, to-from)
	}
	// More than the old filesystem could hold, through the open file.
	tail := randBytes(int(fsBefore - int64(len(head)) + 16<<20))
	if _, err := f.Write(tail); err != nil {
		t.Fatalf("append %d bytes to the open file after the grow: %v", len(tail), err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	dropCaches()
	got, err := os.ReadFile(filepath.Join(target, "open"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:len(head)], head) || !bytes.Equal(got[len(head):], tail) {
		t.Fatalf("the open file reads back wrong (%d bytes, wrote %d)", len(got), len(head)+len(tail))
	}
	t.Logf("%s on %s (%s): device %d -> %d bytes, filesystem %d -> %d bytes, the open file now %d bytes",
		fstype, rec.Device, rec.Method, devBefore, sysSize(t, rec.Device), fsBefore, fsAfter, len(got))

	e.unpublishUnstage(t, v, staging, target)
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
}

// attachRecord reads the attachment record of a staged volume.
func attachRecord(t *testing.T, e *env, volumeID string) attach.Attachment {
	t.Helper()
	recs, _ := filepath.Glob(filepath.Join(e.state, "attach", "*.json"))
	for _, r := range recs {
		var a attach.Attachment
		if b, err := os.ReadFile(r); err == nil && json.Unmarshal(b, &a) == nil && a.VolumeID == volumeID {
			return a
		}
	}
	t.Fatalf("no attachment record for %s", volumeID)
	return attach.Attachment{}
}

// sysSize is the size of a block device as the kernel shows it.
func sysSize(t *testing.T, dev string) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "size"))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n * 512
}
