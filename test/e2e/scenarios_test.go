//go:build e2e

package e2e

import (
	"fmt"
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

// A raw block claim is handed to the pod as a device of the claimed size;
// data written with O_DIRECT and fsync at an offset reads back in a second
// pod.
func TestRawBlockClaim(t *testing.T) {
	apply(t, pvcManifest("blk", driverName, "1Gi", "Block"))
	apply(t, podManifest("blk-writer", "blk", "Block", `
test "$(blockdev --getsize64 /dev/xvda)" = 1073741824
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 status=none
dd if=/tmp/pattern of=/dev/xvda bs=1M seek=3 oflag=direct conv=fsync,notrunc status=none
echo "sum=$(sha256sum < /tmp/pattern | cut -d' ' -f1)"`))
	waitPod(t, "blk-writer", "Succeeded", 4*time.Minute)
	sum := logValue(t, "blk-writer", "sum=")
	deletePod(t, "blk-writer")
	apply(t, podManifest("blk-reader", "blk", "Block", fmt.Sprintf(`
test "$(dd if=/dev/xvda bs=1M skip=3 count=8 iflag=direct status=none | sha256sum | cut -d' ' -f1)" = %s
echo verified`, sum)))
	waitPod(t, "blk-reader", "Succeeded", 4*time.Minute)
	deletePod(t, "blk-reader")
	deletePVC(t, "blk")
}

// logValue returns what follows prefix on a line of the pod's log.
func logValue(t *testing.T, pod, prefix string) string {
	t.Helper()
	for _, l := range strings.Split(podLog(pod), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), prefix); ok && v != "" {
			return v
		}
	}
	t.Fatalf("no %q in the log of %s:\n%s", prefix, pod, podLog(pod))
	return ""
}

// A StorageClass tuned with the README's parameters (xfs, a 128Mi cache
// slice, writeback and read-cache tunables) gives a working xfs volume.
// (TestMetricsShowTheVolume checks that the cache size reached the engine.)
func TestTunedStorageClass(t *testing.T) {
	apply(t, pvcManifest("tuned", "writeboost-tuned", "1Gi", "Filesystem"))
	apply(t, podManifest("tuned-writer", "tuned", "Filesystem", `
grep -q ' /data xfs ' /proc/mounts
dd if=/dev/urandom of=/data/blob bs=1M count=8 conv=fsync status=none
sha256sum /data/blob > /data/sums && sync /data/sums
echo written`))
	waitPod(t, "tuned-writer", "Succeeded", 4*time.Minute)
	deletePod(t, "tuned-writer")
	apply(t, podManifest("tuned-reader", "tuned", "Filesystem", `sha256sum -c /data/sums; echo verified`))
	waitPod(t, "tuned-reader", "Succeeded", 4*time.Minute)
	deletePod(t, "tuned-reader")
	deletePVC(t, "tuned")
}

// A StorageClass with a bad parameter: the claim stays Pending and its
// ProvisioningFailed event names the parameter.
func TestBadStorageClassParameterNamedInEvent(t *testing.T) {
	apply(t, pvcManifest("bad", "writeboost-bad", "1Gi", "Filesystem"))
	apply(t, podManifest("bad-user", "bad", "Filesystem", `true`))
	var msg string
	eventually(t, "a ProvisioningFailed event on claim bad", 2*time.Minute, func() (bool, error) {
		out, err := run(nil, "get", "events", "-n", ns, "--field-selector",
			"involvedObject.kind=PersistentVolumeClaim,involvedObject.name=bad,reason=ProvisioningFailed",
			"-o", "jsonpath={.items[*].message}")
		msg = out
		return err == nil && out != "", err
	})
	if !strings.Contains(msg, "writebackThreshold") || !strings.Contains(msg, "InvalidArgument") {
		t.Fatalf("ProvisioningFailed event does not name the parameter with InvalidArgument: %s", msg)
	}
	if p, _ := jsonpath("pvc", "bad", "{.status.phase}"); p != "Pending" {
		t.Fatalf("claim with a bad parameter is %q, want Pending", p)
	}
	deletePod(t, "bad-user")
	deletePVC(t, "bad")
}

