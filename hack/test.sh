#!/usr/bin/env bash
# test.sh: everything CI runs (`make test`), on a fresh Debian 12 machine as root.
#
#   1. build what the tests need (cached under $VMPOD_CACHE): the guest kernel and
#      initramfs, the busybox test rootfs, containerd + runc + CNI + critest (the test
#      bed), Kubernetes' binaries (envtest, the test cluster);
#   2. start the test bed: a private containerd with the runc and vmpod runtimes; and the
#      test cluster: a control plane and two nodes with kubelet (hack/cluster.sh);
#   3. fuzz every parser of untrusted input for a bounded time (hack/fuzz.sh); run every
#      Go test package: unit tests under -race, integration tests that boot real VMs under
#      QEMU, drive containerd through CRI and ctr, run the controller against a real
#      kube-apiserver, and the cluster's end-to-end tests through kubectl;
#   4. run critest with the runc handler (the bar) and the vmpod handler;
#   5. stop the test bed and the cluster and check they left nothing behind;
#   6. end with the summary of all of it. Exit status 0 only if nothing failed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

RESULTS=$VMPOD_OUT/test
rm -rf "$RESULTS"; mkdir -p "$RESULTS"
EXTRA=$RESULTS/extra.txt
: > "$EXTRA"
CRITEST_HANDLERS=${CRITEST_HANDLERS:-runc vmpod}

# A failing step names itself: a cold run is long, and "Error 1" after 30 minutes of build
# logs does not say which of the builds broke. What a step built before it failed stays in
# the cache (each build publishes only complete results), so a re-run resumes there.
STEP=
step() { STEP=$*; log "== $*"; }
failed_step() { [ "$1" = 0 ] || [ -z "$2" ] || log "FAILED (exit $1) in step: $2"; }
trap 'failed_step $? "$STEP"' EXIT

step "scripts: no early-closing readers after pipes"
hack/check-pipes.sh
step "guest, shim, test bed binaries (cached)"
prepare_testbed
step "test rootfs"
BUSYBOX=$(hack/busybox-rootfs.sh)
step "QEMU and virtiofsd that migrate virtio-fs, beside the host's QEMU 7.2 (cached)"
# integration/runtime's container-pod migration runs on them (docs/design/211)
export VMPOD_QEMU_NEXT
VMPOD_QEMU_NEXT=$(hack/qemu-next.sh)
step "VM-pod test guest: Debian with cloud-init and qemu-guest-agent (cached)"
# the test bed's registry serves it as a containerDisk (hack/images.sh)
export VMPOD_VM_GUEST
VMPOD_VM_GUEST=$(hack/vm-guest-image.sh)
step "nested VFIO proof's L1 guest: the same with Debian's QEMU (cached)"
export VMPOD_NESTED_GUEST
VMPOD_NESTED_GUEST=$(hack/vm-guest-image.sh --nested)
step "generated code up to date"
hack/proto.sh --check
hack/generate.sh --check
step "Kubernetes binaries (envtest, cluster)"
KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)

stop_testbed() {
  step "stop the test cluster, check for leaks"
  hack/cluster.sh stop || echo "FAIL test cluster: stop failed or left something behind (above)" >> "$EXTRA"
  step "stop the test bed, check for leaks"
  hack/containerd.sh stop || echo "FAIL test bed: stop failed" >> "$EXTRA"
  hack/leakcheck.sh || echo "FAIL leak check: the test bed left something behind (above)" >> "$EXTRA"
}
trap 'rc=$? s=$STEP; stop_testbed; failed_step $rc "$s"' EXIT
step "start the test bed"
hack/containerd.sh start-fresh
eval "$(hack/containerd.sh env)"
step "start the test cluster (integration/cluster's tests run against it)"
hack/cluster.sh start-fresh
eval "$(hack/cluster.sh env)"

export VMPOD_ROOT KUBEBUILDER_ASSETS
export VMPOD_INTEGRATION=1
export VMPOD_KERNEL=$VMPOD_OUT/guest/vmlinux
export VMPOD_INITRD=$VMPOD_OUT/guest/initrd.img
export VMPOD_BUSYBOX_ROOTFS=$BUSYBOX
export VMPOD_VM_GUEST_IMAGE=docker.io/$(hack/images.sh --vm-guest-ref)
export VMPOD_VM_GUEST_RAW=$VMPOD_VM_GUEST/disk.raw

step "go vet"
go vet ./...
step "compiling tests"
packages=$(go list ./...)
mapfile -t units < <(grep -v '/integration/' <<< "$packages")
go test -race -count=1 -run '^$' "${units[@]}" >/dev/null
go test -count=1 -run '^$' ./integration/... >/dev/null

step "fuzz the parsers of untrusted input (hack/fuzz.sh)"
hack/fuzz.sh || echo "FAIL fuzz: a target crashed (above; the input is under its package's testdata/fuzz/)" >> "$EXTRA"

# Unit packages under the race detector: they hold the concurrency (event queues, agent
# reconnects, exit ordering, the controller's reconcilers). Then the integration packages,
# one at a time: they boot VMs and must not starve each other on a 2-core machine; tests
# inside a package still run in parallel where they say so.
step "go test (unit under -race, then integration)"
go build -o "$RESULTS/testsummary" ./hack/testsummary
go_test_scratch
set +e
{
  go test -race -json -count=1 -timeout 20m "${units[@]}"
  go test -json -count=1 -p 1 -timeout 45m ./integration/...
} 2>&1 | "$RESULTS/testsummary" -record "$RESULTS/go-test.json"
set -e

step "critest: $CRITEST_HANDLERS"
# critest.sh prints one "critest[h]: N passed, N failed, N skipped in Xs wall" line per
# handler; a handler with failures becomes a FAIL line of the summary.
if ! hack/critest.sh $CRITEST_HANDLERS; then
  echo "FAIL critest: see _output/critest/*/critest.log and _output/critest/conformance.md" >> "$EXTRA"
fi
grep -h '^critest\[' "$VMPOD_OUT/critest/summary.txt" >> "$EXTRA" 2>/dev/null || echo "FAIL critest: no summary" >> "$EXTRA"

trap 'failed_step $? "$STEP"' EXIT
stop_testbed
step "done"
"$RESULTS/testsummary" -extra "$EXTRA" "$RESULTS/go-test.json"
