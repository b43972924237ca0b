#!/usr/bin/env bash
# guest-kernel.sh: build the vmpod guest kernel (an uncompressed vmlinux with a PVH entry,
# which QEMU boots directly on both microvm and q35) from Debian's linux-source-6.1 with
# hack/guest/kernel.fragment merged onto `make tinyconfig`.
#
# Cached under $VMPOD_CACHE/kernel/<hash of fragment + source version + this script>;
# the unpacked source tree is kept in $VMPOD_CACHE/kbuild so a fragment change rebuilds
# incrementally. Prints the cache directory (vmlinux, config) on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FRAGMENT=$VMPOD_ROOT/hack/guest/kernel.fragment
SRC_TAR=/usr/src/linux-source-6.1.tar.xz
[ -f "$SRC_TAR" ] || die "$SRC_TAR missing: run hack/install-deps.sh"
SRC_VERSION=$(dpkg-query -W -f='${Version}' linux-source-6.1)
KEY=$( (cat "$FRAGMENT" "$0"; echo "$SRC_VERSION") | sha256sum | cut -c1-16)
OUT=$VMPOD_CACHE/kernel/$KEY

if [ -f "$OUT/vmlinux" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

KB=$VMPOD_CACHE/kbuild/linux-source-6.1-$SRC_VERSION
if [ ! -f "$KB/Makefile" ]; then
  log "unpacking $SRC_TAR ($SRC_VERSION)"
  rm -rf "$KB.tmp"; mkdir -p "$KB.tmp"
  tar -xf "$SRC_TAR" -C "$KB.tmp" --strip-components=1
  publish "$KB.tmp" "$KB"
fi

cd "$KB"
log "configuring: tinyconfig + $(basename "$FRAGMENT")"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >/dev/null
make -s olddefconfig >/dev/null

# Every option the fragment asks for must survive olddefconfig: a silently dropped
# option (a missing dependency) is a guest that fails in some distant way later.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=n) opt=${line%%=*}; want="not set" ;;
    CONFIG_*=*) opt=${line%%=*}; want=$line ;;
    "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; want="not set" ;;
    *) continue ;;
  esac
  if [ "$want" = "not set" ]; then
    grep -q "^$opt=" .config && { log "fragment: $opt should be unset but is $(grep "^$opt=" .config)"; bad=1; }
  else
    grep -qxF "$want" .config || { log "fragment: $want did not survive ($(grep "^$opt=" .config || echo unset))"; bad=1; }
  fi
done < "$FRAGMENT"
[ $bad = 0 ] || die "kernel config does not match $FRAGMENT"

log "building vmlinux with -j$(nproc) (12 minutes measured on 2 cores, cold)"
make -s -j"$(nproc)" vmlinux >"$KB/build.log" 2>&1 || { tail -30 "$KB/build.log" >&2; die "kernel build failed"; }

mkdir -p "$OUT.tmp"
cp vmlinux "$OUT.tmp/vmlinux"
cp .config "$OUT.tmp/config"
# --no-print-directory: under another make (make cold-test) the "Entering directory" lines
# would land in the file
make -s --no-print-directory kernelrelease > "$OUT.tmp/release"
[[ $(cat "$OUT.tmp/release") =~ ^[0-9][^[:space:]]*$ ]] || die "kernelrelease printed $(cat "$OUT.tmp/release")"
publish "$OUT.tmp" "$OUT"
log "built $(cat "$OUT/release"): $OUT"
echo "$OUT"
