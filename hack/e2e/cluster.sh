#!/usr/bin/env bash
# A single-node Kubernetes cluster for the e2e, on this machine only:
#   cluster.sh up     start etcd, containerd, the control plane and a kubelet
#   cluster.sh down   stop everything and remove what `up` made
#
# Everything listens on 127.0.0.1 or a unix socket. The node's IP and the
# API's ClusterIP live on a bridge of our own ($E2E_BRIDGE); one
# iptables nat rule in our own chain sends the ClusterIP to the API on
# loopback (host-network pods such as the plugin's sidecars reach the API
# that way); pods that are not on the host network get a bridge of our own
# with no gateway and no masquerading, so nothing is routed off the machine.
# `down` is safe to run at any point of a failed `up`, and twice.
set -euo pipefail
cd "$(dirname "$0")/../.."
. hack/e2e/env.sh

R=$E2E_ROOT
KUBELET_DIR=/var/lib/kubelet    # the chart's default kubeletDir
PLUGIN_DIRS=(/var/lib/writeboost /run/writeboost)   # the chart's default stateDir and runDir
log() { echo "cluster: $*"; }

# start NAME CMD...: runs CMD in the background, logs in $R/logs/NAME.log.
start() {
	local name=$1; shift
	"$@" >"$R/logs/$name.log" 2>&1 &
	echo $! >"$R/pids/$name"
}

# wait_for WHAT SECONDS CMD...: retries CMD until it succeeds.
wait_for() {
	local what=$1 secs=$2; shift 2
	local end=$((SECONDS + secs))
	until "$@" >/dev/null 2>&1; do
		if [ $SECONDS -ge $end ]; then
			log "timed out after ${secs}s waiting for $what"
			return 1
		fi
		sleep 1
	done
}

certs() {
	local d=$R/pki
	mkdir -p "$d"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" -days 2 \
		-subj "/CN=writeboost-e2e-ca" 2>/dev/null
	openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
	openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
	# cert NAME SUBJECT [SAN]
	cert() {
		openssl req -newkey rsa:2048 -nodes -keyout "$d/$1.key" -out "$d/$1.csr" -subj "$2" 2>/dev/null
		local ext=$d/$1.ext
		printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=%s\n' \
			"${4:-clientAuth}" >"$ext"
		[ -z "${3:-}" ] || echo "subjectAltName=$3" >>"$ext"
		openssl x509 -req -in "$d/$1.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
			-out "$d/$1.crt" -days 2 -extfile "$ext" 2>/dev/null
	}
	cert apiserver "/CN=kube-apiserver" \
		"IP:127.0.0.1,IP:$E2E_API_CLUSTER_IP,IP:$E2E_NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
		serverAuth
	cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
	cert admin "/O=system:masters/CN=writeboost-e2e-admin"
	cert controller-manager "/CN=system:kube-controller-manager"
	cert scheduler "/CN=system:kube-scheduler"
	cert kubelet "/O=system:nodes/CN=system:node:$E2E_NODE_NAME"
	for n in admin controller-manager scheduler kubelet; do
		kubeconfig "$n" >"$R/$n.kubeconfig"
	done
}

kubeconfig() {
	cat <<KC
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$E2E_API_PORT
    certificate-authority: $R/pki/ca.crt
users:
- name: $1
  user:
    client-certificate: $R/pki/$1.crt
    client-key: $R/pki/$1.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $1, namespace: default}
current-context: e2e
KC
}

