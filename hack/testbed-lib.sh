# shellcheck shell=bash
# testbed-lib.sh: sourced by containerd.sh, images.sh, critest.sh and leakcheck.sh.
# The private containerd test bed: where its pieces live, how to find the processes it
# started, and how to tell what it left behind.
#
# Everything the test bed creates at run time lives under $VMPOD_RUN (default
# /run/vmpod-test); builds live under $VMPOD_CACHE (see lib.sh). Every process the test bed
# starts (containerd, the registry) carries VMPOD_TESTBED_RUN=$VMPOD_RUN in its environment,
# and so do the shims containerd starts and whatever they start unless they clear their
# environment: that marker is how stop and leakcheck find what belongs to this test bed
# without touching anybody else's containerd or QEMU on the same machine.

# shellcheck source=hack/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# shellcheck disable=SC2034  # variables are for the scripts that source this file
{
TB_RUN=${VMPOD_RUN:-/run/vmpod-test}
TB_RUN=${TB_RUN%/}
TB_SOCK=$TB_RUN/containerd.sock          # CRI + containerd gRPC (ttrpc: .ttrpc next to it)
TB_ROOT=$TB_RUN/root                     # containerd "root" (content, snapshots): throwaway
TB_STATE=$TB_RUN/state                   # containerd "state" (bundles, netns mounts)
TB_SHIM_SOCKETS=$TB_RUN/s                # shim sockets: short, unix socket paths max 107 bytes
TB_ETC=$TB_RUN/etc                       # generated configs
TB_LOGS=$TB_RUN/logs
TB_TMP=$TB_RUN/tmp                       # TMPDIR of containerd, the shims and their children
TB_IPAM=$TB_RUN/cni-ipam
TB_REGISTRY_DIR=$TB_RUN/registry
TB_MARKER=VMPOD_TESTBED_RUN              # env marker, value $TB_RUN

TB_REGISTRY=${VMPOD_REGISTRY:-127.0.0.1:5000}
TB_SUBNET=${VMPOD_SUBNET:-10.99.0.0/24}  # 10.88.0.0/24 is taken on these machines
TB_BRIDGE=${VMPOD_BRIDGE:-vmpod-test0}
TB_CNI_NETWORK=${VMPOD_CNI_NETWORK:-vmpod-test}
TB_SANDBOX_IMAGE=registry.k8s.io/pause:3.10.2
# Where containerd finds containerd-shim-vmpod-v2, and the vmpod config it passes the shim.
TB_SHIM_DIR=${VMPOD_SHIM_DIR:-$VMPOD_OUT/bin}
TB_VMPOD_CONFIG=${VMPOD_CONFIG:-$VMPOD_OUT/vmpod-config.toml}
TB_SHIM_BINARY=containerd-shim-vmpod-v2

# Builds, one cache directory per component and version (hack/containerd.sh build).
TB_CONTAINERD_BIN=$VMPOD_CACHE/containerd-$CONTAINERD_VERSION/bin
TB_RUNC_BIN=$VMPOD_CACHE/runc-$RUNC_VERSION/bin
TB_CNI_BIN=$VMPOD_CACHE/cni-plugins-$CNI_PLUGINS_VERSION/bin
TB_CRANE_BIN=$VMPOD_CACHE/crane-$CRANE_VERSION/bin
TB_CRI_TOOLS_BIN=$VMPOD_CACHE/cri-tools-$CRI_TOOLS_VERSION/bin
}

# The directory containerd finds containerd-shim-vmpod-v2 in: the one it was started with
# (VMPOD_SHIM_DIR may have changed since), else the configured one.
tb_shim_dir() { cat "$TB_RUN/shim.dir" 2>/dev/null || echo "$TB_SHIM_DIR"; }

# The PATH containerd runs with: its own shims first, then the vmpod shim's directory.
# (containerd resolves runtime_type io.containerd.vmpod.v2 to containerd-shim-vmpod-v2 on PATH.)
tb_containerd_path() {
  echo "$TB_CONTAINERD_BIN:$TB_RUNC_BIN:$(tb_shim_dir):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
}

# now_ms / since MS: wall-clock milliseconds, and "12.3s" since a now_ms value
now_ms() { date +%s%3N; }
since() { local d=$(( $(now_ms) - $1 )); printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100)); }

# step NAME CMD...: run one step of a script, logging its start and its duration
step() {
  local name=$1 t
  shift
  t=$(now_ms)
  log "$name"
  "$@"
  log "$name: done in $(since "$t")"
}

