#!/usr/bin/env bash
# The README's first quick-start command: installs what serving and its
# usage examples need (NBD clients, FUSE), builds bin/writeboost, and runs
# `writeboost serve` on its defaults (sparse images and sockets under
# ./writeboost-data/). Extra arguments go to serve, e.g.
#   bash hack/serve.sh --simulate-hdd --backing-size 8GiB
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
WITH_GO_TOOLS=0 bash "$root/hack/deps.sh"
version="$(git -C "$root" describe --tags --always --dirty 2>/dev/null || echo dev)"
(cd "$root" && CGO_ENABLED=0 go build -ldflags "-X main.version=$version" -o bin/writeboost ./cmd/writeboost)
exec "$root/bin/writeboost" serve "$@"
