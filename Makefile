# writeboost-csi. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
IMAGE ?= writeboost-csi:$(VERSION)
BIN := bin/writeboost

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^##@/ {printf "\n%s\n", substr($$0, 5)} /^[a-zA-Z_-]+:.*##/ {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

##@ Build
.PHONY: build
build: ## Build bin/writeboost.
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/writeboost

.PHONY: image
image: ## Build the container image (needs a Docker engine).
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) .

.PHONY: manifests
manifests: ## Render deploy/ from the Helm chart.
	bash hack/manifests.sh

##@ Test
.PHONY: deps
deps: ## Install system packages and pinned Go tools.
	bash hack/deps.sh

.PHONY: test
test: ## Run every test with -race (installs what the tests need).
	bash hack/test.sh

.PHONY: vm-test
vm-test: ## The TestKernel* tests in a real Linux kernel under QEMU (root; see hack/vm).
	bash hack/vm/test.sh

.PHONY: e2e
e2e: ## The chart on a real single-node Kubernetes built here (root; see hack/e2e).
	bash hack/e2e/e2e.sh

.PHONY: stress
stress: ## Long crash sweeps and reference-model runs of the engine.
	WRITEBOOST_STRESS=1 $(GO) test -race -run 'Crash|Model|Concurrent' -timeout 120m ./pkg/engine/

.PHONY: fuzz
fuzz: ## Fuzz every decoder for a while (FUZZTIME each, default 30s).
	bash hack/fuzz.sh $(or $(FUZZTIME),30s)

.PHONY: bench
bench: ## Benchmarks against peers; regenerates docs/benchmarks.md.
	bash hack/bench.sh

.PHONY: bench-vm
bench-vm: ## dm-writeboost, dm-writecache, bcache in the real-kernel VM; regenerates its part of docs/benchmarks.md.
	bash hack/bench-vm.sh

##@ Lint
.PHONY: lint
lint: ## gofmt, go vet and staticcheck.
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	WITH_GO_TOOLS=0 WITH_LINT_TOOLS=1 bash hack/deps.sh
	$(GOBIN)/staticcheck ./...
	$(GOBIN)/staticcheck -tags e2e,e2e_restart ./test/e2e/