network() {
	# The node IP (the kubelet refuses a loopback node IP) and the API's
	# ClusterIP live on the pods' bridge, made here before CNI adopts it,
	# both /32 so no route covers anything else (this kernel has no dummy links).
	ip link add "$E2E_BRIDGE" type bridge
	ip addr add "$E2E_NODE_IP/32" dev "$E2E_BRIDGE"
	ip addr add "$E2E_API_CLUSTER_IP/32" dev "$E2E_BRIDGE"
	ip link set "$E2E_BRIDGE" up
	iptables -w -t nat -N "$E2E_CHAIN"
	iptables -w -t nat -A "$E2E_CHAIN" -d "$E2E_API_CLUSTER_IP/32" -p tcp --dport 443 \
		-j DNAT --to-destination "127.0.0.1:$E2E_API_PORT"
	iptables -w -t nat -I OUTPUT 1 -j "$E2E_CHAIN"
	mkdir -p "$R/cni/net.d" "$R/cni/ipam"
	cat >"$R/cni/net.d/10-writeboost-e2e.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "writeboost-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "$E2E_BRIDGE", "isGateway": false, "ipMasq": false,
     "ipam": {"type": "host-local", "dataDir": "$R/cni/ipam", "ranges": [[{"subnet": "$E2E_POD_CIDR"}]]}},
    {"type": "loopback"}
  ]
}
CNI
}

