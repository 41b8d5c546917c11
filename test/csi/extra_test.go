package csi

import (
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/writeboost-csi/writeboost-csi/test/testenv"
)

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestMetricsAndPrestop checks the Prometheus endpoint of a staged volume
// and that the preStop hook flushes through the running plugin.
func TestMetricsAndPrestop(t *testing.T) {
	addr := freeAddr(t)
	e := newEnv(t, "--metrics-address", addr)
	v := e.create(t, "pvc-metrics", 64<<20)
	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	data := randBytes(1 << 20)
	f, err := os.Create(filepath.Join(target, "f"))
	if err != nil {
		t.Fatal(err)
	}
	f.Write(data)
	f.Close() // not synced: the preStop hook's flush must make it durable

	cmd := pluginCommand("csi", "prestop", "--state-dir", e.state, "--run-dir", e.run)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("prestop: %v\n%s", err, out)
	} else if !strings.Contains(string(out), `"Flushed" volume="`+v.VolumeId+`"`) {
		t.Fatalf("prestop did not flush %s:\n%s", v.VolumeId, out)
	}

	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`writeboost_dirty_bytes{node="node-1",volume="` + v.VolumeId + `"}`,
		`writeboost_read_hit_ratio{node="node-1",volume="` + v.VolumeId + `"}`,
		`writeboost_writeback_bytes_per_second{`,
		`writeboost_writeback_lag_segments{`,
		`writeboost_flush_latency_seconds_total{`,
		`writeboost_flushes_total{`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	e.unpublishUnstage(t, v, staging, target)
}

// TestStaticVolume stages a static PV whose context names an existing block
// device as its backing; the cache slice comes from the NVMe pool.
func TestStaticVolume(t *testing.T) {
	e := newEnv(t)
	img := filepath.Join(e.base, "static.img")
	f, _ := os.Create(img)
	f.Truncate(48 << 20)
	f.Close()
	out, err := exec.Command("losetup", "--find", "--show", img).Output()
	if err != nil {
		t.Fatalf("losetup: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })

	v := &csi.Volume{VolumeId: "static-pv-1", VolumeContext: map[string]string{"backingDevice": dev, "writebackThreshold": "0"}}
	// writebackThreshold 0: nothing is written back in the background, so
	// the data is still dirty in the cache when unstaging starts.
	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	data := randBytes(512<<10 + 1)
	writeSynced(t, filepath.Join(target, "x"), data)
	e.unpublishUnstage(t, v, staging, target)
	staging = e.stage(t, v)
	target = e.publish(t, v, staging)
	dropCaches()
	checkFile(t, filepath.Join(target, "x"), data)
	more := randBytes(300 << 10)
	writeSynced(t, filepath.Join(target, "y"), more)
	e.unpublishUnstage(t, v, staging, target)

	// Unstaging wrote everything back: the backing device alone holds the
	// filesystem and its files, and the cache slice is gone.
	if ents, _ := filepath.Glob(filepath.Join(e.nvme, "*.img")); len(ents) != 0 {
		t.Fatalf("cache slice left: %v", ents)
	}
	direct := filepath.Join(e.base, "direct")
	os.MkdirAll(direct, 0o700)
	if out, err := exec.Command("mount", "-o", "ro", dev, direct).CombinedOutput(); err != nil {
		t.Fatalf("mount the backing device alone: %v %s", err, out)
	}
	defer exec.Command("umount", direct).Run()
	checkFile(t, filepath.Join(direct, "x"), data)
	checkFile(t, filepath.Join(direct, "y"), more)
}

// TestXFSExpand: an xfs volume (at least 300 MiB, mkfs.xfs's floor) is
// grown online by NodeExpandVolume (xfs_growfs) after an offline backing
// expansion.
func TestXFSExpand(t *testing.T) {
	testenv.RequireTools(t, "xfs_growfs")
	e := newEnv(t)
	xfsCap := &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "xfs"}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER},
	}
	r, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: "pvc-xfs",
		Parameters:    map[string]string{"csi.storage.k8s.io/fstype": "xfs", "cacheSize": "32Mi"},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 320 << 20}, VolumeCapabilities: []*csi.VolumeCapability{xfsCap}})
	if err != nil {
		t.Fatal(err)
	}
	v := r.Volume
	staging := filepath.Join(e.base, "staging", v.VolumeId)
	stage := func() {
		if _, err := e.node().NodeStageVolume(ctx(t), &csi.NodeStageVolumeRequest{VolumeId: v.VolumeId,
			StagingTargetPath: staging, VolumeCapability: xfsCap, VolumeContext: v.VolumeContext}); err != nil {
			t.Fatal(err)
		}
	}
	unstage := func() {
		if _, err := e.node().NodeUnstageVolume(ctx(t), &csi.NodeUnstageVolumeRequest{VolumeId: v.VolumeId, StagingTargetPath: staging}); err != nil {
			t.Fatal(err)
		}
	}
	stage()
	if out, _ := exec.Command("findmnt", "-n", "-o", "FSTYPE", staging).Output(); strings.TrimSpace(string(out)) != "xfs" {
		t.Fatalf("staging mount is %q, want xfs", out)
	}
	data := randBytes(1 << 20)
	writeSynced(t, filepath.Join(staging, "f"), data)
	before := fsSize(t, staging)
	unstage()
	if _, err := e.ctrl().ControllerExpandVolume(ctx(t), &csi.ControllerExpandVolumeRequest{VolumeId: v.VolumeId,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 448 << 20}, VolumeCapability: xfsCap}); err != nil {
		t.Fatal(err)
	}
	stage()
	if _, err := e.node().NodeExpandVolume(ctx(t), &csi.NodeExpandVolumeRequest{VolumeId: v.VolumeId, VolumePath: staging,
		StagingTargetPath: staging, CapacityRange: &csi.CapacityRange{RequiredBytes: 448 << 20}, VolumeCapability: xfsCap}); err != nil {
		t.Fatal(err)
	}
	if after := fsSize(t, staging); after < before+(100<<20) {
		t.Fatalf("xfs is %d bytes after expansion, was %d", after, before)
	}
	checkFile(t, filepath.Join(staging, "f"), data)
	unstage()
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
}
