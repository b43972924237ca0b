#!/usr/bin/env bash
# guest-initrd.sh OUT: the container-pod guest's initramfs: /init is the static vmpod-agent,
# /bin/runc the static guest runc, and the few device nodes the kernel needs before the
# agent mounts devtmpfs. Nothing else: containers bring their own userland.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

OUT=${1:?usage: guest-initrd.sh OUT}
RUNC=$("$VMPOD_ROOT/hack/guest-runc.sh")
ST=$(mktemp -d)
trap 'rm -rf "$ST"' EXIT
mkdir -p "$ST"/{bin,dev,etc,proc,sys,run,tmp}
chmod 1777 "$ST/tmp"
mknod -m 600 "$ST/dev/console" c 5 1
mknod -m 666 "$ST/dev/null" c 1 3
VERSION=$(git -C "$VMPOD_ROOT" describe --always --dirty 2>/dev/null || echo dev)
(cd "$VMPOD_ROOT" && CGO_ENABLED=0 go build -trimpath \
  -ldflags "-s -w -X github.com/vmpod/vmpod/agent.Version=$VERSION" -o "$ST/init" ./cmd/vmpod-agent)
install -m 0755 "$RUNC" "$ST/bin/runc"
: > "$ST/etc/resolv.conf"
mkdir -p "$(dirname "$OUT")"
# LZ4 (legacy framing, what the kernel's RD_LZ4 reads): QEMU keeps the initramfs in memory
# for the VM's whole life, 15 MB raw vs 7 MB compressed per pod, and the kernel unpacks it
# in ~10 ms under TCG (docs/design/001-guest-image.md).
(cd "$ST" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | lz4 -l -9 -q > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
log "built $OUT ($(du -h "$OUT" | cut -f1), agent $VERSION)"
