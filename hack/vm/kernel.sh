#!/usr/bin/env bash
# Unpacks the pinned Debian kernel of the VM tier (bookworm's linux-image
# 6.1, DESIGN-NOTES section 5) into a cache directory, once, and prints that
# directory: boot/vmlinuz-$KVER and lib/modules/$KVER with a depmod index.
# Nothing is installed on the host: apt-get download + dpkg -x.
#
# Environment: WRITEBOOST_CACHE_DIR (default ~/.cache/writeboost-csi).
set -euo pipefail

KVER=6.1.0-57-amd64
KPKG=6.1.192-3

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
out="$cache/vm-kernel-$KVER-$KPKG"
if [ -f "$out/.done" ]; then
	echo "$out"
	exit 0
fi
for tool in apt-get dpkg depmod; do
	command -v "$tool" >/dev/null || { echo "kernel.sh: $tool is missing (bash hack/deps.sh installs it)" >&2; exit 1; }
done
mkdir -p "$cache"
work="$(mktemp -d "$cache/vm-kernel-dl.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current directory; as root it warns
# that _apt cannot reach it, which is harmless.
(cd "$work" && apt-get download -q "linux-image-$KVER-unsigned=$KPKG") >&2 2> >(grep -v 'unsandboxed' >&2)
mkdir "$work/root"
dpkg -x "$work"/*.deb "$work/root"
depmod -b "$work/root" "$KVER"
rm -rf "$out"
mv "$work/root" "$out"
touch "$out/.done"
echo "$out"