// The writer script appends numbered records to /data/log, each with its
// own fsync, and prints "acked N" once record N is durable. It first checks
// records already there (a pod that comes back after a drain) and prints
// "found N". It stops at /data/stop (or SIGTERM), printing "sum=" of the
// log; any failed write ends it with "WRITE-ERROR" and a failed pod.
const writerScript = `
check() { awk '{ if ($1 != "rec" || $2 + 0 != NR - 1 || length($3) != 16) { print "BAD-RECORD line " NR ": " $0; exit 1 } } END { print "found " NR }' /data/log; }
i=0
if [ -e /data/log ]; then check; i=$(wc -l < /data/log); fi
rm -f /data/stop
trap 'echo "terminated after $i"; exit 0' TERM
while [ ! -e /data/stop ]; do
  r=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
  printf 'rec %08d %s\n' "$i" "$r" | dd of=/data/log oflag=append conv=notrunc,fsync status=none 2>/tmp/err || { echo "WRITE-ERROR at $i: $(cat /tmp/err)"; exit 1; }
  echo "acked $i"
  i=$((i + 1))
done
check
echo "sum=$(sha256sum < /data/log | cut -d' ' -f1)"
`

// ackedCount is the number of records the writer's log says are durable.
func ackedCount(t *testing.T, pod string) int {
	t.Helper()
	n := -1
	for _, l := range strings.Split(podLog(pod), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "acked "); ok {
			if k, err := strconv.Atoi(v); err == nil {
				n = k
			}
		}
	}
	return n + 1
}

// waitAcks waits until the writer acknowledged at least n more records.
func waitAcks(t *testing.T, pod string, more int) int {
	t.Helper()
	start := ackedCount(t, pod)
	var now int
	eventually(t, fmt.Sprintf("%s to acknowledge %d more records", pod, more), 3*time.Minute, func() (bool, error) {
		now = ackedCount(t, pod)
		return now >= start+more, fmt.Errorf("%d acknowledged", now)
	})
	return now
}

// stopWriter makes the writer stop, waits for it to succeed and returns
// the checksum of its log.
func stopWriter(t *testing.T, pod string) string {
	t.Helper()
	kubectl(t, "exec", "-n", ns, pod, "--", "touch", "/data/stop")
	waitPod(t, pod, "Succeeded", 3*time.Minute)
	return logValue(t, pod, "sum=")
}

// verifyLog checks in a new pod that the log has exactly the records the
// writer acknowledged and the writer's checksum.
func verifyLog(t *testing.T, claim string, records int, sum string) {
	t.Helper()
	apply(t, podManifest(claim+"-verify", claim, "Filesystem", fmt.Sprintf(`
test "$(wc -l < /data/log)" = %d
awk '{ if ($1 != "rec" || $2 + 0 != NR - 1) exit 1 }' /data/log
test "$(sha256sum < /data/log | cut -d' ' -f1)" = %s
echo verified`, records, sum)))
	waitPod(t, claim+"-verify", "Succeeded", 4*time.Minute)
	deletePod(t, claim+"-verify")
}

// pluginPod is the name of the running plugin pod of the node.
func pluginPod(t *testing.T) string {
	t.Helper()
	return kubectl(t, "get", "pods", "-n", pluginNS, "-l", pluginLabel, "--field-selector=status.phase=Running",
		"-o", "jsonpath={.items[0].metadata.name}")
}

// waitPluginReplaced waits for a ready plugin pod other than old.
func waitPluginReplaced(t *testing.T, old string) {
	t.Helper()
	eventually(t, "a new ready plugin pod", 5*time.Minute, func() (bool, error) {
		out, err := run(nil, "get", "pods", "-n", pluginNS, "-l", pluginLabel, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err != nil {
			return false, err
		}
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) == 2 && f[0] != old && f[1] == "True" {
				return true, nil
			}
		}
		return false, fmt.Errorf("pods: %s", out)
	})
}

// noFailedPreStop fails the test if the kubelet reported a failed preStop
// hook of a plugin pod.
func noFailedPreStop(t *testing.T) {
	t.Helper()
	out := kubectl(t, "get", "events", "-n", pluginNS, "--field-selector", "reason=FailedPreStopHook", "-o", "jsonpath={.items[*].message}")
	if out != "" {
		t.Fatalf("the plugin's preStop hook failed: %s", out)
	}
}
