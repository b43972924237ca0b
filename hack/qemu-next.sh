#!/usr/bin/env bash
# qemu-next.sh: a QEMU and a virtiofsd that can migrate a virtio-fs device, beside the host's
# QEMU 7.2, which cannot (issue 12: container pods' migration, docs/design/211). QEMU >= 8.2
# carries virtiofsd's state in its migration stream (vhost-user's device state transfer),
# and the Rust virtiofsd serializes the files the guest has open (--migration-mode). Debian
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
shopt -s inherit_errexit # the index is read in a command substitution: its failures count
source "$(dirname "$0")/lib.sh"
umask 022 # QEMU runs as a uid of its own: what is unpacked must be readable by all

MIRROR=${VMPOD_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE=$VMPOD_CACHE/qemu-next
QEMU_SUITE=bookworm-backports
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data)
VIRTIOFSD_SUITE=trixie
VIRTIOFSD_PKGS=(virtiofsd libc6 libseccomp2 libcap-ng0 libgcc-s1)

mkdir -p "$BASE/index" "$BASE/debs"
# index SUITE: the path of the suite's amd64 Packages file, fetched at most once a day:
# its InRelease checked with the host's Debian keyring (gpgv), the index against the
# SHA256 the signed Release gives it. If the mirror cannot be reached, a Packages file
# fetched before serves (what it names is then cached, or the download fails).
index() {
  local suite=$1 dir=$BASE/index/$1
  if [ -n "$(find "$dir/Packages" -mmin -1440 2>/dev/null)" ]; then
    echo "$dir/Packages"
    return
  fi
  mkdir -p "$dir"
  local tmp
  tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
  if ! fetch_index "$suite" "$tmp"; then
    rm -rf "$tmp"
    [ -f "$dir/Packages" ] || die "$suite: no index (above)"
    log "$suite: using the index fetched on $(date -r "$dir/Packages" +%F)"
    echo "$dir/Packages"
    return
  fi
  mv "$tmp/Packages" "$dir/Packages"
  rm -rf "$tmp"
  echo "$dir/Packages"
}

# fetch_index SUITE DIR: DIR/Packages, checked; non-zero (and why, logged) if it cannot
fetch_index() {
  local suite=$1 tmp=$2 out want
  curl -fsSL --retry 3 -o "$tmp/InRelease" "$MIRROR/dists/$suite/InRelease" || { log "$suite: InRelease: download failed"; return 1; }
  if ! out=$(gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg --output "$tmp/Release" "$tmp/InRelease" 2>&1); then
    log "$suite: InRelease does not verify against /usr/share/keyrings/debian-archive-keyring.gpg: $out"
    return 1
  fi
  curl -fsSL --retry 3 -o "$tmp/Packages.xz" "$MIRROR/dists/$suite/main/binary-amd64/Packages.xz" || { log "$suite: Packages.xz: download failed"; return 1; }
  want=$(awk '/^SHA256:/ {on=1; next} /^[^ ]/ {on=0} on && $3 == "main/binary-amd64/Packages.xz" {print $1}' "$tmp/Release")
  if [ -z "$want" ] || [ "$(sha256sum < "$tmp/Packages.xz" | cut -d' ' -f1)" != "$want" ]; then
    log "$suite: Packages.xz does not match its signed Release"
    return 1
  fi
  xz -dc "$tmp/Packages.xz" > "$tmp/Packages"
}

# field PACKAGES NAME FIELD: FIELD of NAME's stanza (the last, should a suite list more
# than one)
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
for p in "${QEMU_PKGS[@]}"; do
  v=$(field "$qemu_index" "$p" Version)
  [ "$v" = "$qemu_version" ] || die "$p $v in $QEMU_SUITE, qemu-system-x86 $qemu_version: the suite is mid-update, try again later"
done
INSTALL=${VMPOD_QEMU_NEXT_DIR:-/usr/local/lib/vmpod/qemu-next}
OUT=$INSTALL/${qemu_version//[:~+]/_}-${virtiofsd_version//[:~+]/_}
if [ -x "$OUT/bin/qemu-system-x86_64" ] && [ -x "$OUT/bin/virtiofsd" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$INSTALL"
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
chmod 755 "$W/out" # mktemp's directory was 0700
publish "$W/out" "$OUT"
echo "$OUT"
