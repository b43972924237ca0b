# vmpod: see README.md. Every target works on a fresh Debian 12 machine (as root); the
# hack/ scripts install and build what they need and cache it under $(VMPOD_CACHE).
SHELL := /bin/bash
export VMPOD_CACHE ?= $(HOME)/.cache/vmpod
OUT := $(CURDIR)/_output
BIN := $(OUT)/bin
GO ?= /usr/local/go/bin/go
export GOFLAGS := -buildvcs=false
export GONOSUMDB := github.com/digitalocean/go-qemu,sigs.k8s.io/cri-tools
export GOTOOLCHAIN := local

.PHONY: all build guest proto proto-check test unit integration bench demo clean \
	generate generate-check envtest-assets controller-test

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

proto:
	hack/proto.sh

proto-check:
	hack/proto.sh --check

# controller: CRDs, deepcopy and RBAC from the kubebuilder markers (controller-gen, pinned)
generate:
	hack/generate.sh

generate-check:
	hack/generate.sh --check

# kube-apiserver, etcd and kubectl for envtest, built from the Go proxy and cached
envtest-assets:
	hack/envtest-assets.sh

# the controller's and the annotation schema's tests; the envtest suites need the assets
# (without KUBEBUILDER_ASSETS they skip and say why)
controller-test:
	KUBEBUILDER_ASSETS=$$(hack/envtest-assets.sh) $(GO) test -count=1 ./api/... ./controller/... ./cmd/...

clean:
	rm -rf $(OUT)
