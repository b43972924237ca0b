#!/usr/bin/env bash
# libvirt-baseline.sh: libvirt's QEMU driver as a KubeVirt node runs it, for `make bench` to
# compare a VM pod's start time and host memory with the same guest started through libvirt
# (integration/bench/libvirt_test.go). Debian's packages, started by hand: no systemd here.
#
#   hack/libvirt-baseline.sh start   install the packages if missing, start virtlogd and the
#                                    QEMU driver's daemon, wait until `virsh version` answers,
#                                    print the client's environment: eval "$(... start)"
#   hack/libvirt-baseline.sh env     that environment again
#   hack/libvirt-baseline.sh status  exit 0 when the daemon answers, 3 when it does not
#   hack/libvirt-baseline.sh stop    destroy the domains left running, stop the daemons, remove
#                                    the run dir; exit 1 if anything had been left behind
#
# The daemons. KubeVirt's virt-launcher runs virtqemud + virtlogd in every VM pod. Debian
# bookworm's libvirt 9.0 has no modular daemons (libvirt-daemon ships libvirtd, virtlogd and
# virtlockd, no virtqemud; later Debian releases package them), so the QEMU daemon here is
# libvirtd with only the QEMU connection driver: LIBVIRT_DRIVER_DIR points at a directory
# holding just libvirt_driver_qemu.so, so the network, storage, nodedev, nwfilter, interface
# and secret drivers are never loaded (its maps show only that module). That is what
# virtqemud is: the same daemon built with one driver.
#
# Private. libvirt's privileged paths are compiled in (/etc/libvirt/qemu.conf, /run/libvirt,
# /var/{lib,log,cache}/libvirt), so both daemons run in their own mount namespace (unshare
# -m) where those five directories are bind mounts of directories under $RUN
# (/run/vmpod-libvirt): the host's libvirt config, if any, is neither read nor written. The
# client socket is $RUN/run/libvirt-sock. Every QEMU libvirt starts inherits the namespace,
# which is how stop finds what is ours (the namespace's inode is in $RUN/mntns). Mount
# points that did not exist are created on the host and removed again by stop. /etc/passwd
# and /etc/group are bind mounted too, with a libvirt-qemu user and group added: the QEMU
# driver resolves its built-in default user before it reads qemu.conf and refuses to start
# without it (libvirt-daemon-system, not installed, would create it on the host).
#
# qemu.conf is KubeVirt's (cmd/virt-launcher/qemu.conf) but for the user:
#   user/group root, dynamic_ownership 0: no qemu user exists; QEMU as root reads any test's
#     disk as is, and nothing is chowned.
#   namespaces = [], cgroup_controllers = []: as KubeVirt (the pod's cgroup and mount
#     namespace are the kubelet's). libvirt's defaults do work here (QEMU in a mount namespace
#     of its own with a private /dev, and in cgroups), but with no systemd it makes those
#     cgroups itself at the host's cgroup root, /machine in each v1 hierarchy and in the v2
#     one, outside this script's namespace, and leaves them after stop.
#   security_driver = "none": no AppArmor/SELinux confinement on this host.
#   stdio_handler = "logd": QEMU's stderr and the serial log go through virtlogd, as KubeVirt.
# libvirtd.conf: unix socket only, no auth (root only: 0700), no TCP/TLS.
#
# Times (2 busy cores): install 6s; start 8-11s, most of it libvirt probing QEMU's
# capabilities into its (private, so cold) cache, which a virt-launcher also pays per VM
# pod; stop 4-10s, libvirtd takes 4-8s to exit on SIGTERM. libvirtd logs a dmidecode error
# (no /dev/mem): harmless. Logs are copied to _output/libvirt-logs on stop.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUN=${VMPOD_LIBVIRT_RUN:-/run/vmpod-libvirt}
RUN=${RUN%/}
SOCK=$RUN/run/libvirt-sock
URI="qemu:///system?socket=$SOCK"
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
DRIVER=/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so
# host path -> its private stand-in under $RUN
MOUNTS=(/etc/libvirt:etc /run/libvirt:run /var/lib/libvirt:lib /var/log/libvirt:log /var/cache/libvirt:cache
  /etc/passwd:passwd /etc/group:group)

