#!/usr/bin/env bash
# demo.sh: boot a vmpod VM and run a busybox container in it (see hack/demo).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"
ROOTFS=$(hack/busybox-rootfs.sh)
go run ./hack/demo -guest "$VMPOD_OUT/guest" -rootfs "$ROOTFS"
