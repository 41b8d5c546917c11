package kernel

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// TestKernelNodeReboot: a node reboots with volumes staged. The first
// boot makes the node's disks (virtio disks, host files: an NVMe pool, an
// HDD pool and the node's root with the plugin's --state-dir and kubelet's
// staging and pod directories), runs `writeboost csi`, creates a Mount and
// a Block volume, stages and publishes them as kubelet does, and writes
// files with fsync and raw blocks with fdatasync (each reported on the
// guest's output only once durable), then the kernel reboots at once
// (sysrq b: no unmount, no plugin stop; its --run-dir, RAM buffers and
// /dev/shm are tmpfs and gone). The second boot checks it is a new boot
// (another boot id) with no nbd device connected, mounts the node's disks,
// starts the plugin on the same state dir and calls NodeStage and
// NodePublish again (kubelet's order after a reboot); the plugin recovers
// each volume from its cache device alone, over kernel-netlink NBD, and
// every reported byte reads back. Then unpublish, unstage, delete, and the
// pools' capacity is back to what it was.
func TestKernelNodeReboot(t *testing.T) {
	requireVMTier(t)
	dir := workDir(t)
	wbBin, _ := binaries(t)
	disks := []string{
		sparseFile(t, filepath.Join(dir, "nvme.img"), 256<<20),
		sparseFile(t, filepath.Join(dir, "hdd.img"), 768<<20),
		sparseFile(t, filepath.Join(dir, "root.img"), 64<<20),
	}
	manifest := filepath.Join(dir, "manifest.txt")
	var bootIDs []string
	var records []string
	for n := 0; n < 2; n++ {
		if err := os.WriteFile(manifest, []byte(strings.Join(records, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		began := time.Now()
		b := startBoot(t, dir, fmt.Sprintf("boot%d", n), disks, guestEnv+"=reboot",
			"WB_BIN="+wbBin, "WB_BOOT="+strconv.Itoa(n), "WB_MANIFEST="+manifest)
		var fresh []string
		for l := range b.lines {
			switch {
			case strings.HasPrefix(l, "DURABLE "):
				fresh = append(fresh, strings.TrimPrefix(l, "DURABLE "))
			case strings.HasPrefix(l, "BOOTID "):
				bootIDs = append(bootIDs, strings.TrimPrefix(l, "BOOTID "))
			}
		}
		rc := b.wait()
		out := b.output()
		want := 0
		if n == 0 {
			// sysrq b ends QEMU (-no-reboot) without an exit code.
			want = 125
		}
		if rc != want || strings.Contains(out, "GUEST-FAIL") || (n == 0 && !strings.Contains(out, "REBOOTING")) ||
			(n == 1 && !strings.Contains(out, "REBOOT-VERIFIED")) {
			b.fail("boot %d: exit %d, want %d %s", n, rc, want, b.guestFailure())
		}
		if n == 0 && len(fresh) == 0 {
			b.fail("boot 0 reported nothing durable")
		}
		if n == 1 {
			// Both volumes came back from their cache devices alone:
			// dirty blocks found in the log, no RAM buffer replayed.
			if m := recoveredRE.FindAllString(out, -1); len(m) < 2 {
				b.fail("boot 1: %d volumes recovered with dirty blocks from the cache device (want 2)", len(m))
			}
		}
		t.Logf("boot %d (%s): %d durable records written, %d verified; guest: %s", n, time.Since(began).Round(time.Second), len(fresh), len(records), b.phases())
		records = append(records, fresh...)
	}
	if len(bootIDs) != 2 || bootIDs[0] == bootIDs[1] {
		t.Fatalf("boot ids %q: want two different ones", bootIDs)
	}
}

var recoveredRE = regexp.MustCompile(`"cache recovered" [^\n]*cleanShutdown=false [^\n]*replayedRAMBuffers=0 [^\n]*dirtyBlocks=[1-9]`)

var rebootMountCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

var rebootBlockCap = &csi.VolumeCapability{
	AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// The node's layout inside the guest.
const (
	nodeRoot  = "/run/node"
	nodeNVMe  = nodeRoot + "/nvme"
	nodeHDD   = nodeRoot + "/hdd"
	nodeDisk  = nodeRoot + "/root"
	nodeState = nodeDisk + "/state"
)

type rebootVol struct {
	name    string
	cap     *csi.VolumeCapability
	id      string
	context map[string]string
}

func (v *rebootVol) staging() string { return filepath.Join(nodeDisk, "staging", v.name) }
func (v *rebootVol) target() string  { return filepath.Join(nodeDisk, "pods", v.name, "mount") }

// The guest side: WB_BIN, WB_BOOT, WB_MANIFEST. Records: "file NAME SHA
// SIZE" (a file on the Mount volume), "block OFFSET SHA SIZE" (a range
// of the Block volume), "vol NAME ID" (the volume ids across the reboot).
func guestReboot() error {
	bin := os.Getenv("WB_BIN")
	n, _ := strconv.Atoi(os.Getenv("WB_BOOT"))
	id, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return err
	}
	fmt.Printf("BOOTID %s\n", strings.TrimSpace(string(id)))
	phase("start")
	if n == 1 {
		// A new boot: no nbd device is connected.
		pids, _ := filepath.Glob("/sys/block/nbd*/pid")
		if len(pids) > 0 {
			return fmt.Errorf("nbd devices connected after the reboot: %v", pids)
		}
	}
	for i, m := range []string{nodeNVMe, nodeHDD, nodeDisk} {
		dev := fmt.Sprintf("/dev/vd%c", 'a'+i)
		if n == 0 {
			if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
				return fmt.Errorf("mkfs %s: %v %s", dev, err, out)
			}
		}
		os.MkdirAll(m, 0o755)
		if out, err := exec.Command("mount", dev, m).CombinedOutput(); err != nil {
			return fmt.Errorf("mount %s: %v %s", dev, err, out)
		}
	}
	phase("disks")
	os.MkdirAll(filepath.Join(nodeHDD, "wb"), 0o755)
	os.MkdirAll(filepath.Join(nodeNVMe, "wb"), 0o755)
	plugin, conn, err := startPlugin(bin)
	if err != nil {
		return err
	}
	defer plugin.Process.Kill()
	phase("plugin")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ctrl, node := csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	vols := []*rebootVol{{name: "pvc-fs", cap: rebootMountCap}, {name: "pvc-raw", cap: rebootBlockCap}}
	// No background writeback: what was flushed lives in the cache
	// device only, and the reboot's recovery must find it there.
	params := map[string]string{"cacheSize": "16Mi", "writebackThreshold": "0", "csi.storage.k8s.io/fstype": "ext4"}
	var before int64
	if n == 0 {
		c, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{})
		if err != nil {
			return fmt.Errorf("GetCapacity: %w", err)
		}
		before = c.AvailableCapacity
		fmt.Printf("DURABLE capacity %d\n", before)
	}
	for _, v := range vols {
		// CreateVolume is idempotent: after the reboot it returns the
		// same volume (and its context) again, as the external
		// provisioner would have it recorded.
		r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: v.name, Parameters: params,
			CapacityRange: &csi.CapacityRange{RequiredBytes: 96 << 20}, VolumeCapabilities: []*csi.VolumeCapability{v.cap}})
		if err != nil {
			return fmt.Errorf("CreateVolume %s: %w", v.name, err)
		}
		v.id, v.context = r.Volume.VolumeId, r.Volume.VolumeContext
		os.MkdirAll(filepath.Dir(v.staging()), 0o755)
		if _, err := node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging(),
			VolumeCapability: v.cap, VolumeContext: v.context}); err != nil {
			return fmt.Errorf("NodeStageVolume %s (boot %d): %w", v.name, n, err)
		}
		os.MkdirAll(filepath.Dir(v.target()), 0o755)
		if _, err := node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging(),
			TargetPath: v.target(), VolumeCapability: v.cap, VolumeContext: v.context}); err != nil {
			return fmt.Errorf("NodePublishVolume %s (boot %d): %w", v.name, n, err)
		}
	}
	if err := checkNetlink(filepath.Join(nodeState, "attach")); err != nil {
		return err
	}
	phase("staged")
	if n == 0 {
		return rebootWrite(vols)
	}
	if err := rebootVerify(vols); err != nil {
		return err
	}
	phase("verified")
	for _, v := range vols {
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target()}); err != nil {
			return fmt.Errorf("NodeUnpublishVolume %s: %w", v.name, err)
		}
		if _, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging()}); err != nil {
			return fmt.Errorf("NodeUnstageVolume %s: %w", v.name, err)
		}
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
			return fmt.Errorf("DeleteVolume %s: %w", v.name, err)
		}
	}
	c, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{})
	if err != nil {
		return fmt.Errorf("GetCapacity: %w", err)
	}
	if want := manifestCapacity(); c.AvailableCapacity != want {
		return fmt.Errorf("capacity %d after deleting every volume; %d before they were made", c.AvailableCapacity, want)
	}
	conn.Close()
	if err := plugin.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := plugin.Wait(); err != nil {
		return fmt.Errorf("plugin's graceful stop: %w", err)
	}
	fmt.Println("REBOOT-VERIFIED")
	return nil
}

