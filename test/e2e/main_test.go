//go:build e2e

// Package e2e drives the chart installed on a real single-node Kubernetes
// (hack/e2e/e2e.sh builds and starts it, then runs these tests with
// `go test -tags e2e`) through kubectl only, as a user would: claims,
// pods, events, rollouts, drains, metrics. Each test creates what it needs
// in the namespace of the run and deletes it. The tests run in file order,
// one at a time, on the one node.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

const (
	driverName  = "writeboost.csi.io"
	pluginNS    = "kube-system"
	pluginLabel = "app.kubernetes.io/name=writeboost-csi"
	workload    = "localhost/writeboost-e2e/workload:e2e"
	ns          = "wb-e2e"
)

var nodeName string

func TestMain(m *testing.M) {
	if os.Getenv("KUBECONFIG") == "" {
		fmt.Fprintln(os.Stderr, "e2e: KUBECONFIG is not set: run these through hack/e2e/e2e.sh (make e2e)")
		os.Exit(1)
	}
	out, err := run(nil, "get", "nodes", "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil || out == "" {
		fmt.Fprintln(os.Stderr, "e2e: no node:", out, err)
		os.Exit(1)
	}
	nodeName = out
	if out, err := run(nil, "create", "namespace", ns); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: creating namespace:", out, err)
		os.Exit(1)
	}
	code := m.Run()
	if out, err := run(nil, "delete", "namespace", ns, "--wait=true", "--timeout=5m"); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: deleting namespace:", out, err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// run runs kubectl with stdin (if any) and returns its trimmed output.
func run(stdin []byte, args ...string) (string, error) {
	return runFor(3*time.Minute, stdin, args...)
}

// runFor is run with a timeout other than run's 3 minutes, for a long
// kubectl exec.
func runFor(timeout time.Duration, stdin []byte, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kubectl", args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	s := strings.TrimSpace(out.String())
	if err != nil {
		return s, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, s)
	}
	return s, nil
}

// kubectl runs kubectl and fails the test on an error.
func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := run(nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// apply applies a manifest in the test namespace.
func apply(t *testing.T, manifest string) {
	t.Helper()
	if _, err := run([]byte(manifest), "apply", "-n", ns, "-f", "-"); err != nil {
		t.Fatal(err)
	}
}

// getJSON decodes `kubectl get ... -o json` into v.
func getJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out := kubectl(t, append(append([]string{"get"}, args...), "-o", "json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("decoding kubectl get %v: %v", args, err)
	}
}

// eventually polls cond every second until it returns true or timeout;
// the last error or state is reported on failure.
func eventually(t *testing.T, what string, timeout time.Duration, cond func() (bool, error)) {
	t.Helper()
	end := time.Now().Add(timeout)
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		last = err
		if time.Now().After(end) {
			t.Fatalf("timed out after %v waiting for %s (last: %v)", timeout, what, last)
		}
		time.Sleep(time.Second)
	}
}

// jsonpath reads one field of an object in the test namespace.
func jsonpath(kind, name, path string) (string, error) {
	return run(nil, "get", "-n", ns, kind, name, "-o", "jsonpath="+path)
}

// waitPod waits for a pod to reach phase; a pod that ends in another
// terminal phase fails the test at once, with its log.
func waitPod(t *testing.T, name, phase string, timeout time.Duration) {
	t.Helper()
	eventually(t, "pod "+name+" "+phase, timeout, func() (bool, error) {
		p, err := jsonpath("pod", name, "{.status.phase}")
		if err != nil {
			return false, err
		}
		if p != phase && (p == "Failed" || p == "Succeeded") {
			t.Fatalf("pod %s ended %s, want %s; log:\n%s", name, p, phase, podLog(name))
		}
		return p == phase, fmt.Errorf("phase %q", p)
	})
}

// waitReady waits for a running pod's containers to be ready.
func waitReady(t *testing.T, name string, timeout time.Duration) {
	t.Helper()
	if _, err := run(nil, "wait", "-n", ns, "--for=condition=Ready", "pod/"+name, "--timeout="+timeout.String()); err != nil {
		t.Fatalf("%v\n%s", err, describe("pod", name))
	}
}

func podLog(name string) string {
	out, err := run(nil, "logs", "-n", ns, name, "--all-containers")
	if err != nil {
		return err.Error()
	}
	return out
}

func describe(kind, name string) string {
	out, _ := run(nil, "describe", "-n", ns, kind, name)
	return out
}

// deletePod deletes a pod and waits until it is gone (its volumes unpublished).
func deletePod(t *testing.T, name string) {
	t.Helper()
	kubectl(t, "delete", "-n", ns, "pod", name, "--wait=true", "--timeout=3m")
}

// deletePVC deletes a claim and waits until its PV is gone too.
func deletePVC(t *testing.T, name string) {
	t.Helper()
	pv, _ := jsonpath("pvc", name, "{.spec.volumeName}")
	kubectl(t, "delete", "-n", ns, "pvc", name, "--wait=true", "--timeout=3m")
	if pv == "" {
		return
	}
	eventually(t, "PV "+pv+" deleted", 3*time.Minute, func() (bool, error) {
		out, err := run(nil, "get", "pv", pv, "--ignore-not-found", "-o", "name")
		return err == nil && out == "", err
	})
}

// pvcManifest is a claim of class sc; mode is Filesystem or Block.
func pvcManifest(name, sc, size, mode string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: %s
spec:
  storageClassName: %s
  accessModes: [ReadWriteOnce]
  volumeMode: %s
  resources:
    requests:
      storage: %s
`, name, sc, mode, size)
}

// podManifest is a pod of the workload image running script with sh -e,
// the claim mounted at /data (Filesystem) or as /dev/xvda (Block).
func podManifest(name, claim, mode, script string) string {
	vol := "    volumeMounts:\n    - {name: data, mountPath: /data}\n"
	if mode == "Block" {
		vol = "    volumeDevices:\n    - {name: data, devicePath: /dev/xvda}\n"
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 30
  containers:
  - name: main
    image: %s
    imagePullPolicy: Never
    command: ["/bin/sh", "-ec", %q]
%s  volumes:
  - name: data
    persistentVolumeClaim: {claimName: %s}
`, name, workload, script, vol, claim)
}
