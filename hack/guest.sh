#!/usr/bin/env bash
# guest.sh: the container-pod guest into _output/guest: vmlinux (cached kernel build) and
# initrd.img (the agent built from this tree + the cached static runc).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

OUT=$VMPOD_OUT/guest
mkdir -p "$OUT"
KDIR=$("$VMPOD_ROOT/hack/guest-kernel.sh")
# hard link when the cache is on the same filesystem: 22 MB not copied on every run
ln -f "$KDIR/vmlinux" "$OUT/vmlinux" 2>/dev/null || cp "$KDIR/vmlinux" "$OUT/vmlinux"
cp "$KDIR/release" "$OUT/kernel.release"
"$VMPOD_ROOT/hack/guest-initrd.sh" "$OUT/initrd.img"
log "guest ready: $OUT (kernel $(cat "$OUT/kernel.release"))"
