#!/usr/bin/env bash
# make vm-test (issue 12): the real-kernel tier. Builds the test binaries on
# the host (the host's Go build cache), boots the VM of hack/vm/run.sh once
# and runs every TestKernel* test in it with the nbd module loaded, in
# strict mode (WRITEBOOST_REQUIRE_TOOLS=1, WRITEBOOST_KERNEL_TIER=1: a
# missing tool or kernel feature fails). Then, on the host, the TestKernel*
# tests that boot VMs of their own (power cuts, node reboots: test/kernel),
# strict too. Fails if any test fails, if a TestKernel test skips, or if a
# package ran none.
#
# Environment: VM_MEM (MiB, default 2048), VM_CPUS (default nproc),
# VM_RACE=1 (build with -race), VM_RUN (a -test.run regexp, default
# ^TestKernel), VM_PKGS (space-separated packages for the shared boot
# instead of all; "none": no shared boot), VM_HOST_PKGS (the same for the
# host-driven packages), VM_TEST_OUT (where binaries and logs go, default
# CACHE/vm-test: give concurrent runs their own), WRITEBOOST_CACHE_DIR. test/kernel's knobs
# (WRITEBOOST_POWERCUT_SEED, WRITEBOOST_POWERCUT_CUTS) pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

# Packages with TestKernel* tests run inside the shared boot, in run order.
pkgs=(./pkg/attach ./pkg/pool ./test/csi)
# shellcheck disable=SC2206
if [ -n "${VM_PKGS:-}" ]; then pkgs=($VM_PKGS); fi
[ "${pkgs[*]}" != none ] || pkgs=()
# Packages whose TestKernel* tests run on the host and boot their own VMs.
hostpkgs=(./test/kernel)
# shellcheck disable=SC2206
if [ -n "${VM_HOST_PKGS:-}" ]; then hostpkgs=($VM_HOST_PKGS); fi
[ "${hostpkgs[*]}" != none ] || hostpkgs=()

cache="${WRITEBOOST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/writeboost-csi}"
# Not under /tmp: the guest's /tmp is its own.
out="${VM_TEST_OUT:-$cache/vm-test}"
rm -rf "$out"
mkdir -p "$out/bin"
race=()
[ "${VM_RACE:-0}" = 1 ] && race=(-race)
start=$(date +%s)
for p in "${pkgs[@]}" "${hostpkgs[@]}"; do
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

rc=0
: >"$out/vm.log"
if [ ${#pkgs[@]} -gt 0 ]; then
	set +e
	bash hack/vm/run.sh --mem "${VM_MEM:-2048}" --cpus "${VM_CPUS:-$(nproc)}" --console "$out/console.log" \
		--timeout 1200 -- "$out/guest.sh" 2>&1 | tee "$out/vm.log"
	rc=${PIPESTATUS[0]}
	set -e
fi
end=$(date +%s)

# The host-driven tests: each boots its own VMs; their guests' serve and
# console lines are kept out of the log unless a test fails (it prints them).
hrc=0
: >"$out/host.log"
for p in "${hostpkgs[@]}"; do
	echo "=== VMPKG $p" >>"$out/host.log"
	set +e
	(cd "$p" && WRITEBOOST_REQUIRE_TOOLS=1 WRITEBOOST_KERNEL_TIER=1 WRITEBOOST_CACHE_DIR="$cache" \
		"$out/bin/$(basename "$p").test" -test.v -test.run "${VM_RUN:-^TestKernel}" -test.timeout 40m) 2>&1 |
		tee -a "$out/host.log"
	[ "${PIPESTATUS[0]}" = 0 ] || hrc=1
	set -e
	echo "=== VMPKG-END $p" >>"$out/host.log"
done
hend=$(date +%s)

fail=0
if [ "$rc" != 0 ]; then
	echo "vm-test: the VM run exited $rc (console: $out/console.log)" >&2
	fail=1
fi
if [ "$hrc" != 0 ]; then
	echo "vm-test: a host-driven kernel test failed (log: $out/host.log)" >&2
	fail=1
fi
for log in "$out/vm.log" "$out/host.log"; do
	if grep -E -e '^\s*--- SKIP: TestKernel' "$log" >&2; then
		echo "vm-test: TestKernel tests skipped in the real-kernel tier" >&2
		fail=1
	fi
	if grep -E -e '^\s*--- FAIL' "$log" >&2; then
		fail=1
	fi
done
for p in "${pkgs[@]}" "${hostpkgs[@]}"; do
	n=$(cat "$out/vm.log" "$out/host.log" |
		awk -v p="$p" '$0 == "=== VMPKG " p {on=1} $0 == "=== VMPKG-END " p {on=0} on && /^--- PASS: TestKernel/' | wc -l)
	if [ "$n" = 0 ]; then
		echo "vm-test: no TestKernel test passed in $p" >&2
		fail=1
	fi
done
passed=$(cat "$out/vm.log" "$out/host.log" | grep -cE '^--- PASS: TestKernel' || true)
echo "vm-test: $passed TestKernel tests passed; build $((built - start)) s, shared VM boot $((end - built)) s, host-driven VM tests $((hend - end)) s"
exit "$fail"
