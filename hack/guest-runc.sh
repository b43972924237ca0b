#!/usr/bin/env bash
# guest-runc.sh: a static runc (with seccomp) for the guest initramfs. The guest has no
# libc, so everything is linked in: libseccomp from Debian's libseccomp-dev (.a) and
# glibc statically (netgo/osusergo keep glibc's NSS out of the picture).
# Cached under $VMPOD_CACHE/runc-static-<version>; prints the binary's path.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

OUT=$VMPOD_CACHE/runc-static-$RUNC_VERSION
if [ -x "$OUT/runc" ]; then
  echo "$OUT/runc"
  exit 0
fi
[ -f /usr/lib/x86_64-linux-gnu/libseccomp.a ] || die "libseccomp.a missing: run hack/install-deps.sh"
log "building static runc $RUNC_VERSION for the guest"
mkdir -p "$OUT.tmp"
GOBIN=$OUT.tmp CGO_ENABLED=1 go install \
  -tags "seccomp urfave_cli_no_docs netgo osusergo" \
  -ldflags "-s -w -X main.version=${RUNC_VERSION#v} -extldflags -static" \
  github.com/opencontainers/runc@"$RUNC_VERSION" 2> >(grep -v 'statically linked applications' >&2)
kind=$(file "$OUT.tmp/runc")
[[ $kind == *'statically linked'* ]] || die "runc is not static: $kind"
publish "$OUT.tmp" "$OUT"
log "built $OUT/runc"
echo "$OUT/runc"
