#!/usr/bin/env bash
# gvisor.sh: gVisor's runsc and its containerd shim (containerd-shim-runsc-v1), the third
# peer of make bench's CRI table. Debian ships runsc without a containerd shim, and
# containerd's runc shim with BinaryName=runsc cannot start a pod sandbox ("cannot run with
# network enabled in root network namespace"): gVisor's own shim runs runsc in the pod's
# network namespace. Both are built from the gvisor.dev/gvisor module (gVisor's "go"
# branch, published through the Go proxy) at GVISOR_VERSION; cached under
# $VMPOD_CACHE/gvisor-<version>-oom0; prints that directory.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

OUT=$VMPOD_CACHE/gvisor-$GVISOR_VERSION-oom0  # -oom0: the patch below
if [ -x "$OUT/runsc" ] && [ -x "$OUT/containerd-shim-runsc-v1" ]; then
  echo "$OUT"
  exit 0
fi
t0=$(date +%s)
log "building gVisor $GVISOR_VERSION: runsc and containerd-shim-runsc-v1 (a few minutes)"
rm -rf "$OUT.tmp" "$OUT.src" && mkdir -p "$OUT.tmp"
trap 'rm -rf "$OUT.tmp" "$OUT.src"' EXIT
# One change to gVisor's source: its shim sets its own OOM score to -999, which needs
# CAP_SYS_RESOURCE (this test bed's containerd runs without it, as restrict_oom_score_adj
# in containerd.sh says); patched, the shim keeps the score containerd gives it, as
# containerd's runc shim nearly does (its parent's + 1). Nothing the bench measures
# depends on it.
# (from outside the repository: the download must not touch vmpod's go.sum)
src=$(cd "$VMPOD_CACHE" && GOFLAGS=-mod=mod go mod download -json gvisor.dev/gvisor@"$GVISOR_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
[ -d "$src" ] || die "gvisor.dev/gvisor@$GVISOR_VERSION: not downloaded"
cp -r "$src" "$OUT.src" && chmod -R u+w "$OUT.src"
grep -q 'oomScoreMax = -999' "$OUT.src/pkg/shim/v1/manager.go" || die "gVisor's shim no longer sets oomScoreMax = -999: revisit the patch"
sed -i 's/oomScoreMax = -999/oomScoreMax = 0/' "$OUT.src/pkg/shim/v1/manager.go"
(cd "$OUT.src" && CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT.tmp/runsc" ./runsc &&
  CGO_ENABLED=0 go build -ldflags "-s -w" -o "$OUT.tmp/shim" ./shim)
mv "$OUT.tmp/shim" "$OUT.tmp/containerd-shim-runsc-v1"
"$OUT.tmp/runsc" --version >&2
publish "$OUT.tmp" "$OUT"
log "built $OUT in $(( $(date +%s) - t0 ))s"
echo "$OUT"
