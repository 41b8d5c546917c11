#!/usr/bin/env bash
# Builds dm-writeboost 2.2.17 (Debian's dm-writeboost-dkms) as a module for
# the pinned VM kernel, once, into a cache directory outside the repository,
# and prints the path of the .ko. Nothing is installed on the host: the
# packages are fetched with apt-get download and unpacked with dpkg -x
# (DESIGN-NOTES section 5). Later runs print the cached module at once.
#
# Environment: WRITEBOOST_CACHE_DIR (default ~/.cache/writeboost-csi).
set -euo pipefail

KVER=6.1.0-57-amd64
KPKG=6.1.192-3
WB_VERSION=2.2.17
WB_PKG=2.2.17-0.2~deb12u1

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
out="$cache/dm-writeboost-$WB_VERSION-$KVER"
ko="$out/dm-writeboost.ko"
if [ -f "$ko" ]; then
	echo "$ko"
	exit 0
fi

for tool in apt-get dpkg make gcc; do
	command -v "$tool" >/dev/null || { echo "dm-writeboost.sh: $tool is missing (bash hack/deps.sh installs it)" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/dm-writeboost-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
# apt-get download writes into the current directory; as root it warns
# that _apt cannot reach it, which is harmless.
apt-get download -q \
	"dm-writeboost-dkms=$WB_PKG" \
	"linux-headers-$KVER=$KPKG" \
	"linux-headers-${KVER%-amd64}-common=$KPKG" \
	"linux-kbuild-6.1=$KPKG" >&2 2> >(grep -v 'unsandboxed' >&2)
mkdir root
for deb in ./*.deb; do dpkg -x "$deb" root; done

headers="$work/root/usr/src/linux-headers-$KVER"
# The arch headers' Makefile includes the common tree by absolute path;
# point it at the unpacked copy (its scripts/ and tools/ links are
# relative and already resolve inside root/).
echo "include $work/root/usr/src/linux-headers-${KVER%-amd64}-common/Makefile" >"$headers/Makefile"

src="$work/root/usr/src/dm-writeboost-$WB_VERSION"
make -s -C "$headers" M="$src" modules >&2
vermagic="$(modinfo -F vermagic "$src/dm-writeboost.ko")"
case "$vermagic" in
"$KVER "*) ;;
*) echo "dm-writeboost.sh: built module has vermagic '$vermagic', want $KVER" >&2; exit 1 ;;
esac

mkdir -p "$out"
cp "$src/dm-writeboost.ko" "$ko.tmp"
mv "$ko.tmp" "$ko"
echo "$ko"
