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

.PHONY: all build guest deps proto proto-check test bench demo clean

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

## bench: boot and exec figures with their baselines, measured in one run
bench: guest
	hack/bench.sh

## demo: boot a VM and run a container in it
demo: guest
	hack/demo.sh

proto:
	hack/proto.sh

proto-check:
	hack/proto.sh --check

clean:
	rm -rf $(OUT)
