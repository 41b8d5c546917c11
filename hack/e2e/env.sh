# Sourced by the hack/e2e scripts: pinned versions and the places the e2e uses.
# Versions of everything the e2e builds live here, once; the chart pins the
# sidecar images (charts/writeboost-csi/values.yaml) and images.sh builds those.
KUBERNETES_VERSION=v1.34.2
# Built binaries and image tarballs, kept between runs on one machine.
E2E_CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-e2e}
# Debian suite of the plugin image's root filesystem: the Dockerfile's
# runtime stage is debian:bookworm-slim.
PLUGIN_SUITE=bookworm
# The Dockerfile's runtime packages, in its order (keep the two in step).
PLUGIN_PACKAGES=(e2fsprogs xfsprogs util-linux mount lvm2 kmod libnbd-bin fuse3 ca-certificates)
# Local image names; the e2e values file (values.yaml beside this) names them.
E2E_IMAGE_PREFIX=localhost/writeboost-e2e
# Where a running cluster keeps its state, certificates, logs and sockets.
E2E_ROOT=/var/lib/writeboost-e2e   # fixed: values.yaml names the pool paths under it
E2E_BIN="$E2E_CACHE/kubernetes-$KUBERNETES_VERSION/bin"
# Host-side names the cluster owns (teardown removes exactly these).
E2E_BRIDGE=wbe2e-br0      # pod network bridge (CNI), also holding the node IP and the API's ClusterIP
E2E_NODE_IP=10.250.0.1
E2E_POD_CIDR=10.244.0.0/24
E2E_SERVICE_CIDR=10.96.0.0/24
E2E_API_CLUSTER_IP=10.96.0.1
E2E_CHAIN=WBE2E           # our iptables nat chain (the API's ClusterIP to 127.0.0.1)
E2E_ETCD_PORT=12379
E2E_API_PORT=16443
E2E_NODE_NAME=localhost   # resolves to 127.0.0.1: the API server reaches the kubelet on loopback
