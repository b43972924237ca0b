# vmpod: see README.md. Every target works on a fresh Debian 12 machine (as root): the
# hack/ scripts install and build what they need and cache it under $(VMPOD_CACHE).
SHELL := /bin/bash
export VMPOD_CACHE ?= $(HOME)/.cache/vmpod
OUT := $(CURDIR)/_output
BIN := $(OUT)/bin
GO ?= /usr/local/go/bin/go
export PATH := /usr/local/go/bin:$(PATH)
export GOFLAGS := -buildvcs=false
export GONOSUMDB := github.com/digitalocean/go-qemu,sigs.k8s.io/cri-tools
export GOTOOLCHAIN := local

.PHONY: all build guest deps proto proto-check test bench demo clean containerd images critest \
	generate generate-check kube-assets controller-test cold-test cold-demo conformance-doc

all: build

## build: every binary into _output/bin
build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

## deps: Debian packages (QEMU, kernel build deps, protoc, ...)
deps:
	hack/install-deps.sh

## guest: guest kernel (cached) + initramfs with the agent into _output/guest
guest: deps
	hack/guest.sh

## test: everything CI runs, ending with the summary
test:
	hack/test.sh

## cold-test, cold-demo: the target as a new user's first run: a fresh clone of HEAD, an empty
## cache (hack/cold-run.sh; COLD_GO=1 empties Go's caches too). Run before changing hack/ lands.
cold-test:
	hack/cold-run.sh test

cold-demo:
	hack/cold-run.sh demo

## bench: boot and exec figures with their baselines, measured in one run
bench: guest
	hack/bench.sh

## demo: a container pod in a VM through CRI, then a KubeVirt VirtualMachine on a kubelet node
demo: guest
	hack/demo.sh

proto:
	hack/proto.sh

proto-check:
	hack/proto.sh --check

# controller: CRDs, deepcopy and RBAC from the kubebuilder markers (controller-gen, pinned)
generate:
	hack/generate.sh

generate-check:
	hack/generate.sh --check

# Kubernetes binaries (envtest: kube-apiserver, etcd, kubectl; cluster: kubelet, ...), built
# from the Go proxy and cached
kube-assets:
	hack/kube-assets.sh

# the controller's and the annotation schema's tests; the envtest suites need the assets
# (without KUBEBUILDER_ASSETS they skip and say why)
controller-test:
	KUBEBUILDER_ASSETS=$$(hack/kube-assets.sh) $(GO) test -count=1 ./api/... ./controller/... ./cmd/...

clean:
	rm -rf $(OUT)

# docs/conformance.md from the last critest run (make critest or make test): on purpose only
conformance-doc:
	hack/critest.sh --publish

# ---- test bed: private containerd (runc + vmpod runtimes), local registry, critest --------
# See docs/design/300-test-bed.md.
CRITEST_HANDLERS ?= runc vmpod

containerd:
	hack/containerd.sh build

images:
	hack/images.sh

# deps -> build -> images -> start -> critest -> stop -> leakcheck. The test bed is always
# stopped, whatever failed or was interrupted (the INT trap lets the shell go on to stop);
# the exit status is the first failure's.
critest:
	hack/install-deps.sh
	@trap : INT TERM; rc=0; rm -f $(OUT)/critest/summary.txt; \
	{ hack/containerd.sh build && hack/images.sh && hack/containerd.sh start && \
	  hack/critest.sh $(CRITEST_HANDLERS); } || rc=$$?; \
	hack/containerd.sh stop || { s=$$?; [ $$rc != 0 ] || rc=$$s; }; \
	hack/leakcheck.sh || { s=$$?; [ $$rc != 0 ] || rc=$$s; }; \
	cat $(OUT)/critest/summary.txt 2>/dev/null; \
	exit $$rc
