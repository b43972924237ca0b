#!/usr/bin/env bash
# controller-images.sh: the vmpod-controller and vmpod-importer OCI images, built from this
# tree without a container engine (go build + reproducible tar layers + crane), pushed to a
# registry under the names config/default uses (ghcr.io/vmpod/...:latest resolve to the
# test registry through containerd's _default mirror).
#
#   hack/controller-images.sh REGISTRY     e.g. 10.98.0.1:5100
#
#   vmpod/vmpod-controller:latest   /vmpod-controller and the libraries it links, user 65532
#   vmpod/vmpod-importer:latest     /vmpod-importer with Debian's qemu-img and prlimit and
#                                   the libraries they all link, and the CA bundle
# The binaries are `make build`'s: a static (CGO_ENABLED=0) build of its own compiled the
# Kubernetes client libraries a second time, 2.7 of a cold CI run's minutes, for images
# that only the test cluster runs.
#   pause:3.10                      the controller's default --compute-image, a tag of the
#                                   test registry's pause (the shim never runs it)
# Every run rebuilds (go build is cached; the images take ~5 s): they follow the tree.
set -euo pipefail
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

[ $# = 1 ] || die "usage: $0 REGISTRY"
REG=$1
CRANE=$TB_CRANE_BIN/crane
[ -x "$CRANE" ] || "$VMPOD_ROOT/hack/containerd.sh" build
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

mktar() { tar --numeric-owner --owner=0 --group=0 --sort=name --mtime=@0 -C "$1" -cf "$2" .; }

# libs_of ROOT FILE: copy the shared libraries FILE links (per ldd, the loader included) to
# their own paths under ROOT
libs_of() {
  local root=$1 lib
  for lib in $(ldd "$2" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# with_libs ROOT COMMAND...: copy each command to ROOT/usr/bin with its libraries
with_libs() {
  local root=$1 b
  shift
  mkdir -p "$root/usr/bin"
  for b in "$@"; do
    cp "$(command -v "$b")" "$root/usr/bin/"
    libs_of "$root" "$(command -v "$b")"
  done
}

image() { # NAME LAYERDIR MUTATE-ARGS...
  local name=$1 dir=$2
  shift 2
  mktar "$dir" "$W/$name.tar"
  "$CRANE" append --oci-empty-base -f "$W/$name.tar" -t "$REG/vmpod/$name:latest" >/dev/null
  "$CRANE" mutate "$REG/vmpod/$name:latest" --set-platform linux/amd64 "$@" -t "$REG/vmpod/$name:latest" >/dev/null
  log "pushed $REG/vmpod/$name:latest ($(du -h "$W/$name.tar" | cut -f1))"
}

make -C "$VMPOD_ROOT" --no-print-directory build >/dev/null
BIN=$VMPOD_OUT/bin

mkdir -p "$W/controller"
install -m 0755 "$BIN/vmpod-controller" "$W/controller/vmpod-controller"
libs_of "$W/controller" "$BIN/vmpod-controller"
image vmpod-controller "$W/controller" --entrypoint /vmpod-controller -u 65532:65532

command -v qemu-img >/dev/null || die "qemu-img missing (hack/install-deps.sh installs qemu-utils)"
mkdir -p "$W/importer/etc/ssl/certs" "$W/importer/tmp"
chmod 1777 "$W/importer/tmp"
install -m 0755 "$BIN/vmpod-importer" "$W/importer/vmpod-importer"
libs_of "$W/importer" "$BIN/vmpod-importer"
with_libs "$W/importer" qemu-img prlimit
cp /etc/ssl/certs/ca-certificates.crt "$W/importer/etc/ssl/certs/"
image vmpod-importer "$W/importer" --entrypoint /vmpod-importer

"$CRANE" tag "$REG/pause:3.10.2" 3.10 >/dev/null
log "tagged $REG/pause:3.10"
