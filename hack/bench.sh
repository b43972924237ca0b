#!/usr/bin/env bash
# bench.sh: vmpod's figures next to their baselines, measured in one run (make bench).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"
export VMPOD_INTEGRATION=1 VMPOD_BENCH=1
export VMPOD_KERNEL=$VMPOD_OUT/guest/vmlinux VMPOD_INITRD=$VMPOD_OUT/guest/initrd.img
export VMPOD_BUSYBOX_ROOTFS=$(hack/busybox-rootfs.sh)
export VMPOD_BENCH_RUNC=$(hack/guest-runc.sh)
export VMPOD_BENCH_OUT=$VMPOD_OUT/bench.txt
: > "$VMPOD_BENCH_OUT"
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r), $(date -u +%F)"
  echo "qemu: $(qemu-system-x86_64 --version | head -1)"
} | tee -a "$VMPOD_BENCH_OUT"
go test -count=1 -run 'TestBench' -v ./integration/bench/ 2>&1 | grep -vE '^(=== RUN|time=)'
echo "results: $VMPOD_BENCH_OUT"
