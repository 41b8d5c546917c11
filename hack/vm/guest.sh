#!/bin/bash
# Stage two of the VM's boot (PID 1 after switch_root into the host's root
# over 9p; /init mounted /proc, /sys, /dev, /tmp and /run): module loading
# pointed at the unpacked VM kernel, then the command of hack/vm/run.sh, its output
# on the second serial port and its exit code in the run directory.
run="$1"
# shellcheck source=/dev/null
source "$run/env" # KROOT, KVER, CWD, PATH, HOME, VMCMD (an array)
# The kernel's own module requests (mount -t xfs, dm targets) go through
# this wrapper, so the host's /lib/modules (another kernel) is never used.
# The command's modprobe (first on PATH) too.
mkdir -p /run/wbvm-bin
printf '#!/bin/sh\nexec /sbin/modprobe -d %q "$@"\n' "$KROOT" >/run/wbvm-bin/modprobe
chmod 755 /run/wbvm-bin/modprobe
echo /run/wbvm-bin/modprobe >/proc/sys/kernel/modprobe
export PATH="/run/wbvm-bin:$PATH"
echo "guest: running the command" >/dev/kmsg
hostname wbvm
ip link set lo up 2>/dev/null
stty -F /dev/ttyS1 raw -echo
export DM_DISABLE_UDEV=1 # no udev in the VM: device-mapper tools make the nodes
# A working directory under /tmp lives on the host's /tmp (init kept it
# at /run/host-tmp), not on the guest's own: bind it back at its path.
case "$CWD" in
/tmp/?*) mkdir -p "$CWD" && mount --bind "/run/host-tmp/${CWD#/tmp/}" "$CWD" ;;
esac
cd "$CWD" || cd /
("${VMCMD[@]}") </dev/null >/dev/ttyS1 2>&1
rc=$?
echo "$rc" >"$run/rc"
sync
# QEMU runs with -no-reboot: a reboot ends it.
echo b >/proc/sysrq-trigger
sleep 10
