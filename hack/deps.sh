#!/usr/bin/env bash
# Installs every system package and Go tool that building, testing and
# benchmarking writeboost-csi needs, on a fresh Debian machine with Go.
# Safe to run repeatedly. Versions of Go tools are pinned here, once.
set -euo pipefail

CSI_SANITY_VERSION=v5.4.0
HELM_VERSION=v3.19.0
STATICCHECK_VERSION=v0.6.1
# make e2e pins Kubernetes in hack/e2e/env.sh and go-containerregistry (its
# image assembler) in hack/e2e/images/go.mod; the sidecars follow the chart.

APT_PACKAGES=(
	libnbd-bin      # nbdinfo, nbdcopy, nbdfuse: NBD clients and the FUSE attach path
	python3-libnbd  # protocol-level tests (FLUSH/FUA/TRIM/WRITE_ZEROES)
	nbdkit          # peer NBD server (tests and benchmarks)
	qemu-utils      # qemu-img compare
	fio             # fio's nbd engine
	fuse3           # fusermount3 for nbdfuse
	e2fsprogs xfsprogs util-linux mount kmod
	# make e2e (hack/e2e): a single-node Kubernetes and images without Docker
	etcd-server containerd runc containernetworking-plugins iptables conntrack openssl
	mmdebstrap      # the plugin image's Debian root filesystem (the Dockerfile's runtime stage)
	# make vm-test (hack/vm): a real kernel under QEMU, its initramfs, LVM in it
	qemu-system-x86 busybox-static lvm2
)

# make bench-vm (hack/bench-vm.sh): the kernel's own caches in the VM, and
# building dm-writeboost's module against the VM kernel's headers.
if [ "${WITH_BENCH_VM:-0}" = 1 ]; then
	APT_PACKAGES+=(bcache-tools dmsetup nbd-client gcc make libelf1 linux-perf)
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

GOBIN="$(go env GOPATH)/bin"
export PATH="$GOBIN:$PATH"
install_go_tool() { # name pkg@version
	if ! command -v "$1" >/dev/null 2>&1; then
		echo "deps: go install $2"
		go install "$2"
	fi
}
if [ "${WITH_GO_TOOLS:-1}" = 1 ]; then
	install_go_tool csi-sanity "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${CSI_SANITY_VERSION}"
	install_go_tool helm "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
fi
if [ "${WITH_LINT_TOOLS:-0}" = 1 ]; then
	install_go_tool staticcheck "honnef.co/go/tools/cmd/staticcheck@${STATICCHECK_VERSION}"
fi
