#!/usr/bin/env bash
# controller-images.sh: the vmpod-controller and vmpod-importer OCI images, built from this
# tree without a container engine (go build + reproducible tar layers + crane), pushed to a
# registry under the names config/default uses (ghcr.io/vmpod/...:latest resolve to the
# test registry through containerd's _default mirror).
#
#   hack/controller-images.sh REGISTRY     e.g. 10.98.0.1:5100
#
#   vmpod/vmpod-controller:latest   /vmpod-controller (static), user 65532
#   vmpod/vmpod-importer:latest     /vmpod-importer (static) with Debian's qemu-img and
#                                   prlimit and the libraries they link, and the CA bundle
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

# with_libs ROOT BINARY...: copy each binary to ROOT/usr/bin and the shared libraries it
# links (per ldd) to their own paths under ROOT
with_libs() {
  local root=$1 b lib
  shift
  mkdir -p "$root/usr/bin"
  for b in "$@"; do
    cp "$(command -v "$b")" "$root/usr/bin/"
    for lib in $(ldd "$(command -v "$b")" | grep -o '/[^ ]*'); do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
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

log "go build vmpod-controller vmpod-importer (static)"
(cd "$VMPOD_ROOT" && CGO_ENABLED=0 go build -trimpath -o "$W/bin/" ./cmd/vmpod-controller ./cmd/vmpod-importer)

mkdir -p "$W/controller"
install -m 0755 "$W/bin/vmpod-controller" "$W/controller/vmpod-controller"
image vmpod-controller "$W/controller" --entrypoint /vmpod-controller -u 65532:65532

command -v qemu-img >/dev/null || die "qemu-img missing (hack/install-deps.sh installs qemu-utils)"
mkdir -p "$W/importer/etc/ssl/certs" "$W/importer/tmp"
chmod 1777 "$W/importer/tmp"
install -m 0755 "$W/bin/vmpod-importer" "$W/importer/vmpod-importer"
with_libs "$W/importer" qemu-img prlimit
cp /etc/ssl/certs/ca-certificates.crt "$W/importer/etc/ssl/certs/"
image vmpod-importer "$W/importer" --entrypoint /vmpod-importer

"$CRANE" tag "$REG/pause:3.10.2" 3.10 >/dev/null
log "tagged $REG/pause:3.10"
