#!/usr/bin/env bash
# Builds every image the e2e cluster runs, without a Docker engine or a
# registry, into $E2E_CACHE/images/*.tar (docker-save tarballs that
# `ctr images import` reads), reusing a tarball whose inputs are unchanged:
#   - the plugin: the Dockerfile's recipe. Its runtime stage's root
#     filesystem (debian:bookworm-slim plus the same apt packages) is made
#     with mmdebstrap from the Debian archive; the static binary is built
#     with the Dockerfile's flags and put at /usr/local/bin/writeboost.
#   - csi-provisioner and csi-resizer from their Go modules at the versions
#     the chart pins; stand-ins for node-driver-registrar and livenessprobe
#     (hack/e2e/images/, see its doc.go); the sandbox's pause; the test
#     pods' workload image (the plugin image's root filesystem, no plugin).
# Images are assembled with go-containerregistry (hack/e2e/images/ociimage).
set -euo pipefail
cd "$(dirname "$0")/../.."
. hack/e2e/env.sh

out="$E2E_CACHE/images"
mkdir -p "$out" "$E2E_CACHE/bin"
export CGO_ENABLED=0
tools="$E2E_CACHE/bin"
(cd hack/e2e/images && GOWORK=off go build -trimpath -o "$tools/" ./ociimage ./pause ./registrar ./livenessprobe)

# key FILE...: a short content hash of the inputs of one image.
key() { cat "$@" | sha256sum | cut -c1-16; }

# The chart's pinned sidecar versions.
chart_tag() { sed -n "s#^ *image: registry.k8s.io/sig-storage/$1:\(v[0-9.]*\)\$#\1#p" charts/writeboost-csi/values.yaml; }
PROVISIONER_VERSION=$(chart_tag csi-provisioner)
RESIZER_VERSION=$(chart_tag csi-resizer)
REGISTRAR_VERSION=$(chart_tag csi-node-driver-registrar)
LIVENESSPROBE_VERSION=$(chart_tag livenessprobe)
for v in PROVISIONER_VERSION RESIZER_VERSION REGISTRAR_VERSION LIVENESSPROBE_VERSION; do
	[ -n "${!v}" ] || { echo "images: no $v in the chart's values.yaml" >&2; exit 1; }
done

# image NAME TAG KEY ociimage-args...: builds $out/NAME-KEY.tar once and
# links $out/NAME.tar to it (what the cluster imports).
image() {
	local name=$1 tag=$2 k=$3; shift 3
	local tar="$out/$name-$k.tar"
	if [ ! -s "$tar" ]; then
		echo "images: building $E2E_IMAGE_PREFIX/$name:$tag"
		rm -f "$out/$name"-*.tar
		"$tools/ociimage" -o "$tar" -tag "$E2E_IMAGE_PREFIX/$name:$tag" "$@"
	fi
	ln -sf "$(basename "$tar")" "$out/$name.tar"
}

# sidecar BIN MODULE VERSION: a sidecar built from its module, at /BIN.
sidecar() {
	local bin=$1 mod=$2 ver=$3 major=${3%%.*}
	[ "$major" = v0 ] || [ "$major" = v1 ] || mod="$mod/$major"
	local exe="$tools/$bin-$ver"
	if [ ! -x "$exe" ]; then
		echo "images: building $bin from $mod@$ver"
		local dir tmp
		dir=$(cd "$out" && GOWORK=off GOFLAGS=-mod=mod go mod download -json "$mod@$ver" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
		[ -d "$dir" ] || { echo "images: $mod@$ver not downloaded" >&2; exit 1; }
		tmp=$(mktemp -d)
		cp -r "$dir/." "$tmp" && chmod -R u+w "$tmp"
		# Its go.mod has replace directives (go install refuses them): build in a copy.
		(cd "$tmp" && GOWORK=off GOFLAGS=-mod=mod nice -n 10 go build -trimpath -ldflags "-s -w -X main.version=$ver" -o "$exe" "./cmd/$bin")
		rm -rf "$tmp"
	fi
	image "$bin" "$ver" "$(echo "$mod@$ver" | key - "$exe")" -file "$exe:/$bin" -entrypoint "/$bin"
}

image pause e2e "$(key "$tools/pause")" -file "$tools/pause:/pause" -entrypoint /pause
sidecar csi-provisioner github.com/kubernetes-csi/external-provisioner "$PROVISIONER_VERSION"
sidecar csi-resizer github.com/kubernetes-csi/external-resizer "$RESIZER_VERSION"
image csi-node-driver-registrar-standin "$REGISTRAR_VERSION" "$(key "$tools/registrar")" \
	-file "$tools/registrar:/csi-node-driver-registrar" -entrypoint /csi-node-driver-registrar
image livenessprobe-standin "$LIVENESSPROBE_VERSION" "$(key "$tools/livenessprobe")" \
	-file "$tools/livenessprobe:/livenessprobe" -entrypoint /livenessprobe

# The plugin: the Dockerfile's runtime root filesystem, then the binary.
rootfs_key=$(echo "$PLUGIN_SUITE ${PLUGIN_PACKAGES[*]}" | key -)
rootfs="$E2E_CACHE/rootfs-$PLUGIN_SUITE-$rootfs_key.tar"
if [ ! -s "$rootfs" ]; then
	echo "images: making the plugin's root filesystem ($PLUGIN_SUITE + ${PLUGIN_PACKAGES[*]}) with mmdebstrap"
	rm -f "$E2E_CACHE"/rootfs-*.tar
	# The host's Debian sources (the archive this machine reaches); docs,
	# man pages and locales left out as in the -slim images.
	sources=/etc/apt/sources.list.d/debian.sources
	[ -f "$sources" ] || sources=/etc/apt/sources.list
	nice -n 10 mmdebstrap --quiet --variant=minbase --include="$(IFS=,; echo "${PLUGIN_PACKAGES[*]}")" \
		--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
		--format=tar "$PLUGIN_SUITE" "$rootfs.tmp" "$sources"
	mv "$rootfs.tmp" "$rootfs"
fi
# The test pods' image: the same Debian root filesystem (a shell and
# coreutils: dd, sha256sum, sync), without the plugin.
image workload e2e "$rootfs_key" -rootfs "$rootfs" -entrypoint /bin/sh
version=e2e
# The Dockerfile's build flags.
go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$tools/writeboost" ./cmd/writeboost
image writeboost-csi "$version" "$(echo "$rootfs_key" | key - "$tools/writeboost")" \
	-rootfs "$rootfs" -file "$tools/writeboost:/usr/local/bin/writeboost" -entrypoint /usr/local/bin/writeboost \
	-label org.opencontainers.image.title=writeboost-csi -label "org.opencontainers.image.version=$version"
echo "images: ready in $out"
