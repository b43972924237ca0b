#!/usr/bin/env bash
# bench.sh (make bench): vmpod's figures next to their baselines, each measured in the same
# run: boot (bare QEMU), exec and stdio (runc on the host), 9p vs virtio-fs, pod network
# (a process in the netns), CRI pod start and ExecSync (runc through the same containerd),
# and the host memory of an idle pod. Nothing asserts a time; results go to
# _output/bench.txt and, by hand, to docs/benchmarks.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

prepare_testbed
started_here=0
if ! hack/containerd.sh status >/dev/null 2>&1; then
  hack/containerd.sh start
  started_here=1
fi
trap '[ $started_here = 0 ] || hack/containerd.sh stop >/dev/null' EXIT
eval "$(hack/containerd.sh env)"

export VMPOD_ROOT VMPOD_INTEGRATION=1 VMPOD_BENCH=1
export VMPOD_KERNEL=$VMPOD_OUT/guest/vmlinux VMPOD_INITRD=$VMPOD_OUT/guest/initrd.img
export VMPOD_BUSYBOX_ROOTFS=$(hack/busybox-rootfs.sh)
export VMPOD_BENCH_RUNC=$(hack/guest-runc.sh)
export VMPOD_BENCH_OUT=$VMPOD_OUT/bench.txt
: > "$VMPOD_BENCH_OUT"
go_test_scratch
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), host kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%F)"
  echo "qemu: $(qemu-system-x86_64 --version | sed -n 1p); guest kernel $(cat "$VMPOD_OUT/guest/kernel.release")"
} | tee -a "$VMPOD_BENCH_OUT"
go test -count=1 -p 1 -timeout 60m -run 'TestBench' -v ./integration/bench/ ./integration/network/ 2>&1 |
  grep -vE '^(=== RUN|time=)'
echo "results: $VMPOD_BENCH_OUT"
