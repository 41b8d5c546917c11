#!/usr/bin/env bash
# `make e2e`: the chart installed with helm on a real single-node
# Kubernetes built here, then the scenarios of test/e2e through kubectl.
#   1. Kubernetes binaries from k8s.io/kubernetes (k8s.sh; cached by version)
#   2. images without Docker or a registry (images.sh; cached by content)
#   3. the cluster (cluster.sh up), torn down on any exit (cluster.sh down)
#   4. helm install of charts/writeboost-csi with values.yaml
#   5. go test -tags e2e ./test/e2e
# Needs root (mounts, loop devices, containers). Extra arguments go to go test;
# E2E_RUN=REGEXP runs only the matching scenarios (go test -run), e.g.
# `make e2e E2E_RUN=TestClaimExpansionOnline`.
set -euo pipefail
cd "$(dirname "$0")/../.."
. hack/e2e/env.sh
t0=$SECONDS
if [ "$(id -u)" -ne 0 ]; then
	if [ "${CI:-}" = true ]; then echo "e2e: needs root" >&2; exit 1; fi
	echo "e2e: SKIP: needs root (mounts, loop devices, containers)"
	exit 0
fi
for tool in etcd containerd runc ctr iptables mmdebstrap openssl helm mkfs.ext4 losetup; do
	command -v "$tool" >/dev/null || { echo "e2e: $tool missing (bash hack/deps.sh installs it)" >&2; exit 1; }
done
bash hack/e2e/k8s.sh
bash hack/e2e/images.sh
t_build=$((SECONDS - t0))

trap 'rc=$?; [ $rc -eq 0 ] || diagnose; bash hack/e2e/cluster.sh down; echo "e2e: total $((SECONDS - t0)) s (builds ${t_build} s)"; exit $rc' EXIT
export KUBECONFIG="$E2E_ROOT/admin.kubeconfig" PATH="$E2E_BIN:$PATH"
diagnose() {
	echo "== e2e failed: cluster state"
	kubectl get nodes,pods,pvc,pv,csistoragecapacities -A -o wide 2>&1 | head -80 || true
	kubectl get events -A --sort-by=.lastTimestamp 2>&1 | tail -40 || true
	kubectl -n kube-system logs -l app.kubernetes.io/name=writeboost-csi --all-containers --tail=60 --prefix 2>&1 | tail -150 || true
	echo "== kubelet log (tail)"; tail -40 "$E2E_ROOT/logs/kubelet.log" 2>/dev/null || true
}
bash hack/e2e/cluster.sh up
echo "e2e: helm install"
helm install writeboost charts/writeboost-csi -n kube-system -f hack/e2e/values.yaml
kubectl -n kube-system rollout status daemonset/writeboost-writeboost-csi-default --timeout=5m
echo "e2e: scenarios"
go test -tags e2e -count=1 -v -timeout 40m ./test/e2e/ ${E2E_RUN:+-run "$E2E_RUN"} "$@"
