#!/usr/bin/env bash
# bench.sh (make bench): vmpod's figures next to their baselines, each measured in the same
# run: boot (bare QEMU), exec and stdio (runc on the host), 9p vs virtio-fs, pod network
# (a process in the netns), CRI pod start, ExecSync and idle memory (runc and gVisor through
# the same containerd), the host memory of an idle pod, and a VM pod's start and memory
# (bare QEMU and libvirt booting the same guest), and migrations (a VM's, a VM pod's, a
# container VM's against the same machine without its container). Nothing asserts a time; results go to
# _output/bench.txt and, by hand, to docs/benchmarks.md.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

prepare_testbed
# the VM-pod test guest, served by the test bed's registry as a containerDisk (images.sh)
export VMPOD_VM_GUEST VMPOD_VM_GUEST_DIR
VMPOD_VM_GUEST=$(hack/vm-guest-image.sh)
VMPOD_VM_GUEST_DIR=$VMPOD_VM_GUEST
# gVisor, the CRI table's third peer: a runtime handler of a test bed started here
# (hack/gvisor.sh builds it; a test bed already running without it leaves gVisor out, and
# the bench says so)
export VMPOD_GVISOR_DIR
VMPOD_GVISOR_DIR=$(hack/gvisor.sh) || { log "gVisor did not build: the CRI table goes without it"; VMPOD_GVISOR_DIR=; }
started_here=0
if ! hack/containerd.sh status >/dev/null 2>&1; then
  hack/containerd.sh start
  started_here=1
else
  hack/images.sh   # a running test bed gets the guest pushed
fi
# libvirt (libvirtd with only its QEMU driver, and virtlogd), the baseline a KubeVirt node
# pays per VM: hack/libvirt-baseline.sh
eval "$(hack/libvirt-baseline.sh start)"
trap 'hack/libvirt-baseline.sh stop >/dev/null || true; [ $started_here = 0 ] || hack/containerd.sh stop >/dev/null' EXIT
eval "$(hack/containerd.sh env)"
export VMPOD_VM_GUEST_IMAGE=docker.io/$(hack/images.sh --vm-guest-ref)

export VMPOD_ROOT VMPOD_INTEGRATION=1 VMPOD_BENCH=1
export VMPOD_KERNEL=$VMPOD_OUT/guest/vmlinux VMPOD_INITRD=$VMPOD_OUT/guest/initrd.img
export VMPOD_BUSYBOX_ROOTFS=$(hack/busybox-rootfs.sh)
export VMPOD_BENCH_RUNC=$(hack/guest-runc.sh)
# QEMU 10 and virtiofsd 1.13 (Debian's, checked and cached): a container VM's migration
export VMPOD_QEMU_NEXT=$(hack/qemu-next.sh)
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
