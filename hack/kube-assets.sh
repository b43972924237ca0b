#!/usr/bin/env bash
# kube-assets.sh: Kubernetes' binaries, built from the Go module proxy alone (setup-envtest and
# dl.k8s.io download from GCS, which is not reachable here): kube-apiserver, etcd and kubectl
# for controller-runtime's envtest, and kubelet, kube-scheduler, kube-controller-manager and
# kube-proxy for the test cluster (hack/cluster.sh). One build: they share most of their code,
# so the four node binaries add ~40% to the cold build of the first three.
#
#   hack/kube-assets.sh          # prints the assets directory on stdout
#   export KUBEBUILDER_ASSETS=$(hack/kube-assets.sh)
#
# How: `go install k8s.io/kubernetes/cmd/kube-apiserver@v` fails because k8s.io/kubernetes
# replaces its staging modules (k8s.io/api, client-go, ...) with ./staging/src paths. A
# throwaway wrapper module requires k8s.io/kubernetes and replaces each staging module with its
# published k8s.io/<name>@v0.<minor>.<patch>. k8s.io/sample-apiserver is required but not
# published in the proxy, and no binary links it, so an empty local module stands in. etcd's
# main package (go.etcd.io/etcd/server/v3) is built in the same module, at the version
# k8s.io/kubernetes pins, so it shares the compiled dependencies.
# Measured recipe: ../shared/reference/envtest-assets/REPORT.md; decision: docs/design/104-envtest.md.
#
# Cached under $VMPOD_CACHE/kube/<k8s version>/: a warm run returns at once; a cold run
# takes ~6-10 min of 2 cores (most of it compiling kube-apiserver).
# Knobs: ENVTEST_K8S_VERSION (default from lib.sh), FORCE=1 (rebuild).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

VERSION=${ENVTEST_K8S_VERSION}
DEST=$VMPOD_CACHE/kube/$VERSION
FORCE=${FORCE:-0}

BINS=(kube-apiserver kubectl kubelet kube-scheduler kube-controller-manager kube-proxy)
have_assets() {
  local b
  for b in "${BINS[@]}" etcd; do [ -x "$DEST/$b" ] || return 1; done
  [ "$("$DEST/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $VERSION" ]
}
if [ "$FORCE" != 1 ] && have_assets; then
  log "${BINS[*]} etcd $VERSION cached in $DEST"
  echo "$DEST"
  exit 0
fi

export CGO_ENABLED=0 # static binaries, like upstream's releases
STAGING_VERSION="v0${VERSION#v1}" # v1.37.1 -> v0.37.1
MINOR=$(echo "$VERSION" | cut -d. -f2)
WORK=$VMPOD_CACHE/kube/$VERSION.work # the wrapper module; Go's build cache makes a retry warm
W=$WORK/wrapper
rm -rf "$W"
mkdir -p "$W/stub/sample-apiserver" "$W/out"
echo 'module k8s.io/sample-apiserver' >"$W/stub/sample-apiserver/go.mod"
cd "$W"

log "fetching k8s.io/kubernetes@$VERSION go.mod"
KMOD=$(go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
[ -f "$KMOD" ] || die "could not download k8s.io/kubernetes@$VERSION from the module proxy"

{
  printf 'module local/vmpod-kube-assets\n\n'
  sed -n '/^go /{p;q}' "$KMOD"
  # the same GODEBUG defaults as upstream's builds
  grep -E '^godebug ' "$KMOD" | sort -u || true
  printf '\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$VERSION"
  grep -E '^[[:space:]]+k8s\.io/[a-z0-9-]+ => \./staging/' "$KMOD" | awk '{print $1}' | while read -r m; do
    case "$m" in
    k8s.io/sample-apiserver) printf '\t%s => ./stub/sample-apiserver\n' "$m" ;;
    k8s.io/sample-cli-plugin | k8s.io/sample-controller) ;; # replaced upstream, never required
    *) printf '\t%s => %s %s\n' "$m" "$m" "$STAGING_VERSION" ;;
    esac
  done
  printf ')\n'
} >go.mod

PKGS=(go.etcd.io/etcd/server/v3)
for b in "${BINS[@]}"; do PKGS+=("k8s.io/kubernetes/cmd/$b"); done
{
  printf '//go:build tools\n\npackage tools\n\nimport (\n'
  for p in "${PKGS[@]}"; do printf '\t_ "%s"\n' "$p"; done
  printf ')\n'
} >tools.go

log "go mod tidy (a cold module cache downloads ~700 MB)"
go mod tidy
log "etcd $(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3), kube-apiserver $VERSION"

LDF="-s -w"
for v in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  # /version reports these; without them the server says v0.0.0-master
  LDF+=" -X $v.gitVersion=$VERSION -X $v.gitMajor=1 -X $v.gitMinor=$MINOR -X $v.gitTreeState=clean"
done
log "go build ${PKGS[*]} (cold: ~10-14 min on 2 cores)"
go build -trimpath -ldflags "$LDF" -o "$W/out/" "${PKGS[@]}"

mkdir -p "$WORK/bin"
for b in "${BINS[@]}"; do install -m 0755 "$W/out/$b" "$WORK/bin/"; done
install -m 0755 "$W/out/server" "$WORK/bin/etcd" # `go build -o dir/` names server/v3's binary "server"
# Not `etcd --version | head -1`: under pipefail, head exiting first kills etcd with SIGPIPE
# and the script (exit 141) before the binaries are published; a cold run failed that way.
etcd_version=$("$WORK/bin/etcd" --version) || die "the etcd just built does not run: $WORK/bin/etcd --version"
log "${etcd_version%%$'\n'*}"
publish "$WORK/bin" "$DEST"
have_assets || die "built binaries in $DEST do not report $VERSION"
log "built ${BINS[*]} etcd in $DEST"
echo "$DEST"
