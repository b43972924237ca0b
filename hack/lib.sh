# lib.sh: sourced by hack/ scripts. Pinned versions, the build cache and logging.
# Every build result lives under $VMPOD_CACHE, in a directory named by what it was built
# from (a version or a content hash), so a second run finds it and returns at once.

# shellcheck disable=SC2034  # variables are for the scripts that source this file
VMPOD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VMPOD_CACHE=${VMPOD_CACHE:-$HOME/.cache/vmpod}
VMPOD_OUT=${VMPOD_OUT:-$VMPOD_ROOT/_output}

# Pinned versions; why these: docs/design/000-build.md.
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.2
CNI_PLUGINS_VERSION=v1.9.1
CRANE_VERSION=v0.22.1
CRI_TOOLS_VERSION=v1.36.0
# controller: controller-gen (CRDs, deepcopy, RBAC) and envtest's kube-apiserver + etcd + kubectl.
# k8s.io/* v0.37 (forced by containerd v2.4.2) -> controller-runtime v0.25 -> controller-tools v0.23;
# v1.37.1 is the newest k8s.io/kubernetes the proxy serves (v1.37.2+ answer 403).
CONTROLLER_TOOLS_VERSION=v0.23.0
ENVTEST_K8S_VERSION=v1.37.1
PROTOC_GEN_GO_VERSION=v1.36.12
# the test cluster's dynamic Filesystem PVCs (hack/cluster.sh); the CSI hostpath driver is not served
LOCAL_PATH_PROVISIONER_VERSION=v0.0.30
TTRPC_VERSION=v1.2.10
# gVisor (make bench only): the gvisor.dev/gvisor module's pseudo-version of its go branch
GVISOR_VERSION=v0.0.0-20260905035102-160fafc42237

export PATH=/usr/local/go/bin:$PATH
export GOFLAGS=${GOFLAGS:--buildvcs=false}
export GOTOOLCHAIN=local
# digitalocean/go-qemu has no tags and the checksum DB does not answer for it
export GONOSUMDB=${GONOSUMDB:-github.com/digitalocean/go-qemu,sigs.k8s.io/cri-tools}

_t0=${_t0:-$(date +%s)}
log() { printf '[%s +%ss] %s\n' "$(basename "$0")" "$(( $(date +%s) - _t0 ))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# hash_of FILE... : a short content hash, for cache keys
hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# publish SRC DST: atomically place a finished build at its cache path
publish() { local tmp="$2.tmp.$$"; rm -rf "$tmp"; mv "$1" "$tmp" && rm -rf "$2" && mv "$tmp" "$2"; }

# prepare_testbed: what a run against the test bed's containerd needs: Debian packages, the
# guest, the shim and the test bed's binaries; and the vmpod config its containerd hands the
# shim (ConfigPath), which points at this tree's guest. Exports VMPOD_CONFIG.
prepare_testbed() {
  "$VMPOD_ROOT/hack/install-deps.sh"
  "$VMPOD_ROOT/hack/guest.sh"
  make -C "$VMPOD_ROOT" --no-print-directory build >/dev/null
  "$VMPOD_ROOT/hack/containerd.sh" build
  export VMPOD_CONFIG=$VMPOD_OUT/vmpod-config.toml
  cat > "$VMPOD_CONFIG" <<EOC
# written by hack/lib.sh prepare_testbed
state_dir = "/run/vmpod-test/vm"
[hypervisor]
kernel = "$VMPOD_OUT/guest/vmlinux"
initrd = "$VMPOD_OUT/guest/initrd.img"
# a named model the VM pod tests boot (TCG emulates it); by default a node lists none
cpu_models = ["Nehalem"]
EOC
}

# go_test_scratch: sweep what an earlier, interrupted `go test` left, then point TMPDIR at a
# fresh scratch directory. Integration tests keep VM state under /run/vmpod-it-* and temp
# files (overlay rootfs mounts among them) under TMPDIR; their t.Cleanup never runs when
# the run is killed (a timeout, a machine reset), so the mounts and files would stay.
# Anything a live process still names is left alone.
GO_TEST_TMP=/tmp/vmpod-gotest
go_test_scratch() {
  local d m
  for d in /run/vmpod-it-* "$GO_TEST_TMP"; do
    [ -e "$d" ] || continue
    if [ -z "$(ls -A "$d")" ]; then
      rmdir "$d"   # a finished run's empty scratch dir
      continue
    fi
    if pgrep -f -- "$d" >/dev/null; then
      log "note: $d is in use by a running process: left alone"
      continue
    fi
    log "removing $d: scratch space of an earlier test run"
    for m in $(awk -v p="$d/" 'index($2 "/", p) == 1 { print $2 }' /proc/self/mounts | sort -r); do
      umount "$m" || umount -l "$m"
    done
    rm -rf --one-file-system "$d"
  done
  mkdir -p "$GO_TEST_TMP"
  export TMPDIR=$GO_TEST_TMP
}