# prefix_lines PREFIX: prefix every line of stdin
prefix_lines() { sed "s|^|$1|"; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (containerd, CNI and mounts need it)"; }

# crictl: endpoints as flags, not only in the config file: CONTAINER_RUNTIME_ENDPOINT in the
# environment (another test bed's `env`) would win over the file, and a cluster node's
# stop once removed the pods of the wrong containerd that way
crictl() {
  "$TB_CRI_TOOLS_BIN/crictl" --config "$TB_ETC/crictl.yaml" \
    --runtime-endpoint "unix://$TB_SOCK" --image-endpoint "unix://$TB_SOCK" "$@"
}
ctr() { "$TB_CONTAINERD_BIN/ctr" --address "$TB_SOCK" "$@"; }

# tb_pid NAME: the recorded pid of a daemon the test bed started, if it is still that process
tb_pid() {
  local f=$TB_RUN/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  # the pid file alone is not proof: the pid may have been reused since
  tb_has_marker "$pid" || return 1
  echo "$pid"
}

# tb_daemon NAME LOG CMD...: start CMD in the background with the test bed's environment
# (and nothing else from ours but VMPOD_* settings), record its pid as NAME.
tb_daemon() {
  local name=$1 logfile=$2
  shift 2
  local -a vmpod_env
  mapfile -t vmpod_env < <(env | grep -E '^VMPOD_[A-Z0-9_]*=' | grep -v "^$TB_MARKER=" || true)
  mkdir -p "$TB_LOGS" "$TB_TMP"
  (cd "$TB_RUN" && exec env -i "${vmpod_env[@]}" \
      PATH="$(tb_containerd_path)" HOME="$TB_RUN" TMPDIR="$TB_TMP" LANG=C.UTF-8 \
      "$TB_MARKER=$TB_RUN" "$@" </dev/null >>"$logfile" 2>&1) &
  local pid=$! i
  echo "$pid" > "$TB_RUN/$name.pid"
  # until the subshell has exec'd, the pid is still a copy of this script, without the marker
  for ((i = 0; i < 50; i++)); do
    tb_has_marker "$pid" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  tail -20 "$logfile" >&2
  die "$name did not start (log above: $logfile)"
}

# tb_stop_daemons SECONDS NAME...: SIGTERM each, wait for all, then SIGKILL what is left;
# only the pids the test bed recorded (and still carrying its marker)
tb_stop_daemons() {
  local wait_s=$1 name pid i
  shift
  local -A pids=()
  for name in "$@"; do
    if pid=$(tb_pid "$name"); then
      pids[$name]=$pid
      kill -TERM "$pid" 2>/dev/null || true
    fi
    rm -f "$TB_RUN/$name.pid"
  done
  for ((i = 0; i < wait_s * 10; i++)); do
    for name in "${!pids[@]}"; do
      kill -0 "${pids[$name]}" 2>/dev/null || unset "pids[$name]"
    done
    [ ${#pids[@]} = 0 ] && return
    sleep 0.1
  done
  for name in "${!pids[@]}"; do
    log "$name (pid ${pids[$name]}) ignored SIGTERM for ${wait_s}s: SIGKILL"
    kill -KILL "${pids[$name]}" 2>/dev/null || true
  done
}

# tb_marked_pids: every process that carries this test bed's environment marker
tb_marked_pids() {
  # environ is NUL-separated: -z makes each variable a line, -x matches it whole
  grep -lzxF "$TB_MARKER=$TB_RUN" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}

# tb_container_pids: processes whose root filesystem is an overlay of this test bed's
# snapshotter, i.e. container processes of a runtime that runs them on the host (runc).
# They do not carry the marker (their environment is the image's) and, once their shim is
# gone, nothing else leads to them.
tb_container_pids() {
  # mountinfo: "ID PARENT MAJ:MIN ROOT MOUNTPOINT ... - FSTYPE SOURCE OPTIONS"; literal match
  awk -v root="$TB_ROOT/" '$5 == "/" && index($0, " - overlay ") && index($0, root) {
      split(FILENAME, p, "/"); print p[3]; nextfile }' /proc/[0-9]*/mountinfo 2>/dev/null || true
}

# tb_sandbox_ids: pods the CRI plugin still keeps state for (RemovePodSandbox deletes it)
tb_sandbox_ids() {
  local d
  for d in "$TB_ROOT" "$TB_STATE"; do
    [ -d "$d/io.containerd.grpc.v1.cri/sandboxes" ] && ls "$d/io.containerd.grpc.v1.cri/sandboxes"
  done | sort -u
}

# tb_has_marker PID
tb_has_marker() { grep -qzxF "$TB_MARKER=$TB_RUN" "/proc/$1/environ" 2>/dev/null; }

# tb_mounts_under DIR: mount points below DIR, deepest first
tb_mounts_under() {
  local dir=$1
  # field 5 of mountinfo is the mount point (with \040 for spaces)
  awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r | uniq
}

# tb_virtiofsd_aliases: binds of this test bed's VMs' shared dirs in /run/vmpod-virtiofsd
# (runtime/vmm.VirtiofsdRoot, docs/design/025), outside the run dir: the path a virtiofsd
# in a user namespace is given. Told apart from other runs' by the bind's source (the
# mountinfo root field: the shared dir's path, relative to /run if that is a filesystem).
tb_virtiofsd_aliases() {
  awk -v a="$TB_RUN/" -v b="${TB_RUN#/run}/" 'index($5, "/run/vmpod-virtiofsd/") == 1 &&
    split($5, p, "/") == 4 && (index($4, a) == 1 || index($4, b) == 1) { print $5 }' \
    /proc/self/mountinfo | sort -u
}

# tb_fstype MOUNTPOINT: the filesystem type mounted there (the field after " - " in mountinfo)
tb_fstype() {
  awk -v m="$1" '$5 == m { for (i = 7; i <= NF; i++) if ($i == "-") { print $(i + 1); exit } }' /proc/self/mountinfo
}

# tb_leaks [--expect-bridge]: print one line per thing the test bed left on the host,
# nothing if clean. Called by `containerd.sh stop` (after its teardown, before it deletes
# the bridge: --expect-bridge) and by leakcheck.sh.
# shellcheck disable=SC2120  # the argument is optional
tb_leaks() {
  local pid comm args f m rules expect_bridge=0
  [ "${1:-}" != --expect-bridge ] || expect_bridge=1
  # 1. processes: ours by marker, or a vmpod shim / QEMU / virtiofsd naming our run dir
  #    (in case a shim gave its children a clean environment)
  for pid in $(tb_marked_pids); do
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
    args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-160)
    echo "process: pid $pid ($comm): $args"
  done
  for pid in $(tb_container_pids); do
    tb_has_marker "$pid" && continue
    args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)
    echo "process: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) is a container process on this test bed's rootfs: $args"
  done
  for pid in $(pgrep -f "^[^ ]*(containerd-shim-vmpod-v2|vmpod-pid-proxy|qemu-system-[a-z0-9_]+|virtiofsd)( |$)" || true); do
    [ -r "/proc/$pid/cmdline" ] || continue
    args=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)
    case "$args" in
      *"$TB_RUN/"*)
        tb_has_marker "$pid" && continue   # listed above
        echo "process: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)): $(echo "$args" | cut -c1-160)" ;;
    esac
  done
  # 2. mounts under the run dir: rootfs overlays, shm, netns (nsfs) of pods never torn down
  for m in $(tb_mounts_under "$TB_RUN"); do
    echo "mount: $m ($(tb_fstype "$m"))"
    if [ "$(tb_fstype "$m")" = nsfs ]; then
      # a leaked pod network namespace: show its interfaces (the VM's tap, the pod's veth)
      nsenter --net="$m" ip -br link 2>/dev/null | prefix_lines "  in that netns: "
    fi
  done
  for m in $(tb_virtiofsd_aliases); do
    echo "mount: $m (a VM's shared dir, bound for its virtiofsd)"
  done
  # 3. network: our bridge (the CNI plugin never deletes it: stop does, so it counts only
  #    after stop), veths still on it, CNI state of our network
  if ip link show "$TB_BRIDGE" >/dev/null 2>&1; then
    [ "$expect_bridge" = 1 ] || echo "link: bridge $TB_BRIDGE still exists"
    ip -br link show master "$TB_BRIDGE" 2>/dev/null | prefix_lines "link: on the bridge: "
  fi
  for f in /var/lib/cni/results/"$TB_CNI_NETWORK"-*; do
    [ -e "$f" ] && echo "cni: cached result of a pod never deleted: $f"
  done
  for f in $(tb_sandbox_ids); do
    echo "sandbox: pod $f was never removed"
    [ -e "/var/lib/cni/results/cni-loopback-$f-lo" ] && echo "cni: cached result of a pod never deleted: /var/lib/cni/results/cni-loopback-$f-lo"
  done
  if [ -d "$TB_IPAM/$TB_CNI_NETWORK" ]; then
    for f in "$TB_IPAM/$TB_CNI_NETWORK"/*; do
      case "${f##*/}" in '*' | lock | last_reserved_ip.*) continue ;; esac
      echo "cni: IP still reserved: ${f##*/} ($(head -c 80 "$f" 2>/dev/null | tr '\n\r' '  '))"
    done
  fi
  # portmap's per-pod rules carry the network name in their comments
  rules=$(iptables-save -t nat 2>/dev/null | grep -F "$(tb_nat_comment)" || true)
  [ -z "$rules" ] || prefix_lines "iptables: per-pod rule left: " <<< "$rules"
  # 4. files: temp dirs of containerd/shims/QEMU, task bundles, shim sockets
  if [ -d "$TB_TMP" ]; then
    find "$TB_TMP" -mindepth 1 -maxdepth 1 -printf '%f\n' | prefix_lines "tmp: left in $TB_TMP: "
  fi
  for f in "$TB_STATE"/io.containerd.runtime.v2.task/*/*; do
    [ -e "$f" ] && echo "bundle: task state left: $f"
  done
  for f in "$TB_SHIM_SOCKETS"/*; do
    [ -e "$f" ] && echo "socket: shim socket left: $f"
  done
  return 0
}

# tb_force_clean: remove what tb_leaks finds, once containerd is down. Only processes
# carrying our marker, and container processes on our rootfs, are killed.
tb_force_clean() {
  local pid m ns id
  # containers first, through the runc that made them (also removes their cgroups)
  for ns in "$TB_RUN"/runc/*/; do
    [ -d "$ns" ] || continue
    for id in $("$TB_RUNC_BIN/runc" --root "$ns" list -q 2>/dev/null); do
      "$TB_RUNC_BIN/runc" --root "$ns" delete -f "$id" 2>/dev/null || true
    done
  done
  for pid in $(tb_marked_pids) $(tb_container_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in $(tb_marked_pids) $(tb_container_pids); do
    # wait for the kill to land before unmounting what the process held
    timeout 5 tail --pid="$pid" -f /dev/null 2>/dev/null || true
  done
  for m in $(tb_mounts_under "$TB_RUN"); do umount -l "$m" 2>/dev/null || true; done
  for m in $(tb_virtiofsd_aliases); do umount -l "$m" 2>/dev/null && rmdir "$m" 2>/dev/null || true; done
  ip link del "$TB_BRIDGE" 2>/dev/null || true
  rm -f /var/lib/cni/results/"$TB_CNI_NETWORK"-*
  for id in $(tb_sandbox_ids); do rm -f "/var/lib/cni/results/cni-loopback-$id-lo"; done
  find "$TB_IPAM/$TB_CNI_NETWORK" -maxdepth 1 -type f ! -name lock ! -name 'last_reserved_ip.*' -delete 2>/dev/null || true
  tb_delete_pod_nat_rules
  # containerd is down: its leftovers are plain files now
  rm -rf --one-file-system "${TB_TMP:?}"/* "${TB_STATE:?}"/io.containerd.runtime.v2.task/*/* \
    "${TB_SHIM_SOCKETS:?}"/* "${TB_ROOT:?}"/io.containerd.grpc.v1.cri/sandboxes/* \
    "$TB_STATE"/io.containerd.grpc.v1.cri/sandboxes/* 2>/dev/null || true
}

# tb_nat_comment: how portmap's rules for our network show in iptables-save / iptables -S
tb_nat_comment() { printf 'name: \\"%s\\"' "$TB_CNI_NETWORK"; }

# tb_delete_pod_nat_rules: delete the portmap rules that carry our network's name (the
# jumps to each pod's chain; the comment names the pod), by rule number, then the per-pod
# chains they jumped to, once nothing else jumps there. Other CNI users' rules are not touched.
tb_delete_pod_nat_rules() {
  local pat chains targets chain line n nums
  pat=$(tb_nat_comment)
  chains=$(iptables-save -t nat 2>/dev/null | grep -F "$pat" | awk '{ print $2 }' | sort -u || true)
  targets=$(iptables-save -t nat 2>/dev/null | grep -F "$pat" | grep -oE -- '-j CNI-(DN|SN)-[0-9a-f]+' | cut -c4- | sort -u || true)
  for chain in $chains; do
    n=0
    nums=()
    while IFS= read -r line; do
      [[ $line == -A* ]] || continue
      n=$((n + 1))
      [[ $line == *"$pat"* ]] && nums=("$n" "${nums[@]}")   # highest first: numbers stay valid
    done < <(iptables -t nat -S "$chain")
    for n in "${nums[@]}"; do iptables -t nat -D "$chain" "$n"; done
  done
  local rules
  rules=$(iptables-save -t nat)   # once, whole: `iptables-save | grep -q` is false when grep's early exit SIGPIPEs it
  for chain in $targets; do
    grep -qE -- "-j $chain( |$)" <<<"$rules" && continue
    iptables -t nat -F "$chain" && iptables -t nat -X "$chain"
  done
}
