#!/usr/bin/env bash
# images.sh: every image critest v1.36 pulls, plus docker.io/library/busybox:latest for the
# integration tests (and, with VMPOD_VM_GUEST, the VM-pod test guest as a containerDisk), served by a local registry (`crane registry serve`, $VMPOD_REGISTRY,
# default 127.0.0.1:5000) that containerd's hosts.toml mirrors point at.
#
# The upstream images cannot be pulled offline, so each is rebuilt to behave as critest
# expects (see the table in docs/design/300-test-bed.md). All share one base layer, the
# dynamic-busybox rootfs of hack/busybox-rootfs.sh. Layers are reproducible tars, so a
# rebuild from the same inputs gives the same digests.
#
# Built images are kept as OCI layouts in $VMPOD_CACHE/critest-images/<hash of the inputs>/;
# a warm run only pushes them (the registry keeps manifests in memory, so every registry
# start needs a push). Starts the registry if it is not running. Idempotent: does nothing
# when this registry process already has this image set.
set -euo pipefail
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

SRC=$VMPOD_ROOT/hack/critest-images
WEBSRV=$VMPOD_ROOT/integration/testbed/websrv
CRANE=$TB_CRANE_BIN/crane
[ -x "$CRANE" ] || "$VMPOD_ROOT/hack/containerd.sh" build
PATHENV='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

registry_start() {
  tb_pid registry >/dev/null && return
  local port=${TB_REGISTRY##*:}
  if [ -n "$(ss -Hltn "( sport = :$port )")" ]; then
    die "port $port is taken by a process that is not this test bed's registry: set VMPOD_REGISTRY=127.0.0.1:<free port>"
  fi
  # --disk needs an existing directory (else every blob push is a 500); manifests stay in
  # memory, so whatever an earlier registry held is gone: start from empty
  rm -rf "$TB_REGISTRY_DIR"
  mkdir -p "$TB_REGISTRY_DIR/blobs"
  tb_daemon registry "$TB_LOGS/registry.log" "$CRANE" registry serve --address "$TB_REGISTRY" --disk "$TB_REGISTRY_DIR/blobs"
  local i
  for ((i = 0; i < 100; i++)); do
    curl -fs "http://$TB_REGISTRY/v2/" >/dev/null && { log "registry up: http://$TB_REGISTRY (pid $(tb_pid registry))"; return; }
    tb_pid registry >/dev/null || break
    sleep 0.1
  done
  tail -20 "$TB_LOGS/registry.log" >&2
  die "registry did not come up on $TB_REGISTRY"
}

# ------------------------------------------------------------------------ building images

# mktar DIR TAR [--keep-owners]: a reproducible layer: sorted, mtime 0, hard links kept,
# every file owned by root unless --keep-owners
mktar() {
  local owners=(--owner=0 --group=0)
  [ "${3:-}" = --keep-owners ] && owners=()
  tar --numeric-owner "${owners[@]}" --sort=name --mtime=@0 -C "$1" -cf "$2" .
}

IMAGES=()   # every reference built, relative to the registry, in build order
BASE=e2e-test-images/busybox:1.29-2

built() { IMAGES+=("$@"); }

# derive REF LAYER [crane mutate flags...]: the busybox base, plus a layer (a directory, a
# .tar, or - for none), plus config changes
derive() {
  local ref=$1 layer=$2
  shift 2
  case $layer in
    -) "$CRANE" copy "$TB_REGISTRY/$BASE" "$TB_REGISTRY/$ref" ;;
    *.tar) "$CRANE" append -b "$TB_REGISTRY/$BASE" -f "$layer" -t "$TB_REGISTRY/$ref" ;;
    *) mktar "$layer" "$W/layer.tar"
       "$CRANE" append -b "$TB_REGISTRY/$BASE" -f "$W/layer.tar" -t "$TB_REGISTRY/$ref" ;;
  esac
  [ $# = 0 ] || "$CRANE" mutate "$TB_REGISTRY/$ref" "$@" -t "$TB_REGISTRY/$ref"
  built "$ref"
}

# marker NAME: a layer holding one empty file NAME, to make otherwise equal images differ
marker() { mkdir -p "$W/marker-$1"; : > "$W/marker-$1/$1"; echo "$W/marker-$1"; }

nginx_cmd() { # nginx_cmd PORT: the stand-in, titled like nginx's master process
  echo "/usr/sbin/nginx,-title,nginx: master process nginx -g daemon off;,-listen,:$1,-pidfile,/var/run/nginx.pid,-name,nginx"
}

