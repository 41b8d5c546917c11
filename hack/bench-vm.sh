#!/usr/bin/env bash
# make bench-vm (issue 16): writeboost against dm-writeboost, dm-writecache
# and bcache in the real-kernel VM (hack/vm/run.sh), on the same devices, in
# one run. Regenerates the "In a real kernel" section of docs/benchmarks.md,
# its charts and docs/benchmarks/vm/results.json.
#
# Three boots: the main run (every system: fio jobs, sustained jobs, drain),
# the fill of the power-cut figure (QEMU is killed once every cache is full
# and flushed), and the boot after it (recovery time, data verified). About
# 17-30 minutes under TCG on 2 cores (17.4 on a quiet host with the 60 s
# sustained jobs). Not part of the tests.
#
# Environment: BENCHVM_ARGS (extra arguments for `bench vm`, e.g.
# "--runtime 4s --sustained 15s"), BENCHVM_SYSTEMS (comma-separated ids),
# BENCHVM_MEM (guest MiB), BENCHVM_RUNNER (another copy of hack/vm/run.sh),
# BENCHVM_SKIP_MAIN=1 (only the power cut), WRITEBOOST_CACHE_DIR (where the module and the
# run's files live).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

WITH_BENCH_VM=1 WITH_GO_TOOLS=0 bash hack/deps.sh
ko="$(bash hack/benchvm/dm-writeboost.sh)"

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
# The guest sees the host's root over 9p but has its own /tmp: the run's
# files live under the cache directory.
run="$cache/benchvm-run"
rm -rf "$run"
mkdir -p "$run/out"
echo "bench-vm: building into $run" >&2
go build -o "$run/bench" ./hack/bench
CGO_ENABLED=0 go build -o "$run/writeboost" ./cmd/writeboost

# One boot of hack/vm's runner (issue 12); the command's output on stdout.
vm() {
	local name="$1"
	shift
	bash "${BENCHVM_RUNNER:-hack/vm/run.sh}" --mem "${BENCHVM_MEM:-3072}" --cpus "$(nproc)" --console "$run/console-$name.log" "$@"
}

CACHE_SIZE=$((32 << 20))
HDD_SIZE=$((1 << 30))
args=(--writeboost "$run/writeboost" --module "$ko" --out "$run/out"
	--cache-size "$CACHE_SIZE" --hdd-size "$HDD_SIZE")
if [ -n "${BENCHVM_SYSTEMS:-}" ]; then args+=(--systems "$BENCHVM_SYSTEMS"); fi
# shellcheck disable=SC2206
if [ -n "${BENCHVM_ARGS:-}" ]; then args+=($BENCHVM_ARGS); fi

accel=tcg
if grep -qwE 'kvm_intel|kvm_amd' /proc/modules 2>/dev/null; then accel=kvm; fi
others="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 5 {printf "%s%s (%s %% CPU)", sep, $2, $1; sep=", "}' | head -c 400)"
started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"

echo "bench-vm: main run (log: $run/main.log)" >&2
if [ "${BENCHVM_SKIP_MAIN:-0}" = 1 ]; then
	echo "bench-vm: main run skipped" >&2
else
	# A guest kernel crash (a BUG in one of the kernel's caches) wedges the
	# VM until the runner's timeout: watch the console and cut the boot
	# short. main.json holds every system measured before it.
	vm main --pidfile "$run/qemu-main.pid" -- "$run/bench" vm --phase main "${args[@]}" >"$run/main.log" 2>&1 &
	runner=$!
	while kill -0 "$runner" 2>/dev/null; do
		if [ -s "$run/qemu-main.pid" ] && grep -qE 'kernel BUG at|Oops:|general protection fault' "$run/console-main.log" 2>/dev/null; then
			sleep 5 # let the trace reach the console
			kill -KILL "$(cat "$run/qemu-main.pid")" 2>/dev/null || true
			break
		fi
		sleep 1
	done
	wait "$runner" || echo "bench-vm: the main run failed (see $run/main.log)" >&2
fi
crash="$(grep -m1 -E -A12 'kernel BUG at|Oops:|general protection fault|list_del corruption' "$run/console-main.log" 2>/dev/null |
	grep -E 'BUG|Oops|corruption|protection|Workqueue|RIP|Comm' | sed 's/^\[ *[0-9.]*\] //' | tr '\n"\\' '; _' | head -c 600 || true)"

echo "bench-vm: power cut: fill, then kill QEMU (log: $run/fill.log)" >&2
"$run/bench" vm-disk --path "$run/cache-disk.img" --parts 4 --size "$CACHE_SIZE"
"$run/bench" vm-disk --path "$run/hdd-disk.img" --parts 4 --size "$HDD_SIZE"
disks=(--disk "$run/cache-disk.img" --disk "$run/hdd-disk.img")
vm fill "${disks[@]}" --pidfile "$run/qemu.pid" --timeout 1800 -- \
	"$run/bench" vm --phase fill --disks /dev/vda,/dev/vdb "${args[@]}" >"$run/fill.log" 2>&1 &
runner=$!
filled=0
while kill -0 "$runner" 2>/dev/null; do
	if grep -q BENCHVM-FILLED "$run/fill.log" && [ -s "$run/qemu.pid" ]; then
		# The power cut: SIGKILL to QEMU, nothing flushed on the way.
		kill -KILL "$(cat "$run/qemu.pid")"
		filled=1
		break
	fi
	sleep 0.2
done
wait "$runner" || true
if [ "$filled" = 1 ]; then
	echo "bench-vm: power cut: boot again and recover (log: $run/recover.log)" >&2
	if ! vm recover "${disks[@]}" -- "$run/bench" vm --phase recover --disks /dev/vda,/dev/vdb "${args[@]}" >"$run/recover.log" 2>&1; then
		echo "bench-vm: recovery failed (see $run/recover.log)" >&2
	fi
else
	echo "bench-vm: the fill did not finish (see $run/fill.log)" >&2
fi
rm -f "$run/cache-disk.img" "$run/hdd-disk.img"

cat >"$run/out/host.json" <<EOF
{"accel": "$accel", "commit": "$(git describe --always --dirty)",
 "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')", "cpus": $(nproc),
 "load_at_start": "$load_start", "load_at_end": "$(cut -d' ' -f1-3 /proc/loadavg)", "others": "$others", "guest_crash": "$crash",
 "started": "$started", "ended": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
"$run/bench" vm-render --in "$run/out" --out "$repo/docs"
echo "bench-vm: wrote docs/benchmarks.md (logs in $run)" >&2
