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

.PHONY: all build guest proto proto-check test unit integration bench demo clean

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
