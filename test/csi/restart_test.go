package csi

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestSlowRecoveryNotRestarted: a plugin killed with a full log comes back
// on a cache device whose every read is slow, so re-adopting its volume
// takes longer than the liveness budget. The test plays kubelet's probes
// as the chart sets them, scaled down: a startup probe with a large budget,
// then a liveness probe that would restart the plugin after livenessBudget
// of failed probes. The plugin must listen at once, answer Unavailable for
// the recovering volume and Ready=false from Probe (never an error) while
// it recovers, become ready within the startup budget, stay ready (no
// liveness failure, so no restart), and the pod's I/O, blocked while the
// server was away, must resume and complete.
func TestSlowRecoveryNotRestarted(t *testing.T) {
	const (
		readDelay      = 80 * time.Millisecond
		livenessBudget = 2 * time.Second // chart: 10 s initial delay + 5 x 10 s, scaled down
		startupBudget  = 3 * time.Minute // chart: startupSeconds
	)
	e := newEnv(t)
	// A cache of 128 segments, no background writeback: the log fills and
	// recovery has every segment to read.
	params := map[string]string{"cacheSize": "64Mi", "writebackThreshold": "0", "csi.storage.k8s.io/fstype": "ext4"}
	r, err := e.ctrl().CreateVolume(ctx(t), &csi.CreateVolumeRequest{Name: "pvc-slow", Parameters: params,
		CapacityRange: &csi.CapacityRange{RequiredBytes: 256 << 20}, VolumeCapabilities: []*csi.VolumeCapability{mountCap}})
	if err != nil {
		t.Fatal(err)
	}
	v := r.Volume
	staging := e.stage(t, v)
	target := e.publish(t, v, staging)
	before := randBytes(40 << 20)
	writeSynced(t, filepath.Join(target, "before"), before)

	e.kill()
	// The pod keeps writing while the plugin is away: its write and fsync
	// block in the kernel (the relay holds them) until the volume is back.
	podDone := make(chan error, 1)
	during := randBytes(1 << 20)
	go func() {
		f, err := os.Create(filepath.Join(target, "during"))
		if err == nil {
			_, err = f.Write(during)
		}
		if err == nil {
			err = f.Sync()
		}
		if f != nil {
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}
		podDone <- err
	}()

	e.extra = append(e.extra, fmt.Sprintf("--debug-cache-read-delay=%s", readDelay))
	launched := time.Now()
	e.launch()
	listen := time.Since(launched)

	// kubelet's view: probe every 100 ms; during startup count nothing;
	// after the first ready probe, a run of failures as long as the
	// liveness budget would restart the plugin.
	var sawUnavailable, sawNotReady bool
	var ready time.Duration
	var failingSince time.Time
	var restarts atomic.Int32
	for {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		pr, err := csi.NewIdentityClient(e.conn).Probe(c, &csi.ProbeRequest{})
		cancel()
		if err != nil {
			t.Fatalf("Probe during recovery returned an error (the livenessprobe sidecar would report it the same as a dead plugin): %v", err)
		}
		if pr.GetReady().GetValue() {
			ready = time.Since(launched)
			break
		}
		sawNotReady = true
		if time.Since(launched) > startupBudget {
			t.Fatalf("not ready within the startup budget %s", startupBudget)
		}
		// kubelet retries its calls for the volume meanwhile.
		_, err = e.node().NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: v.VolumeId,
			StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap, VolumeContext: v.VolumeContext})
		switch status.Code(err) {
		case codes.Unavailable:
			sawUnavailable = true
		case codes.OK:
		default:
			t.Fatalf("NodePublishVolume during recovery: %v, want Unavailable", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Liveness from here on: watch a few budgets' worth of probes.
	for end := time.Now().Add(2 * livenessBudget); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		c, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		pr, err := csi.NewIdentityClient(e.conn).Probe(c, &csi.ProbeRequest{})
		cancel()
		if err != nil || !pr.GetReady().GetValue() {
			if failingSince.IsZero() {
				failingSince = time.Now()
			}
			if time.Since(failingSince) >= livenessBudget {
				restarts.Add(1)
			}
			continue
		}
		failingSince = time.Time{}
	}
	t.Logf("restart with a slow cache device (%s per read): listening after %s, ready after %s (liveness budget %s); NodePublishVolume meanwhile: Unavailable=%v",
		readDelay, listen.Round(time.Millisecond), ready.Round(time.Millisecond), livenessBudget, sawUnavailable)
	if ready <= livenessBudget {
		t.Fatalf("recovery took %s, not longer than the liveness budget %s: the test proves nothing; slow the device down", ready, livenessBudget)
	}
	if listen >= ready || !sawNotReady {
		t.Errorf("the plugin did not listen before its recovery ended (listening %s, ready %s)", listen, ready)
	}
	if !sawUnavailable {
		t.Error("no call on the recovering volume was answered Unavailable")
	}
	if n := restarts.Load(); n > 0 {
		t.Errorf("the liveness probe failed for its whole budget after startup %d times", n)
	}
	if !strings.Contains(e.log(), "Re-adoption done") {
		t.Error("no re-adoption logged")
	}
	select {
	case err := <-podDone:
		if err != nil {
			t.Fatalf("the pod's write during the restart failed: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("the pod's write during the restart never completed")
	}
	dropCaches()
	checkFile(t, filepath.Join(target, "before"), before)
	checkFile(t, filepath.Join(target, "during"), during)
	after := randBytes(1 << 20)
	writeSynced(t, filepath.Join(target, "after"), after)
	if _, err := e.node().NodePublishVolume(ctx(t), &csi.NodePublishVolumeRequest{VolumeId: v.VolumeId,
		StagingTargetPath: staging, TargetPath: target, VolumeCapability: mountCap, VolumeContext: v.VolumeContext}); err != nil {
		t.Fatalf("NodePublishVolume after recovery: %v", err)
	}
	e.unpublishUnstage(t, v, staging, target)
	if _, err := e.ctrl().DeleteVolume(ctx(t), &csi.DeleteVolumeRequest{VolumeId: v.VolumeId}); err != nil {
		t.Fatal(err)
	}
}
