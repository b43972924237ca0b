#!/usr/bin/env bash
# generate.sh: the controller's generated code and manifests, from the kubebuilder markers in
# controller/, with controller-gen pinned in lib.sh (built from the Go proxy, cached by version).
#
#   hack/generate.sh          regenerate in place:
#                               controller/api/v1alpha1/zz_generated.deepcopy.go
#                               config/crd/bases/*.yaml   (CRDs)
#                               config/rbac/role.yaml     (the controller's ClusterRole)
#   hack/generate.sh --check  fail if anything committed differs from a fresh generation
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=$VMPOD_CACHE/tools/controller-gen-$CONTROLLER_TOOLS_VERSION
if [ ! -x "$BIN/controller-gen" ]; then
  log "building controller-gen $CONTROLLER_TOOLS_VERSION (cold: ~1-2 min)"
  rm -rf "$BIN.tmp"
  mkdir -p "$BIN.tmp"
  GOBIN=$BIN.tmp CGO_ENABLED=0 go install "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION"
  publish "$BIN.tmp" "$BIN"
fi
CG=$BIN/controller-gen

# gen OUT: every generated file goes under OUT, laid out as in the repository
gen() {
  local out=$1
  cd "$VMPOD_ROOT"
  "$CG" object paths=./controller/api/... \
    output:object:dir="$out/controller/api/v1alpha1"
  "$CG" crd paths=./controller/api/... output:crd:dir="$out/config/crd/bases"
  "$CG" rbac:roleName=vmpod-controller paths=./controller/... output:rbac:dir="$out/config/rbac"
}

GENERATED=(controller/api/v1alpha1/zz_generated.deepcopy.go config/crd/bases config/rbac/role.yaml)

if [ "${1:-}" = --check ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  gen "$tmp"
  stale=0
  for f in "${GENERATED[@]}"; do
    diff -ru "$VMPOD_ROOT/$f" "$tmp/$f" >&2 || stale=1
  done
  [ $stale = 0 ] || die "generated files are stale: run make generate"
  log "generated files are up to date"
else
  gen "$VMPOD_ROOT"
  log "generated ${GENERATED[*]}"
fi
