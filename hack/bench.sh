#!/usr/bin/env bash
# make bench: benchmarks against peers (issue 8). Installs fio and nbdkit,
# then runs the Go driver, which regenerates docs/benchmarks.md, the charts
# in docs/benchmarks/ and docs/benchmarks/results.json. Extra arguments go
# to the driver (go run ./hack/bench -h lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/deps.sh
exec go run ./hack/bench "$@"
