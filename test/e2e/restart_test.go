//go:build e2e

// Restarts of the plugin while a pod writes. On this machine the kernel has
// no nbd: the plugin attaches volumes through nbdfuse, a reconnecting relay
// and a loop device, a chain of processes that must outlive the plugin's
// pod. They run in the host's PID namespace (the chart's hostPID) and leave
// the pod's cgroups once started (pkg/attach/cgroup.go), so the runtime
// does not kill them with the pod; the relay holds the writer's I/O until
// the new plugin serves the volume again. Before that, deleting the plugin
// pod killed the chain and the writer's filesystem hung.

package e2e

import (
	"strings"
	"testing"
	"time"
)

// restartWhileWriting runs a writer, restarts the plugin with restart,
// and checks the writer saw no error and every record is intact.
func restartWhileWriting(t *testing.T, claim string, restart func(old string)) {
	apply(t, pvcManifest(claim, driverName, "1Gi", "Filesystem"))
	pod := claim + "-writer"
	writer := strings.Replace(podManifest(pod, claim, "Filesystem", writerScript), "restartPolicy: Never", "restartPolicy: Never", 1)
	apply(t, writer)
	waitReady(t, pod, 4*time.Minute)
	waitAcks(t, pod, 50)
	old := pluginPod(t)
	restart(old)
	waitPluginReplaced(t, old)
	noFailedPreStop(t)
	// The writer goes on through the new plugin.
	waitAcks(t, pod, 50)
	sum := stopWriter(t, pod)
	n := ackedCount(t, pod)
	deletePod(t, pod)
	verifyLog(t, claim, n, sum)
	deletePVC(t, claim)
}

// The plugin pod is deleted (the DaemonSet recreates it) while a pod
// writes and fsyncs: the writer sees no error and no record is lost.
func TestPluginPodDeletedWhileWriting(t *testing.T) {
	restartWhileWriting(t, "restart", func(old string) {
		kubectl(t, "delete", "pod", "-n", pluginNS, old, "--wait=false")
	})
}

// The same through `kubectl rollout restart` of the plugin's DaemonSet.
func TestPluginRolloutRestartWhileWriting(t *testing.T) {
	restartWhileWriting(t, "rollout", func(string) {
		ds := kubectl(t, "get", "daemonset", "-n", pluginNS, "-l", pluginLabel, "-o", "jsonpath={.items[0].metadata.name}")
		kubectl(t, "rollout", "restart", "-n", pluginNS, "daemonset/"+ds)
		kubectl(t, "rollout", "status", "-n", pluginNS, "daemonset/"+ds, "--timeout=5m")
	})
}
