#!/usr/bin/env bash
# test.sh: everything CI runs (`make test`), on a fresh Debian 12 machine as root.
# Builds what the tests need (cached under $VMPOD_CACHE), runs every Go test package
# — unit tests, and integration tests that boot real VMs under QEMU — and ends with the
# summary of all of it. Exit status: 0 only if nothing failed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

RESULTS=$VMPOD_OUT/test
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
: > "$RESULTS/extra.txt"

log "dependencies"
hack/install-deps.sh
log "guest kernel and initramfs"
hack/guest.sh
log "test rootfs"
BUSYBOX=$(hack/busybox-rootfs.sh)

export VMPOD_INTEGRATION=1
export VMPOD_KERNEL=$VMPOD_OUT/guest/vmlinux
export VMPOD_INITRD=$VMPOD_OUT/guest/initrd.img
export VMPOD_BUSYBOX_ROOTFS=$BUSYBOX

log "generated code up to date"
hack/proto.sh --check
log "go vet"
go vet ./...
log "compiling tests"
go test -count=1 -run '^$' ./... >/dev/null

# One package at a time: integration packages boot VMs and must not starve each other
# on a 2-core machine; tests inside a package still run in parallel where they say so.
log "go test (unit + integration)"
go build -o "$RESULTS/testsummary" ./hack/testsummary
set +e
go test -json -count=1 -p 1 -timeout 45m ./... 2>&1 | "$RESULTS/testsummary" -record "$RESULTS/go-test.json"
set -e

log "done"
"$RESULTS/testsummary" -extra "$RESULTS/extra.txt" "$RESULTS/go-test.json"
