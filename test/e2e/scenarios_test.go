//go:build e2e

package e2e

import (
	"strconv"
	"strings"
	"testing"
	"time"

	storagev1 "k8s.io/api/storage/v1"
)

// The CSIDriver object is installed, the kubelet registered the plugin
// (CSINode lists it with the chart's volume limit) and the node's
// provisioner published the pools' capacity for the StorageClass.
func TestDriverRegisteredAndCapacityPublished(t *testing.T) {
	kubectl(t, "get", "csidriver", driverName)
	eventually(t, "CSINode "+nodeName+" listing "+driverName, 2*time.Minute, func() (bool, error) {
		out, err := run(nil, "get", "csinode", nodeName, "-o",
			`jsonpath={.spec.drivers[?(@.name=="`+driverName+`")].allocatable.count}`)
		return err == nil && out == "64", err
	})
	eventually(t, "CSIStorageCapacity for "+driverName, 2*time.Minute, func() (bool, error) {
		c, err := capacity(t, driverName)
		return c > 0, err
	})
}

// capacity is the capacity a CSIStorageCapacity object of this node
// publishes for the StorageClass sc (0 if there is none yet).
func capacity(t *testing.T, sc string) (int64, error) {
	var list storagev1.CSIStorageCapacityList
	getJSON(t, &list, "csistoragecapacities", "-n", pluginNS)
	for _, c := range list.Items {
		if c.StorageClassName == sc && c.Capacity != nil {
			return c.Capacity.Value(), nil
		}
	}
	return 0, nil
}

// A WaitForFirstConsumer claim stays Pending until a pod uses it, then
// binds; the pod writes and fsyncs files; a second pod, started after the
// first is gone (volume unpublished and unstaged), reads them back intact.
func TestFilesystemClaimWriteThenReadInAnotherPod(t *testing.T) {
	apply(t, pvcManifest("fs", driverName, "1Gi", "Filesystem"))
	time.Sleep(3 * time.Second)
	if p, _ := jsonpath("pvc", "fs", "{.status.phase}"); p != "Pending" {
		t.Fatalf("claim of a WaitForFirstConsumer class is %q before any pod uses it, want Pending", p)
	}
	apply(t, podManifest("fs-writer", "fs", "Filesystem", `
dd if=/dev/urandom of=/data/blob bs=1M count=16 conv=fsync status=none
mkdir -p /data/dir && for i in 1 2 3 4 5 6 7 8; do echo "file $i" > /data/dir/f$i; done
sync /data/dir/* /data/dir
sha256sum /data/blob /data/dir/* > /data/sums && sync /data/sums
df -k /data | tail -1
echo written`))
	waitPod(t, "fs-writer", "Succeeded", 4*time.Minute)
	if p, _ := jsonpath("pvc", "fs", "{.status.phase}"); p != "Bound" {
		t.Fatalf("claim is %q after its pod ran, want Bound", p)
	}
	if log := podLog("fs-writer"); !strings.Contains(log, "written") {
		t.Fatalf("writer log: %s", log)
	}
	deletePod(t, "fs-writer")
	apply(t, podManifest("fs-reader", "fs", "Filesystem", `sha256sum -c /data/sums; grep -q '/data ext4' /proc/mounts; echo verified`))
	waitPod(t, "fs-reader", "Succeeded", 4*time.Minute)
	if log := podLog("fs-reader"); !strings.Contains(log, "verified") {
		t.Fatalf("reader log: %s", log)
	}
	deletePod(t, "fs-reader")
	deletePVC(t, "fs")
}

var _ = strconv.Itoa
