# tether — build, test, benchmark and demo. `make help` lists the targets.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
BIN := bin/tether
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
# The commit is passed explicitly: builds with -buildvcs=false (GOFLAGS here)
# or without .git embed no VCS data for `tether version` to read.
COMMIT ?= $(shell c=$$(git rev-parse HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || c=$$c-dirty; echo $$c; })
BUILDINFO := github.com/tether-net/tether/internal/buildinfo
LDFLAGS ?= -X $(BUILDINFO).Version=$(VERSION) -X $(BUILDINFO).Commit=$(COMMIT)
# Privileged tests fail instead of skipping when this is 1 (CI sets it).
TETHER_TEST_PRIVILEGED ?= $(if $(filter 0,$(shell id -u)),1,0)
export TETHER_TEST_PRIVILEGED

.PHONY: help build test test-unit bench bench-smoke fuzz-smoke demo generate check-generated lint setup image clean

help: ## list targets
	@awk -F':.*## ' '/^[a-z-]+:.*## /{printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/tether
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/tether

# The container image (deploy/container): the binary built static, then an
# image FROM scratch, so nothing is pulled. PODMAN may carry global flags.
IMAGE ?= ghcr.io/tether-net/tether:$(VERSION)
IMAGE_DIR ?= bin/image
PODMAN ?= podman

image: ## the container image tether:VERSION (a static binary FROM scratch; needs podman)
	mkdir -p $(IMAGE_DIR)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o $(IMAGE_DIR)/tether ./cmd/tether
	$(PODMAN) build --layers=false -f deploy/container/Containerfile \
		--build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$(or $(COMMIT),unknown) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		-t $(IMAGE) $(IMAGE_DIR)

setup: ## install what a fresh machine lacks (as root)
	bash scripts/setup.sh

test: ## unit, integration and end-to-end tests (root runs the privileged ones)
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 20m ./...

test-unit: ## only the tests that need no root
	TETHER_TEST_PRIVILEGED=0 $(GO) test -count=1 -short ./...

bench: build ## benchmarks, as ratios against a baseline measured in the same run
	$(GO) run ./test/bench/tunnel
	$(GO) run ./test/bench/paths
	$(GO) run ./test/bench/redirector
	$(GO) run ./test/bench/proxy
	$(GO) run ./test/bench/scale

bench-smoke: build ## the benchmarks in seconds, checking they still run and measure (CI runs this)
	$(GO) run ./test/bench/tunnel -smoke
	$(GO) run ./test/bench/paths -smoke
	$(GO) run ./test/bench/redirector -smoke
	$(GO) run ./test/bench/proxy -smoke
	$(GO) run ./test/bench/scale -smoke

fuzz-smoke: ## every fuzz target for a few seconds (FUZZTIME=5s; CI runs this)
	bash scripts/fuzz-smoke.sh

demo: setup build ## the whole system in a simulated company network
	$(GO) run ./scripts/demo --tether $(CURDIR)/$(BIN)

generate: ## rebuild the eBPF objects and Go bindings (needs clang)
	$(GO) generate ./bpf/...

check-generated: generate ## fail when the committed eBPF objects are stale
	@if [ -n "$$(git status --porcelain -- bpf/)" ]; then git status --short -- bpf/; echo "generated BPF objects are stale: run make generate and commit" >&2; exit 1; fi

lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change: $$out" >&2; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin
