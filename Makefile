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

.PHONY: all build guest proto proto-check test unit integration bench demo clean containerd images critest

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -o $(BIN)/ ./cmd/...

proto:
	hack/proto.sh

proto-check:
	hack/proto.sh --check

clean:
	rm -rf $(OUT)

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
