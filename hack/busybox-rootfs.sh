#!/usr/bin/env bash
# busybox-rootfs.sh: a small container rootfs from Debian's *dynamic* busybox, for the
# integration tests and as the base layer of the critest images.
#
# Dynamic, not busybox-static: the static build runs applets in-process from `sh`, so a
# masked /bin/ls would never fail with EACCES (critest's MaskedPaths spec). Applets are hard
# links for the same reason (masking a symlink would mask /bin/busybox itself).
# Debian's busybox has no pgrep or ipcs applets; critest execs both, so small scripts stand in.
#
# Cached under $VMPOD_CACHE/rootfs/busybox-<package version>-<script hash>; prints the
# rootfs directory on stdout.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

VERSION=$(apt-cache policy busybox | sed -n 's/^ *Candidate: //p')
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "apt knows no busybox package: run apt-get update"
KEY=$(echo "$VERSION-$(hash_of "$0")" | tr ':+~' '___')
OUT=$VMPOD_CACHE/rootfs/busybox-$KEY
if [ -x "$OUT/bin/busybox" ]; then
  log "cached: $OUT"
  echo "$OUT"
  exit 0
fi

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
log "building busybox rootfs from busybox $VERSION"
mkdir -m 777 "$W/deb"
(cd "$W/deb" && apt-get download -qq "busybox=$VERSION" >/dev/null)
dpkg-deb -x "$W"/deb/busybox_*.deb "$W/x"

R=$W/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,etc,root,tmp,var/run,var/www,home,proc,sys,dev,run}
chmod 1777 "$R/tmp"
cp "$W/x/bin/busybox" "$R/bin/busybox"
for lib in $(ldd "$R/bin/busybox" | grep -o '/[^ ]*'); do
  mkdir -p "$R$(dirname "$lib")"
  cp -L "$lib" "$R$lib"
done
for a in $("$R/bin/busybox" --list); do
  [ "$a" = busybox ] || ln "$R/bin/busybox" "$R/bin/$a"
done

cat > "$R/bin/pgrep" <<'EOF'
#!/bin/sh
# pgrep stand-in: match process names (comm) against $1
rc=1
for d in /proc/[0-9]*; do
  c=$(cat "$d/comm" 2>/dev/null) || continue
  case "$c" in *"$1"*) echo "${d#/proc/}"; rc=0;; esac
done
exit $rc
EOF
cat > "$R/bin/ipcs" <<'EOF'
#!/bin/sh
# ipcs stand-in: the raw /proc/sysvipc tables
case "$1" in
  -m) cat /proc/sysvipc/shm ;;
  -q) cat /proc/sysvipc/msg ;;
  -s) cat /proc/sysvipc/sem ;;
  *)  cat /proc/sysvipc/shm /proc/sysvipc/msg /proc/sysvipc/sem ;;
esac
EOF
chmod 755 "$R/bin/pgrep" "$R/bin/ipcs"

printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'daemon:x:1:1:daemon:/usr/sbin:/bin/false' \
  'bin:x:2:2:bin:/bin:/bin/false' 'sys:x:3:3:sys:/dev:/bin/false' \
  'mail:x:8:8:mail:/var/spool/mail:/bin/false' 'www-data:x:33:33:www-data:/var/www:/bin/false' \
  'nobody:x:65534:65534:nobody:/home:/bin/false' > "$R/etc/passwd"
printf '%s\n' root:x:0: daemon:x:1: bin:x:2: sys:x:3: adm:x:4: tty:x:5: disk:x:6: mail:x:8: \
  wheel:x:10:root www-data:x:33: staff:x:50: users:x:100: nogroup:x:65534: > "$R/etc/group"

mkdir -p "$(dirname "$OUT")"
publish "$R" "$OUT"
log "built $OUT"
echo "$OUT"
