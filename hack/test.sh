#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs every
# test with the race detector. In CI (CI=true) missing tools fail tests
# instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_LINT_TOOLS=1 bash hack/deps.sh
export PATH="$(go env GOPATH)/bin:$PATH"
if [ "${CI:-}" = "true" ]; then export WRITEBOOST_REQUIRE_TOOLS=1; fi
echo "== gofmt / go vet"
out=$(gofmt -l $(git ls-files '*.go')); if [ -n "$out" ]; then echo "gofmt needed:"; echo "$out"; exit 1; fi
go vet ./...
# The e2e suites build only with their tags; check them too.
e2e_tags=e2e,e2e_restart
go vet -tags "$e2e_tags" ./test/e2e/
echo "== staticcheck"
# Pinned in hack/deps.sh. It finds what vet does not: dropped errors
# (an err assigned and never checked), dead code, misused APIs.
staticcheck ./...
staticcheck -tags "$e2e_tags" ./test/e2e/
echo "== go test -race"
# -p 1 for the packages that mount filesystems and attach loop devices, so
# they do not compete; unit packages run in parallel first.
go test -race -timeout 30m $(go list ./... | grep -v -e /test/) "$@"
go test -race -p 1 -timeout 30m ./test/... "$@"
echo "== vm-test: the TestKernel* tests in a real kernel under QEMU (hack/vm)"
bash hack/vm/test.sh
echo "== e2e: the chart on a single-node Kubernetes (hack/e2e)"
bash hack/e2e/e2e.sh