now_ms() { date +%s%3N; }
since() { local d=$(( $(now_ms) - $1 )); printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100)); }
need_root() { [ "$(id -u)" = 0 ] || die "needs root (libvirt's system daemons, QEMU as root)"; }

install_packages() {
  local p missing=() t
  for p in "${PACKAGES[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = 'install ok installed' ] || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  t=$(now_ms)
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  log "installed in $(since "$t")"
}

# pid_of NAME: the pid in $RUN/NAME.pid if that process is alive
pid_of() {
  local pid
  pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# ns_pids: every process in the daemons' mount namespace (the daemons and their QEMUs)
ns_pids() {
  local ns p
  ns=$(cat "$RUN/mntns" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$ns" ] && echo "${p#/proc/}"
  done
  return 0
}

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

print_env() {
  echo "export VMPOD_LIBVIRT_RUN=$RUN"
  echo "export LIBVIRT_DEFAULT_URI='$URI'"
}

write_config() {
  mkdir -p "$RUN"/{etc,run,lib,log/qemu,cache,drivers}  # log/qemu: packaged, not made by libvirtd
  chmod 700 "$RUN"
  # The QEMU driver resolves its built-in default user and group (libvirt-qemu) before it
  # reads qemu.conf, and fails when they do not exist; libvirt-daemon-system would create
  # them. Inside the namespace only: the host's passwd and group plus that user.
  cp /etc/passwd "$RUN/passwd"
  cp /etc/group "$RUN/group"
  getent passwd libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:64055:libvirt-baseline:/var/lib/libvirt:/usr/sbin/nologin' >> "$RUN/passwd"
  getent group libvirt-qemu >/dev/null || echo 'libvirt-qemu:x:64055:' >> "$RUN/group"
  ln -sf "$DRIVER" "$RUN/drivers/"
  cat > "$RUN/etc/libvirtd.conf" <<'EOC'
# written by hack/libvirt-baseline.sh
listen_tls = 0
listen_tcp = 0
unix_sock_dir = "/run/libvirt"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
host_uuid_source = "machine-id"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOC
  cat > "$RUN/etc/virtlogd.conf" <<'EOC'
# written by hack/libvirt-baseline.sh
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOC
  cat > "$RUN/etc/qemu.conf" <<'EOC'
# written by hack/libvirt-baseline.sh: KubeVirt's virt-launcher qemu.conf, QEMU as root
stdio_handler = "logd"
vnc_listen = "127.0.0.1"
vnc_tls = 0
vnc_sasl = 0
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
EOC
  # the client config inside the namespace (virsh is run outside it, with -c)
  : > "$RUN/etc/libvirt.conf"
}

cmd_start() {
  need_root
  local t m host sub created=() pid i
  t=$(now_ms)
  install_packages
  if answers; then
    log "already running ($RUN)"
    print_env
    return 0
  fi
  if [ -e "$RUN" ]; then
    log "$RUN is left from an earlier run: cleaning it first"
    cmd_stop || true
  fi
  [ -e "$DRIVER" ] || die "$DRIVER missing (libvirt-daemon-driver-qemu)"
  write_config
  for m in "${MOUNTS[@]}"; do
    host=${m%%:*}
    if [ ! -e "$host" ]; then
      mkdir -p "$host"
      created+=("$host")
    fi
  done
  printf '%s\n' "${created[@]}" > "$RUN/mountpoints"
  local script="set -e"
  for m in "${MOUNTS[@]}"; do
    host=${m%%:*} sub=${m#*:}
    script+="; mount --bind $RUN/$sub $host"
  done
  script+="; readlink /proc/self/ns/mnt > $RUN/mntns"
  script+="; virtlogd --daemon --pid-file $RUN/virtlogd.pid --config /etc/libvirt/virtlogd.conf"
  script+="; LIBVIRT_DRIVER_DIR=$RUN/drivers libvirtd --daemon --pid-file $RUN/libvirtd.pid --config /etc/libvirt/libvirtd.conf"
  # setsid: the daemons leave this session; </dev/null: they hold none of our pipes
  if ! setsid unshare --mount --propagation private -- bash -c "$script" </dev/null >"$RUN/start.log" 2>&1; then
    cat "$RUN/start.log" >&2
    cmd_stop || true
    die "the daemons did not start (output above)"
  fi
  for ((i = 0; i < 600; i++)); do
    answers && break
    if ! pid=$(pid_of libvirtd); then
      tail -20 "$RUN/log/libvirtd.log" >&2 || true
      cmd_stop || true
      die "libvirtd exited (its log above)"
    fi
    sleep 0.1
  done
  answers || { tail -20 "$RUN/log/libvirtd.log" >&2 || true; cmd_stop || true; die "libvirtd does not answer after 60s"; }
  log "libvirtd (QEMU driver only) pid $(pid_of libvirtd), virtlogd pid $(pid_of virtlogd): up in $(since "$t")"
  log "$(virsh -c "$URI" version 2>&1 | tr -s '\n' ' ')"
  print_env
}

cmd_stop() {
  need_root
  local t rc=0 doms d pid pids i host
  t=$(now_ms)
  if [ ! -d "$RUN" ]; then
    log "not running (no $RUN)"
    return 0
  fi
  if answers; then
    doms=$(virsh -c "$URI" list --all --name 2>/dev/null || true)
    for d in $doms; do
      log "LEFT: domain $d: destroying it"
      rc=1
      virsh -c "$URI" destroy "$d" >/dev/null 2>&1 || true
      virsh -c "$URI" undefine "$d" >/dev/null 2>&1 || true
    done
  fi
  for d in libvirtd virtlogd; do
    if pid=$(pid_of "$d"); then
      kill "$pid"
      for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # libvirtd takes 4-8s
    fi
  done
  pids=$(ns_pids)
  if [ -n "$pids" ]; then
    rc=1
    for pid in $pids; do
      log "LEFT: process $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-120): killing it"
      kill -9 "$pid" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do [ -z "$(ns_pids)" ] && break; sleep 0.1; done
    [ -z "$(ns_pids)" ] || { log "processes still in the namespace: $(ns_pids | tr '\n' ' ')"; rc=1; }
  fi
  if [ -d "$RUN/log" ]; then
    rm -rf "$VMPOD_OUT/libvirt-logs"
    mkdir -p "$VMPOD_OUT/libvirt-logs"
    cp -a "$RUN/log/." "$VMPOD_OUT/libvirt-logs/" 2>/dev/null || true
  fi
  if [ -f "$RUN/mountpoints" ]; then
    while read -r host; do
      [ -z "$host" ] || rmdir "$host" 2>/dev/null || { log "LEFT: $host is not empty"; rc=1; }
    done < "$RUN/mountpoints"
  fi
  rm -rf --one-file-system "$RUN"
  log "stopped in $(since "$t"); logs in $VMPOD_OUT/libvirt-logs"
  return $rc
}

cmd_status() {
  if answers; then
    log "running: libvirtd pid $(pid_of libvirtd || echo '?'), virtlogd pid $(pid_of virtlogd || echo '?'), domains: $(virsh -c "$URI" list --name 2>/dev/null | tr -s '\n' ' ')"
    return 0
  fi
  log "not running"
  return 3
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  env) print_env ;;
  status) cmd_status ;;
  *) die "usage: $0 start|stop|env|status" ;;
esac
