#!/usr/bin/env bash
# make vm-test (issue 12): the real-kernel tier. Builds the test binaries on
# the host (the host's Go build cache), boots the VM of hack/vm/run.sh once
# and runs every TestKernel* test in it with the nbd module loaded, in
# strict mode (WRITEBOOST_REQUIRE_TOOLS=1, WRITEBOOST_KERNEL_TIER=1: a
# missing tool or kernel feature fails). Fails if any test fails, if a
# TestKernel test skips, or if a package ran none.
#
# Environment: VM_MEM (MiB, default 2048), VM_CPUS (default nproc),
# VM_RACE=1 (build with -race), VM_RUN (a -test.run regexp, default
# ^TestKernel), VM_PKGS (space-separated packages instead of all),
# WRITEBOOST_CACHE_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

# Packages with TestKernel* tests, in run order.
pkgs=(./pkg/attach ./pkg/pool ./test/csi)
# shellcheck disable=SC2206
if [ -n "${VM_PKGS:-}" ]; then pkgs=($VM_PKGS); fi

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
# Not under /tmp: the guest's /tmp is its own.
out="$cache/vm-test"
rm -rf "$out"
mkdir -p "$out/bin"
race=()
[ "${VM_RACE:-0}" = 1 ] && race=(-race)
start=$(date +%s)
for p in "${pkgs[@]}"; do
	go test -c "${race[@]}" -o "$out/bin/$(basename "$p").test" "$p"
done
built=$(date +%s)

# The guest side: each binary in its package directory, as go test does.
cat >"$out/guest.sh" <<GUEST
#!/bin/bash
export WRITEBOOST_REQUIRE_TOOLS=1 WRITEBOOST_KERNEL_TIER=1
rc=0
for p in ${pkgs[*]}; do
	b="$out/bin/\$(basename "\$p").test"
	echo "=== VMPKG \$p"
	(cd "$repo/\$p" && "\$b" -test.v -test.run '${VM_RUN:-^TestKernel}' -test.timeout 20m) || rc=1
	echo "=== VMPKG-END \$p"
done
exit \$rc
GUEST
chmod +x "$out/guest.sh"

set +e
bash hack/vm/run.sh --mem "${VM_MEM:-2048}" --cpus "${VM_CPUS:-$(nproc)}" --console "$out/console.log" \
	--timeout 1200 -- "$out/guest.sh" 2>&1 | tee "$out/vm.log"
rc=${PIPESTATUS[0]}
set -e
end=$(date +%s)

fail=0
if [ "$rc" != 0 ]; then
	echo "vm-test: the VM run exited $rc (console: $out/console.log)" >&2
	fail=1
fi
if grep -E -e '^\s*--- SKIP: TestKernel' "$out/vm.log" >&2; then
	echo "vm-test: TestKernel tests skipped in the real-kernel tier" >&2
	fail=1
fi
if grep -E -e '^\s*--- FAIL' "$out/vm.log" >&2; then
	fail=1
fi
for p in "${pkgs[@]}"; do
	n=$(awk -v p="$p" '$0 == "=== VMPKG " p {on=1} $0 == "=== VMPKG-END " p {on=0} on && /^--- PASS: TestKernel/' "$out/vm.log" | wc -l)
	if [ "$n" = 0 ]; then
		echo "vm-test: no TestKernel test passed in $p" >&2
		fail=1
	fi
done
passed=$(grep -cE '^--- PASS: TestKernel' "$out/vm.log" || true)
echo "vm-test: $passed TestKernel tests passed; build $((built - start)) s, VM $((end - built)) s"
exit "$fail"
