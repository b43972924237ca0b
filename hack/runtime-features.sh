#!/usr/bin/env bash
# runtime-features.sh: shim/manager/runc-features.json, the guest runc's `runc features`,
# which the shim reports (adjusted for the VM) to containerd's runtime introspection.
#   hack/runtime-features.sh          regenerate
#   hack/runtime-features.sh --check  fail if the committed file is stale
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$VMPOD_ROOT/shim/manager/runc-features.json
RUNC=$("$VMPOD_ROOT/hack/guest-runc.sh")
tmp=$(mktemp); trap 'rm -f "$tmp"' EXIT
"$RUNC" features > "$tmp"
if [ "${1:-}" = --check ]; then
  cmp -s "$tmp" "$OUT" || die "shim/manager/runc-features.json is stale: run hack/runtime-features.sh"
  log "runtime features up to date"
else
  mv "$tmp" "$OUT"
  log "wrote $OUT"
fi
