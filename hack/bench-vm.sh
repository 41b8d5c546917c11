#!/usr/bin/env bash
# make bench-vm (issue 16): writeboost against dm-writeboost, dm-writecache
# and bcache in the real-kernel VM (hack/vm's runner), on the same devices,
# in one run. Regenerates the "In a real kernel" section of
# docs/benchmarks.md, its charts and docs/benchmarks/vm/results.json.
#
# Three boots: the main run (every system, fio jobs, sustained jobs, drain),
# the fill of the power-cut figure (the VM is killed once every cache is
# full and flushed), and the boot after it (recovery time, data verified).
# About 20-30 minutes under TCG on 2 cores. Not part of the tests.
#
# Environment: BENCHVM_ARGS (extra arguments for `bench vm`, e.g.
# "--runtime 4s --sustained 15s"), BENCHVM_SYSTEMS (comma-separated ids),
# WRITEBOOST_CACHE_DIR (where the module and the run's files live).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

WITH_BENCH_VM=1 WITH_GO_TOOLS=0 bash hack/deps.sh
ko="$(bash hack/benchvm/dm-writeboost.sh)"

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
# The VM sees the host's root over 9p but has its own /tmp: the run's
# files live under the cache directory, not under /tmp.
run="$cache/benchvm-run"
rm -rf "$run"
mkdir -p "$run/out"
echo "bench-vm: building into $run" >&2
go build -o "$run/bench" ./hack/bench
CGO_ENABLED=0 go build -o "$run/writeboost" ./cmd/writeboost

# hack/vm's runner (issue 12).
# shellcheck source=vm/lib.sh
source hack/vm/lib.sh

CACHE_SIZE=$((64 << 20))
HDD_SIZE=$((1 << 30))
args=(--writeboost "$run/writeboost" --module "$ko" --out "$run/out"
	--cache-size "$CACHE_SIZE" --hdd-size "$HDD_SIZE")
[ -n "${BENCHVM_SYSTEMS:-}" ] && args+=(--systems "$BENCHVM_SYSTEMS")
# shellcheck disable=SC2206
[ -n "${BENCHVM_ARGS:-}" ] && args+=($BENCHVM_ARGS)

accel=tcg
if vm_accel_is_kvm 2>/dev/null; then accel=kvm; fi
others="$(ps -eo pcpu=,comm= --sort=-pcpu | awk '$1 >= 5 {printf "%s%s (%s %% CPU)", sep, $2, $1; sep=", "}' | head -c 400)"
cat >"$run/host.json" <<EOF
{"accel": "$accel", "commit": "$(git describe --always --dirty)", "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')",
 "cpus": $(nproc), "load_at_start": "$(cut -d' ' -f1-3 /proc/loadavg)", "others": "$others", "started": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
EOF

echo "bench-vm: main run" >&2
vm_bench_run "$run/main.log" "$run/bench" vm --phase main "${args[@]}" || echo "bench-vm: the main run failed (see $run/main.log)" >&2

echo "bench-vm: power cut: fill" >&2
"$run/bench" vm-disk --path "$run/cache-disk.img" --parts 4 --size "$CACHE_SIZE"
"$run/bench" vm-disk --path "$run/hdd-disk.img" --parts 4 --size "$HDD_SIZE"
if vm_bench_run_until "$run/fill.log" BENCHVM-FILLED "$run/cache-disk.img" "$run/hdd-disk.img" -- \
	"$run/bench" vm --phase fill --disks /dev/vda,/dev/vdb "${args[@]}"; then
	echo "bench-vm: power cut: recovery" >&2
	vm_bench_run_disks "$run/recover.log" "$run/cache-disk.img" "$run/hdd-disk.img" -- \
		"$run/bench" vm --phase recover --disks /dev/vda,/dev/vdb "${args[@]}" || echo "bench-vm: recovery failed (see $run/recover.log)" >&2
else
	echo "bench-vm: the fill failed (see $run/fill.log)" >&2
fi

cat >>"$run/host.json" <<EOF
 "load_at_end": "$(cut -d' ' -f1-3 /proc/loadavg)", "ended": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"}
EOF
cp "$run/host.json" "$run/out/"
"$run/bench" vm-render --in "$run/out" --out "$repo/docs"
rm -f "$run/cache-disk.img" "$run/hdd-disk.img"
echo "bench-vm: wrote docs/benchmarks.md (logs in $run)" >&2