containerd_up() {
	mkdir -p "$R/containerd"
	cat >"$R/containerd/config.toml" <<TOML
version = 2
root = "$R/containerd/root"
state = "$R/containerd/state"
[grpc]
  address = "$R/containerd.sock"
[ttrpc]
  address = "$R/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$R/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$E2E_IMAGE_PREFIX/pause:e2e"
  # root here lacks CAP_SYS_RESOURCE: without this runc cannot set a
  # sandbox's oom_score_adj and every pod fails to start.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$R/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$R/cni/net.d"
TOML
	start containerd containerd --config "$R/containerd/config.toml"
	wait_for containerd 30 ctr --address "$R/containerd.sock" version
	for t in "$E2E_CACHE"/images/*.tar; do
		[ -L "$t" ] || continue
		ctr --address "$R/containerd.sock" -n k8s.io images import --no-unpack=false "$t" >/dev/null
	done
	log "images: $(ctr --address "$R/containerd.sock" -n k8s.io images ls -q | grep -c "$E2E_IMAGE_PREFIX") imported"
}

control_plane_up() {
	mkdir -p "$R/etcd"
	mount -t tmpfs -o size=1g tmpfs "$R/etcd"   # fast fsync; the cluster lives for one run
	start etcd etcd --name e2e --data-dir "$R/etcd/data" \
		--listen-client-urls "http://127.0.0.1:$E2E_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$E2E_ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$((E2E_ETCD_PORT + 1))" \
		--initial-advertise-peer-urls "http://127.0.0.1:$((E2E_ETCD_PORT + 1))" \
		--initial-cluster "e2e=http://127.0.0.1:$((E2E_ETCD_PORT + 1))" --listen-metrics-urls ""
	local p=$R/pki
	start kube-apiserver "$E2E_BIN/kube-apiserver" \
		--bind-address=127.0.0.1 --secure-port="$E2E_API_PORT" --advertise-address="$E2E_NODE_IP" \
		--etcd-servers="http://127.0.0.1:$E2E_ETCD_PORT" \
		--service-cluster-ip-range="$E2E_SERVICE_CIDR" --endpoint-reconciler-type=none \
		--tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
		--client-ca-file="$p/ca.crt" --authorization-mode=Node,RBAC --anonymous-auth=false \
		--enable-admission-plugins=NodeRestriction \
		--kubelet-client-certificate="$p/apiserver-kubelet-client.crt" --kubelet-client-key="$p/apiserver-kubelet-client.key" \
		--kubelet-preferred-address-types=Hostname \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
		--allow-privileged=true --profiling=false
	wait_for "the API server" 90 "$E2E_BIN/kubectl" --kubeconfig "$R/admin.kubeconfig" get --raw /readyz
	start kube-controller-manager "$E2E_BIN/kube-controller-manager" \
		--kubeconfig="$R/controller-manager.kubeconfig" --authentication-kubeconfig="$R/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$R/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
		--service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
		--cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
		--allocate-node-cidrs=false --profiling=false
	start kube-scheduler "$E2E_BIN/kube-scheduler" \
		--kubeconfig="$R/scheduler.kubeconfig" --authentication-kubeconfig="$R/scheduler.kubeconfig" \
		--authorization-kubeconfig="$R/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false --profiling=false
}

kc() { "$E2E_BIN/kubectl" --kubeconfig "$R/admin.kubeconfig" "$@"; }
node_ready() {
	[ "$(kc get node "$E2E_NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]
}

kubelet_up() {
	# The kubelet's directory must be a shared mount for Bidirectional
	# propagation (/ is private here); so must the plugin's state dir.
	local d
	for d in "$KUBELET_DIR" "${PLUGIN_DIRS[0]}"; do
		mkdir -p "$d"
		mount --bind "$d" "$d"
		mount --make-rshared "$d"
	done
	mkdir -p "$R/pod-logs"
	cat >"$R/kubelet.yaml" <<KCFG
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $R/pki/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
# This machine has cgroup v1 (hybrid); 1.34 still runs on it when asked.
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$R/containerd.sock
podLogsDir: $R/pod-logs
resolvConf: /etc/resolv.conf
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
KCFG
	start kubelet "$E2E_BIN/kubelet" --config="$R/kubelet.yaml" --kubeconfig="$R/kubelet.kubeconfig" \
		--root-dir="$KUBELET_DIR" --hostname-override="$E2E_NODE_NAME" --node-ip="$E2E_NODE_IP" --v=2
	wait_for "node Ready" 120 node_ready
	# Pods are refused until the controller-manager made the default service account.
	wait_for "default service account" 60 kc get serviceaccount default
}

# The test node's disks: sparse image files with ext4, loop-mounted where
# values.yaml puts the pools (sizes small enough for any CI disk).
pools_up() {
	local p
	for p in hdd:8G nvme:2G; do
		local name=${p%%:*} size=${p#*:}
		mkdir -p "$R/disks" "$R/pools/$name"
		truncate -s "$size" "$R/disks/$name.img"
		mkfs.ext4 -q -F -m 0 -L "wbe2e-$name" "$R/disks/$name.img"
		mount -o loop "$R/disks/$name.img" "$R/pools/$name"
		# The chart mounts pools with HostToContainer propagation, which
		# needs a shared mount (/ is private here; systemd hosts share it).
		mount --make-shared "$R/pools/$name"
	done
}

up() {
	if [ -e "$R" ]; then
		log "$R exists: tearing down a previous run first"
		down
	fi
	local t0=$SECONDS
	mkdir -p "$R/logs" "$R/pids"
	# Network namespaces that exist now are not ours to remove.
	ls /run/netns 2>/dev/null >"$R/netns.before" || true
	# The chart mounts /lib/modules (DirectoryOrCreate); this host may lack it.
	[ -e /lib/modules ] || touch "$R/made-lib-modules"
	certs
	network
	pools_up
	containerd_up
	control_plane_up
	kubelet_up
	log "up in $((SECONDS - t0)) s; KUBECONFIG=$R/admin.kubeconfig"
}

# stop NAME: SIGTERM, then SIGKILL after a grace period.
stop() {
	local f=$R/pids/$1 pid
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 "${2:-20}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$f"
}

# umount_under DIR: unmounts everything mounted at or below DIR, deepest first.
umount_under() {
	local m
	awk -v d="$1" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
	done
}

# our_loops lists loop devices backed by files of the cluster, the pools or
# the plugin; a backing file that reads "/disk" is a fallback attachment's
# FUSE file whose mount was lazily detached: dead, and the plugin's shape.
our_loops() {
	local dev back
	losetup -n -l -O NAME,BACK-FILE 2>/dev/null | while read -r dev back; do
		case "$back" in
		"$R"/* | /var/lib/writeboost/* | /run/writeboost/* | "$KUBELET_DIR"/* | /disk) echo "$dev" ;;
		esac
	done
}

down() {
	[ -d "$R" ] || { log "nothing to tear down"; return 0; }
	log "tearing down"
	# The plugin's loop devices, named while their FUSE files still have
	# their full paths (once a FUSE mount is gone the path reads "/disk").
	local ours
	ours=$(our_loops)
	stop kubelet
	# Containers: kill and delete every container of our runc root, so no
	# pod process outlives the cluster (their FUSE servers included).
	if [ -d "$R/runc/k8s.io" ]; then
		local id
		for id in $(runc --root "$R/runc/k8s.io" list -q 2>/dev/null); do
			runc --root "$R/runc/k8s.io" kill --all "$id" KILL 2>/dev/null || true
		done
		sleep 1
		for id in $(runc --root "$R/runc/k8s.io" list -q 2>/dev/null); do
			runc --root "$R/runc/k8s.io" delete --force "$id" 2>/dev/null || true
		done
	fi
	# The plugin's nbdfuse chains left the pods' cgroups on purpose (they
	# outlive a plugin restart; pkg/attach/cgroup.go): kill them by theirs.
	local g pid
	for g in $(find /sys/fs/cgroup -maxdepth 4 -type d -name writeboost-csi-attach 2>/dev/null); do
		[ -f "$g/cgroup.procs" ] || continue
		for pid in $(cat "$g/cgroup.procs"); do kill -KILL "$pid" 2>/dev/null || true; done
	done
	stop containerd
	# containerd's shims of our socket (they outlive containerd by design).
	local pid
	for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $R/containerd.sock" || true); do
		kill -KILL "$pid" 2>/dev/null || true
	done
	for n in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$n" 10; done
	# Mounts: pod volumes, the plugin's FUSE mounts and loop-mounted
	# filesystems, containerd's snapshots and sandbox /dev/shm, etcd's tmpfs.
	local d
	for d in "$KUBELET_DIR" "${PLUGIN_DIRS[@]}" "$R"; do umount_under "$d"; done
	# Loop devices whose backing file is ours (the plugin's attachments, the pools).
	local dev
	for dev in $ours $(our_loops); do
		[ -e "/sys/block/${dev#/dev/}/loop" ] || continue
		losetup -d "$dev" 2>/dev/null || log "could not detach $dev"
	done
	# Network namespaces made during this run (CNI's), then links and rules.
	local ns
	for ns in $(ls /run/netns 2>/dev/null); do
		grep -qx "$ns" "$R/netns.before" 2>/dev/null && continue
		case "$ns" in cni-*) umount "/run/netns/$ns" 2>/dev/null; rm -f "/run/netns/$ns" ;; esac
	done
	local l
	for l in $(ip -o link show master "$E2E_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
		ip link del "$l" 2>/dev/null || true
	done
	ip link del "$E2E_BRIDGE" 2>/dev/null || true
	while iptables -w -t nat -D OUTPUT -j "$E2E_CHAIN" 2>/dev/null; do :; done
	iptables -w -t nat -F "$E2E_CHAIN" 2>/dev/null || true
	iptables -w -t nat -X "$E2E_CHAIN" 2>/dev/null || true
	# Chains the kubelet made (KUBE-*), in every table.
	local t c
	for t in filter nat mangle; do
		for c in $(iptables -w -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
			iptables -w -t "$t" -S 2>/dev/null | awk -v c="$c" '$1 == "-A" && $0 ~ "-j " c "( |$)" {$1 = "-D"; print}' |
				while read -r rule; do eval "iptables -w -t $t $rule" 2>/dev/null || true; done
			iptables -w -t "$t" -F "$c" 2>/dev/null || true
		done
		for c in $(iptables -w -t "$t" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
			iptables -w -t "$t" -X "$c" 2>/dev/null || true
		done
	done
	# The kubelet's pod cgroups, and the plugin's attach cgroup.
	for g in $(find /sys/fs/cgroup -maxdepth 4 -type d -name writeboost-csi-attach 2>/dev/null); do
		rmdir "$g" 2>/dev/null || true
	done
	for d in /sys/fs/cgroup/*/kubepods; do
		[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
	done
	rm -rf "$KUBELET_DIR" "${PLUGIN_DIRS[@]}" /var/lib/cni/results 2>/dev/null || true
	[ ! -e "$R/made-lib-modules" ] || rmdir /lib/modules 2>/dev/null || true
	# Keep the logs of a failed run next to the cache for a look afterwards.
	if [ -d "$R/logs" ]; then
		rm -rf "$E2E_CACHE/last-logs" && cp -r "$R/logs" "$E2E_CACHE/last-logs" 2>/dev/null || true
	fi
	rm -rf "$R"
	log "down"
}

case "${1:-}" in
up) up ;;
down) down ;;
*) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