func manifestCapacity() int64 {
	b, _ := os.ReadFile(os.Getenv("WB_MANIFEST"))
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "capacity" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v
		}
	}
	return -1
}

// startPlugin runs `writeboost csi` on the node's disks (state on the
// node's root disk, run dir on tmpfs) and waits for Probe ready.
func startPlugin(bin string) (*exec.Cmd, *grpc.ClientConn, error) {
	sock := "/run/csi/csi.sock"
	os.MkdirAll(filepath.Dir(sock), 0o755)
	cmd := exec.Command(bin, "csi", "--endpoint", "unix://"+sock, "--node-id", "node-1",
		"--hdd-pool", filepath.Join(nodeHDD, "wb"), "--nvme-pool", filepath.Join(nodeNVMe, "wb"),
		"--state-dir", nodeState, "--run-dir", "/run/writeboost", "-v=2")
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	pw.Close()
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			fmt.Println("plugin:", sc.Text())
		}
	}()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		if _, err := os.Stat(sock); err == nil {
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return nil, nil, err
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			r, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
			cancel()
			if err == nil && r.GetReady().GetValue() {
				return cmd, conn, nil
			}
			conn.Close()
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			return nil, nil, fmt.Errorf("plugin not ready within 3 minutes")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// rebootWrite writes files (fsync) on the Mount volume and ranges
// (fdatasync) of the Block volume, reporting each once durable, then
// reboots the kernel at once.
func rebootWrite(vols []*rebootVol) error {
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	for _, v := range vols {
		fmt.Printf("DURABLE vol %s %s\n", v.name, v.id)
	}
	fsDir := vols[0].target()
	raw, err := os.OpenFile(vols[1].target(), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	for i := 0; i < 24; i++ {
		data := make([]byte, 4096*(1+rng.Intn(48))+rng.Intn(4096))
		rng.Read(data)
		name := fmt.Sprintf("f%03d", i)
		if err := writeFile(filepath.Join(fsDir, name), data, true); err != nil {
			return err
		}
		if err := syncPath(fsDir); err != nil {
			return err
		}
		sum := sha256.Sum256(data)
		fmt.Printf("DURABLE file %s %s %d\n", name, hex.EncodeToString(sum[:]), len(data))
		blk := data[:len(data)&^4095]
		off := int64(i) * (256 << 10)
		if _, err := raw.WriteAt(blk, off); err != nil {
			return fmt.Errorf("write the block volume at %d: %w", off, err)
		}
		if err := syscall.Fdatasync(int(raw.Fd())); err != nil {
			return fmt.Errorf("fdatasync the block volume: %w", err)
		}
		sum = sha256.Sum256(blk)
		fmt.Printf("DURABLE block %d %s %d\n", off, hex.EncodeToString(sum[:]), len(blk))
	}
	// More without a flush: whatever of it survives, nothing else breaks.
	junk := make([]byte, 1<<20)
	rng.Read(junk)
	if err := writeFile(filepath.Join(fsDir, "unsynced"), junk, false); err != nil {
		return err
	}
	if _, err := raw.WriteAt(junk, 32<<20); err != nil {
		return err
	}
	fmt.Println("REBOOTING")
	os.Stdout.Sync()
	time.Sleep(500 * time.Millisecond) // the serial line drains
	// The kernel reboots at once: no sync, no unmount, no plugin stop.
	return os.WriteFile("/proc/sysrq-trigger", []byte("b"), 0)
}

// rebootVerify reads every durable record back through the re-staged
// volumes and checks the volume ids did not change.
func rebootVerify(vols []*rebootVol) error {
	b, err := os.ReadFile(os.Getenv("WB_MANIFEST"))
	if err != nil {
		return err
	}
	raw, err := os.Open(vols[1].target())
	if err != nil {
		return err
	}
	defer raw.Close()
	var bad []string
	nfile, nblock := 0, 0
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "vol":
			for _, v := range vols {
				if v.name == f[1] && v.id != f[2] {
					bad = append(bad, fmt.Sprintf("volume %s is %s after the reboot, was %s", v.name, v.id, f[2]))
				}
			}
		case "file":
			data, err := os.ReadFile(filepath.Join(vols[0].target(), f[1]))
			sum := sha256.Sum256(data)
			if err != nil || hex.EncodeToString(sum[:]) != f[2] || strconv.Itoa(len(data)) != f[3] {
				bad = append(bad, fmt.Sprintf("file %s: %d bytes, err %v; want %s bytes", f[1], len(data), err, f[3]))
				continue
			}
			nfile++
		case "block":
			off, _ := strconv.ParseInt(f[1], 10, 64)
			size, _ := strconv.Atoi(f[3])
			data := make([]byte, size)
			_, err := raw.ReadAt(data, off)
			sum := sha256.Sum256(data)
			if err != nil || hex.EncodeToString(sum[:]) != f[2] {
				bad = append(bad, fmt.Sprintf("block volume at %d (%d bytes): err %v or other data", off, size, err))
				continue
			}
			nblock++
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("after the reboot:\n%s", strings.Join(bad, "\n"))
	}
	if nfile == 0 || nblock == 0 {
		return fmt.Errorf("nothing to verify (%d files, %d block ranges)", nfile, nblock)
	}
	fmt.Printf("VERIFIED-AFTER-REBOOT %d files, %d block ranges\n", nfile, nblock)
	return nil
}
