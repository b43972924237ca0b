#!/usr/bin/env bash
# qemu-next.sh: a QEMU and a virtiofsd that can migrate a virtio-fs device, beside the host's
# QEMU 7.2, which cannot (issue 12: container pods' migration, docs/design/211). QEMU >= 8.2
# carries virtiofsd's state in its migration stream (vhost-user's device state transfer),
# and virtiofsd >= 1.11 serializes the files the guest has open (--migration-mode). Debian
# ships both, newer than bookworm's: QEMU from bookworm-backports, built against bookworm's
# libraries, and virtiofsd from trixie, which needs trixie's C library and runs through
# trixie's dynamic loader with trixie's libraries (the wrapper bin/virtiofsd). Unpacked
# from their .debs, not installed: the host's QEMU stays the test bed's. Each package is
# checked against the suite's signed index (its SHA256); the newest version of each is
# taken and names the directory, /usr/local/lib/vmpod/qemu-next/<qemu>-<virtiofsd> (not
# under $VMPOD_CACHE: QEMU runs as a uid of its own, which must be able to execute it),
# which this prints, holding bin/qemu-system-x86_64 and bin/virtiofsd. The .debs and the
# suites' indexes are kept under $VMPOD_CACHE/qemu-next.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

MIRROR=${VMPOD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=$VMPOD_CACHE/qemu-next
QEMU_SUITE=bookworm-backports
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)
VIRTIOFSD_SUITE=trixie
VIRTIOFSD_PKGS=(virtiofsd libc6 libseccomp2 libcap-ng0 libgcc-s1)

mkdir -p "$BASE/index" "$BASE/debs"
# index SUITE: the suite's amd64 Packages file, fetched at most once a day; its path.
# The suite's InRelease is checked with the host's Debian keyring (gpgv), and the index
# against the SHA256 InRelease gives it.
index() {
  local suite=$1 dir=$BASE/index/$1
  if [ -z "$(find "$dir/Packages" -mmin -1440 2>/dev/null)" ]; then
    mkdir -p "$dir"
    curl -fsSL --retry 3 -o "$dir/InRelease" "$MIRROR/dists/$suite/InRelease" || die "$suite: InRelease"
    gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg "$dir/InRelease" 2>/dev/null ||
      die "$suite: InRelease does not verify against /usr/share/keyrings/debian-archive-keyring.gpg"
    curl -fsSL --retry 3 -o "$dir/Packages.xz" "$MIRROR/dists/$suite/main/binary-amd64/Packages.xz" || die "$suite: Packages.xz"
    local want
    want=$(awk '/^SHA256:/ {on=1; next} /^[^ ]/ {on=0} on && $3 == "main/binary-amd64/Packages.xz" {print $1}' "$dir/InRelease")
    [ -n "$want" ] && [ "$(sha256sum < "$dir/Packages.xz" | cut -d' ' -f1)" = "$want" ] ||
      die "$suite: Packages.xz does not match its InRelease"
    xz -dc "$dir/Packages.xz" > "$dir/Packages"
  fi
  echo "$dir/Packages"
}

# field PACKAGES NAME FIELD: FIELD of the newest stanza of NAME (a suite lists one per
# package; backports may list several)
field() {
  awk -v pkg="$2" -v f="$3" 'BEGIN {RS=""; FS="\n"}
    { name=""; val=""
      for (i = 1; i <= NF; i++) {
        if ($i ~ "^Package: ") name = substr($i, 10)
        if (index($i, f ": ") == 1) val = substr($i, length(f) + 3)
      }
      if (name == pkg) last = val }
    END { print last }' "$1"
}

qemu_index=$(index $QEMU_SUITE)
virtiofsd_index=$(index $VIRTIOFSD_SUITE)
qemu_version=$(field "$qemu_index" qemu-system-x86 Version)
virtiofsd_version=$(field "$virtiofsd_index" virtiofsd Version)
[ -n "$qemu_version" ] && [ -n "$virtiofsd_version" ] || die "no qemu-system-x86 in $QEMU_SUITE or no virtiofsd in $VIRTIOFSD_SUITE"
INSTALL=${VMPOD_QEMU_NEXT_DIR:-/usr/local/lib/vmpod/qemu-next}
OUT=$INSTALL/${qemu_version//[:~+]/_}-${virtiofsd_version//[:~+]/_}
if [ -x "$OUT/bin/qemu-system-x86_64" ] && [ -x "$OUT/bin/virtiofsd" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$INSTALL"
chmod 755 "$INSTALL" "$(dirname "$INSTALL")"
W=$(mktemp -d "$INSTALL/.build.XXXXXX")
trap 'rm -rf "$W"' EXIT
# fetch INDEX PACKAGE DEST: the package's .deb, checked, unpacked into DEST
fetch() {
  local file sum deb
  file=$(field "$1" "$2" Filename)
  sum=$(field "$1" "$2" SHA256)
  [ -n "$file" ] && [ -n "$sum" ] || die "$2: not in $1"
  deb=$BASE/debs/$(basename "$file")
  if [ ! -f "$deb" ] || [ "$(sha256sum < "$deb" | cut -d' ' -f1)" != "$sum" ]; then
    curl -fsSL --retry 3 -o "$deb.part" "$MIRROR/$file" || die "$2: download $file"
    [ "$(sha256sum < "$deb.part" | cut -d' ' -f1)" = "$sum" ] || die "$2: $file does not match its index"
    mv "$deb.part" "$deb"
  fi
  dpkg-deb -x "$deb" "$3"
}
log "QEMU $qemu_version ($QEMU_SUITE), virtiofsd $virtiofsd_version ($VIRTIOFSD_SUITE)"
for p in "${QEMU_PKGS[@]}"; do fetch "$qemu_index" "$p" "$W/qemu"; done
for p in "${VIRTIOFSD_PKGS[@]}"; do fetch "$virtiofsd_index" "$p" "$W/virtiofsd"; done

mkdir -p "$W/out/bin"
mv "$W/qemu" "$W/out/qemu"
mv "$W/virtiofsd" "$W/out/virtiofsd"
ln -s ../qemu/usr/bin/qemu-system-x86_64 "$W/out/bin/qemu-system-x86_64"
# bookworm's libraries serve QEMU (the .deb's dependencies are bookworm's; checked here)
libs=$(ldd "$W/out/qemu/usr/bin/qemu-system-x86_64")
if grep 'not found' <<< "$libs" >&2; then
  die "QEMU $qemu_version needs libraries this host lacks (hack/install-deps.sh installs QEMU 7.2's, which cover it)"
fi
# virtiofsd through trixie's loader and libraries; the path is resolved when the wrapper
# runs, so the published directory can be moved
cat > "$W/out/bin/virtiofsd" <<'EOF'
#!/bin/sh
# trixie's virtiofsd with trixie's C library (hack/qemu-next.sh)
d=$(dirname "$(readlink -f "$0")")/../virtiofsd
exec "$d/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$d/usr/lib/x86_64-linux-gnu" "$d/usr/libexec/virtiofsd" "$@"
EOF
chmod +x "$W/out/bin/virtiofsd"
version=$("$W/out/bin/qemu-system-x86_64" --version)
echo "${version%%$'\n'*}" >&2
"$W/out/bin/virtiofsd" --version >&2
chmod 755 "$W/out"
publish "$W/out" "$OUT"
echo "$OUT"
