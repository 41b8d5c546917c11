#!/usr/bin/env bash
# hack/vm/run.sh: runs one command as root in a real Linux kernel under QEMU
# and returns its exit code, its output on stdout (issue 12). The kernel is
# bookworm's linux-image 6.1, unpacked into a cache (hack/vm/kernel.sh); the
# initramfs (busybox-static, built here) loads virtio and 9p, mounts the
# host's root filesystem over 9p and runs hack/vm/guest.sh on it, so the
# host's tools and binaries run inside. The guest's /tmp is its own tmpfs:
# put shared files elsewhere (the cache directory). KVM when the host has
# hardware KVM (kvm_intel/kvm_amd), TCG otherwise (DESIGN-NOTES section 5).
#
# Usage: hack/vm/run.sh [--mem MiB] [--cpus N] [--console FILE]
#            [--disk FILE]... [--pidfile FILE] [--timeout SECONDS] -- cmd args...
#   --disk      a raw host file as a virtio disk (/dev/vda, /dev/vdb, ... in order)
#   --pidfile   QEMU's pid, for a power cut (kill -KILL it; nothing is flushed)
#   --timeout   QEMU is killed after this many seconds (exit code 124)
#   --console   the kernel console log (default: kept only on failure)
# Exit code: the command's; 124 on timeout; 125 when the VM ended without
# one (a power cut, a panic).
#
# Environment: WRITEBOOST_CACHE_DIR (default ~/.cache/writeboost-csi).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

mem=2048 cpus="$(nproc)" console="" pidfile="" timeout=3600 disks=()
while [ $# -gt 0 ]; do
	case "$1" in
	--mem) mem="$2"; shift 2 ;;
	--cpus) cpus="$2"; shift 2 ;;
	--console) console="$2"; shift 2 ;;
	--disk) disks+=("$2"); shift 2 ;;
	--pidfile) pidfile="$2"; shift 2 ;;
	--timeout) timeout="$2"; shift 2 ;;
	--) shift; break ;;
	*) echo "run.sh: unknown option $1 (see the header)" >&2; exit 2 ;;
	esac
done
[ $# -gt 0 ] || { echo "run.sh: no command (see the header)" >&2; exit 2; }
for tool in qemu-system-x86_64 busybox; do
	command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing (bash hack/deps.sh installs it)" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "run.sh: /bin/busybox (busybox-static) is missing" >&2; exit 1; }

kroot="$(bash "$here/kernel.sh")"
kver="$(basename "$kroot"/lib/modules/*)"
cache="$(dirname "$kroot")"

# The initramfs: busybox, /init and, in load order, the modules that
# mounting the host root needs and those every test uses (loading them from
# RAM is much faster than over 9p under TCG); rebuilt when /init or the
# list changes. Others (xfs, dm targets) load on demand from the cache.
modules=(virtio_pci 9pnet_virtio 9p virtio_blk virtio_rng nbd loop dm_mod ext4 fuse overlay)
initrd="$kroot/initrd-$({ cat "$here/init"; echo "${modules[*]}"; } | sha256sum | cut -c1-12).cpio"
if [ ! -f "$initrd" ]; then
	ird="$(mktemp -d "$cache/vm-initrd.XXXXXX")"
	mkdir -p "$ird"/{bin,proc,sys,dev,newroot,modules}
	cp /bin/busybox "$ird/bin/busybox"
	cp "$here/init" "$ird/init"
	chmod 755 "$ird/init"
	modprobe -d "$kroot" -S "$kver" --show-depends -a "${modules[@]}" |
		awk '$1 == "insmod" && !seen[$2]++ {print $2}' | while read -r ko; do
		cp "$ko" "$ird/modules/"
		basename "$ko" >>"$ird/modules.order"
	done
	(cd "$ird" && find . | busybox cpio -o -H newc >"$initrd.tmp" 2>/dev/null)
	mv "$initrd.tmp" "$initrd"
	rm -rf "$ird"
fi

mkdir -p "$cache/vm-runs"
run="$(mktemp -d "$cache/vm-runs/run.XXXXXX")"
cp "$here/guest.sh" "$run/guest.sh"
{
	printf 'KROOT=%q KVER=%q CWD=%q\n' "$kroot" "$kver" "$PWD"
	printf 'export PATH=%q HOME=%q\n' "$PATH" "${HOME:-/root}"
	printf 'VMCMD=('
	printf '%q ' "$@"
	printf ')\n'
} >"$run/env"
mkfifo "$run/out"
[ -n "$console" ] || console="$run/console.log"
[ -z "$pidfile" ] || rm -f "$pidfile"

if grep -qwE 'kvm_intel|kvm_amd' /proc/modules 2>/dev/null && [ -w /dev/kvm ]; then
	accel=(-accel kvm -cpu host)
else
	# /dev/kvm may be a software layer (kvm_pvm) on which Debian's kernel
	# does not boot; TCG always works.
	accel=(-accel tcg,thread=multi -cpu max)
fi
drives=()
for d in "${disks[@]}"; do
	drives+=(-drive "file=$d,format=raw,if=virtio,discard=unmap")
done

qemu=(qemu-system-x86_64 "${accel[@]}" -m "$mem" -smp "$cpus" -nodefaults -no-reboot
	-display none -monitor none -nic none
	-kernel "$kroot/boot/vmlinuz-$kver" -initrd "$initrd"
	-append "console=ttyS0 panic=-1 wbvm.run=$run"
	-serial "file:$console" -chardev "file,id=out,path=$run/out" -serial chardev:out
	-device virtio-rng-pci
	-virtfs "local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap"
	"${drives[@]}")
[ -z "$pidfile" ] || qemu+=(-pidfile "$pidfile")

cat "$run/out" &
reader=$!
qrc=0
timeout --signal=KILL "$timeout" "${qemu[@]}" </dev/null || qrc=$?
wait "$reader" || true
if [ -f "$run/rc" ]; then
	rc="$(cat "$run/rc")"
elif [ "$qrc" = 124 ]; then
	echo "run.sh: timed out after ${timeout}s (console: $console)" >&2
	rc=124
else
	echo "run.sh: the VM ended without an exit code (QEMU exit $qrc; console: $console)" >&2
	rc=125
fi
if [ "$rc" != 0 ] && [ "$console" = "$run/console.log" ]; then
	tail -n 30 "$console" >&2 || true
fi
rm -rf "$run"
exit "$rc"