build_images() {
  local rootfs=$1 L n
  mkdir -p "$W/bin"
  gcc -Os -static -o "$W/bin/pause" "$SRC/pause.c"
  gcc -Os -static -o "$W/bin/nnp" "$SRC/nnp.c"
  strip "$W/bin/pause" "$W/bin/nnp"
  (cd "$VMPOD_ROOT" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$W/bin/websrv" ./integration/testbed/websrv)

  # the base: registry.k8s.io/e2e-test-images/busybox, critest's default test container
  mktar "$rootfs" "$W/busybox.tar"
  "$CRANE" append --oci-empty-base -f "$W/busybox.tar" -t "$TB_REGISTRY/$BASE"
  "$CRANE" mutate "$TB_REGISTRY/$BASE" --set-platform linux/amd64 -e "$PATHENV" --cmd sh -t "$TB_REGISTRY/$BASE"
  built "$BASE"
  derive library/busybox:latest -        # docker.io/library/busybox:latest, for `ctr run`

  # web servers: port mapping, port forward, PID namespace and multi-container specs
  L=$W/nginx; mkdir -p "$L/usr/sbin"; cp "$W/bin/websrv" "$L/usr/sbin/nginx"
  derive e2e-test-images/nginx:1.14-2 "$L" --exposed-ports 80/tcp --cmd "$(nginx_cmd 80)"
  derive k8s-staging-cri-tools/hostnet-nginx-amd64:latest "$L" --cmd "$(nginx_cmd 12003)"
  L=$W/httpd; mkdir -p "$L/usr/local/apache2/bin"; cp "$W/bin/websrv" "$L/usr/local/apache2/bin/httpd"
  derive e2e-test-images/httpd:2.4.39-4 "$L" --exposed-ports 80/tcp \
    --cmd /usr/local/apache2/bin/httpd,-listen,:80,-name,httpd

  # nonewprivs: a setuid-root binary printing its effective uid
  L=$W/nnp; mkdir -p "$L/usr/local/bin"; install -m 4755 "$W/bin/nnp" "$L/usr/local/bin/nnp"
  derive e2e-test-images/nonewprivs:1.3 "$L" --cmd /usr/local/bin/nnp

  # pause: the sandbox image (pinned in containerd's config) on its own base, and 3.9, which
  # critest pulls under two registry names and expects to be a *different* image (a label)
  L=$W/pause; mkdir -p "$L"; cp "$W/bin/pause" "$L/pause"; mktar "$L" "$W/pause.tar"
  "$CRANE" append --oci-empty-base -f "$W/pause.tar" -t "$TB_REGISTRY/pause:3.10.2"
  "$CRANE" mutate "$TB_REGISTRY/pause:3.10.2" --set-platform linux/amd64 --entrypoint /pause \
    -u 65535:65535 -t "$TB_REGISTRY/pause:3.10.2"
  "$CRANE" mutate "$TB_REGISTRY/pause:3.10.2" --label dev.vmpod.testbed.pause-version=3.9 -t "$TB_REGISTRY/pause:3.9"
  built pause:3.10.2 pause:3.9

  # image USER handling (upstream: cri-tools images/image-user)
  local CT=k8s-staging-cri-tools
  derive $CT/test-image-user-uid:latest - -u 1002
  derive $CT/test-image-user-username:latest - -u www-data
  derive $CT/test-image-user-uid-group:latest - -u 1003:1004
  derive $CT/test-image-user-username-group:latest - -u www-data:1004
  # supplemental groups defined in the image's /etc/group (uid 1000, group 50000)
  L=$W/predefined-group; mkdir -p "$L/etc" "$L/home/default-user"
  cp "$rootfs/etc/passwd" "$rootfs/etc/group" "$L/etc/"
  echo 'default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh' >> "$L/etc/passwd"
  printf 'default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n' >> "$L/etc/group"
  chown 1000:1000 "$L/home/default-user"
  mktar "$L" "$W/predefined-group.tar" --keep-owners
  derive $CT/test-image-predefined-group:latest "$W/predefined-group.tar" -u 1000

  # image listing / tagging / pulling: each image differs from the others by a marker file
  for n in test-image-1 test-image-2 test-image-3 test-image-latest test-image-digest; do
    derive "$CT/$n:latest" "$(marker "$n")"
  done
  derive "$CT/test-image-tags:1" "$(marker same-image)"
  "$CRANE" tag "$TB_REGISTRY/$CT/test-image-tags:1" 2
  "$CRANE" tag "$TB_REGISTRY/$CT/test-image-tags:1" 3
  built "$CT/test-image-tags:2" "$CT/test-image-tags:3"
  derive "$CT/test-image-tag:test" "$(marker test)"
  derive "$CT/test-image-tag:all" "$(marker all)"
}

# save_images DIR: each built reference as its own OCI layout under DIR, listed in images.txt
save_images() {
  local dir=$1 i
  mkdir -p "$dir/oci"
  for i in "${!IMAGES[@]}"; do
    "$CRANE" pull --format oci "$TB_REGISTRY/${IMAGES[$i]}" "$dir/oci/$i"
    echo "$i ${IMAGES[$i]}" >> "$dir/images.txt"
  done
  # the layouts share most blobs (the base layer): keep one copy of each, hard-linked
  local blob
  mkdir -p "$dir/blobs"
  for blob in "$dir"/oci/*/blobs/sha256/*; do
    if [ -e "$dir/blobs/${blob##*/}" ]; then ln -f "$dir/blobs/${blob##*/}" "$blob"; else ln "$blob" "$dir/blobs/"; fi
  done
}

push_cached() {
  local dir=$1 i ref
  while read -r i ref; do
    "$CRANE" push "$dir/oci/$i" "$TB_REGISTRY/$ref" >/dev/null 2>>"$W/push.log" ||
      { cat "$W/push.log" >&2; die "push of $ref failed"; }
  done < "$dir/images.txt"
}

# push_vm_guest: the VM-pod test guest (hack/vm-guest-image.sh; VMPOD_VM_GUEST is its cache
# dir, set by make test) as a containerDisk image: its qcow2 at /disk/, owned by 107:107 as
# in KubeVirt's containerDisk images. The layer tar is kept next to the disk.
VM_GUEST_REF=vmpod-test/debian-vm:bookworm
push_vm_guest() {
  local dir=${VMPOD_VM_GUEST:-} stamp
  [ -n "$dir" ] || return 0
  [ -f "$dir/disk.qcow2" ] || die "VMPOD_VM_GUEST=$dir has no disk.qcow2"
  stamp="$(tb_pid registry) $dir"
  [ "$(cat "$TB_REGISTRY_DIR/pushed-vm-guest" 2>/dev/null)" != "$stamp" ] || return 0
  if [ ! -f "$dir/containerdisk.tar" ]; then
    local L
    L=$(mktemp -d -t vmpod-cd.XXXXXX)
    mkdir "$L/disk"
    ln "$dir/disk.qcow2" "$L/disk/disk.qcow2" 2>/dev/null || cp "$dir/disk.qcow2" "$L/disk/disk.qcow2"
    tar --numeric-owner --owner=107 --group=107 --sort=name --mtime=@0 -C "$L" -cf "$dir/containerdisk.tar.tmp" disk
    rm -rf "$L"
    mv "$dir/containerdisk.tar.tmp" "$dir/containerdisk.tar"
  fi
  "$CRANE" append --oci-empty-base -f "$dir/containerdisk.tar" -t "$TB_REGISTRY/$VM_GUEST_REF" >/dev/null 2>&1 ||
    die "push of the VM test guest failed"
  "$CRANE" mutate "$TB_REGISTRY/$VM_GUEST_REF" --set-platform linux/amd64 -t "$TB_REGISTRY/$VM_GUEST_REF" >/dev/null 2>&1 ||
    die "push of the VM test guest failed (platform)"
  echo "$stamp" > "$TB_REGISTRY_DIR/pushed-vm-guest"
  log "pushed the VM test guest as $VM_GUEST_REF ($(du -h "$dir/containerdisk.tar" | cut -f1))"
}

main() {
  need_root
  local t rootfs key cache stamp n
  t=$(now_ms)
  rootfs=$("$VMPOD_ROOT/hack/busybox-rootfs.sh")
  # everything an image is built from: a change to any of it builds a new set
  key=$( { cat "$0" "$SRC"/*.c "$WEBSRV"/*.go; echo "${rootfs##*/} $CRANE_VERSION";
           go env GOVERSION; gcc -dumpfullversion; } | sha256sum | cut -c1-16)
  cache=$VMPOD_CACHE/critest-images/$key
  mkdir -p "$TB_RUN" "$TB_LOGS"
  registry_start
  stamp="$(tb_pid registry) $key"
  push_vm_guest
  if [ "$(cat "$TB_REGISTRY_DIR/pushed" 2>/dev/null)" = "$stamp" ]; then
    log "registry already holds image set $key"
    return
  fi
  W=$(mktemp -d -t vmpod-images.XXXXXX)
  if [ -f "$cache/images.txt" ]; then
    push_cached "$cache"
    log "pushed $(wc -l < "$cache/images.txt") cached images ($cache) in $(since "$t")"
  else
    log "building images (set $key) into the registry"
    build_images "$rootfs" > "$W/build.log" 2>&1 || { tail -30 "$W/build.log" >&2; die "image build failed"; }
    save_images "$W/set" >> "$W/build.log" 2>&1 || { tail -30 "$W/build.log" >&2; die "saving images failed"; }
    mkdir -p "$VMPOD_CACHE/critest-images"
    publish "$W/set" "$cache"
    log "built and pushed ${#IMAGES[@]} images in $(since "$t"); cached in $cache"
  fi
  # every reference must resolve now, or critest fails later in a less obvious way
  while read -r _ n; do
    "$CRANE" digest "$TB_REGISTRY/$n" >/dev/null 2>&1 || die "registry does not serve $n after the push"
  done < "$cache/images.txt"
  echo "$stamp" > "$TB_REGISTRY_DIR/pushed"
}

if [ "${1:-}" = --vm-guest-ref ]; then
  echo "$VM_GUEST_REF"   # where push_vm_guest puts the VM test guest, below the registry
  exit 0
fi
W=
trap '[ -z "$W" ] || rm -rf "$W"' EXIT
main "$@"
