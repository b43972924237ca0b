#!/usr/bin/env bash
# containerd.sh: a private containerd with the runc and vmpod runtimes, for critest and the
# integration tests. It shares nothing with a containerd the host may run: own root, state,
# sockets, CNI network and registry mirror, all under $VMPOD_RUN (default /run/vmpod-test).
#
#   hack/containerd.sh build    build containerd+ctr+runc shim, runc, CNI plugins, crane,
#                               crictl, critest into $VMPOD_CACHE/<name>-<version>/ (cached)
#   hack/containerd.sh config   write containerd, CNI, registry-mirror and crictl configs
#   hack/containerd.sh start    config + registry with the critest images + containerd; waits
#                               until CRI reports RuntimeReady and NetworkReady
#   hack/containerd.sh start-fresh
#                               start, after cleaning whatever an earlier, interrupted run
#                               left (listed first); what CI uses, since it owns the test bed
#   hack/containerd.sh stop     remove pods and containers, stop containerd and the registry,
#                               undo host changes; fails if anything had leaked
#   hack/containerd.sh status   what is running (exit 0 when containerd answers, 3 when not)
#   hack/containerd.sh env      shell exports for clients: eval "$(hack/containerd.sh env)"
#   hack/containerd.sh clean    force removal of everything this test bed left (kills only
#                               processes carrying its marker)
#
# Settings (environment): VMPOD_RUN, VMPOD_CACHE, VMPOD_SHIM_DIR (where
# containerd-shim-vmpod-v2 is; default _output/bin), VMPOD_CONFIG (the vmpod config.toml
# passed to the shim as ConfigPath; default _output/vmpod-config.toml), VMPOD_REGISTRY,
# VMPOD_SUBNET, VMPOD_BRIDGE, VMPOD_KEEP_LEAKS=1 (stop reports leaks but leaves them for
# inspection). containerd and the shims get VMPOD_* variables and nothing else of ours.
# For a node of the test cluster (hack/cluster.sh runs this script inside the node's
# network namespace): VMPOD_REGISTRY_EXTERNAL=1 (the registry is the cluster's: use it,
# start none), VMPOD_POD_ROUTES (CIDRs, comma-separated, that pods route through the
# bridge: services, other nodes' pods; by default pods reach only their own subnet) and
# VMPOD_CONTAINERD_IMPORT (the vmpod drop-in runtimeclass/install-node.sh wrote, imported
# instead of the built-in stanza).
set -euo pipefail
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

# ---------------------------------------------------------------------------------- build

# ensure_built NAME VERSION BUILDER BINARY...: $VMPOD_CACHE/NAME-VERSION/bin/BINARY... exist,
# or BUILDER OUTDIR builds them there (its output goes to OUTDIR/build.log).
ensure_built() {
  local name=$1 version=$2 builder=$3
  shift 3
  local dir=$VMPOD_CACHE/$name-$version b missing=()
  for b in "$@"; do [ -x "$dir/bin/$b" ] || missing+=("$b"); done
  if [ ${#missing[@]} = 0 ]; then
    log "$name $version: cached in $dir"
    return
  fi
  local tmp=$dir.build.$$ t
  t=$(now_ms)
  BUILD_TMP=$tmp
  rm -rf "$tmp"
  mkdir -p "$tmp/bin"
  log "$name $version: building ($(printf '%s ' "$@"))"
  if ! "$builder" "$tmp" > "$tmp/build.log" 2>&1; then
    tail -40 "$tmp/build.log" >&2
    die "$name $version: build failed (log above)"
  fi
  for b in "$@"; do [ -x "$tmp/bin/$b" ] || die "$name $version: $b missing after the build"; done
  { echo "built $(date -u +%FT%TZ) in $(since "$t") with $(go env GOVERSION)"; } > "$tmp/BUILDINFO"
  mkdir -p "$VMPOD_CACHE"
  publish "$tmp" "$dir"
  BUILD_TMP=
  log "$name $version: built in $(since "$t") -> $dir"
}

# Builders run with the cwd outside any module: `go install pkg@version` must not see ours.
# nice: these machines are shared and have 2 cores.
gobuild() { (cd / && nice -n 10 go "$@"); }

build_containerd() {
  GOBIN=$1/bin CGO_ENABLED=1 gobuild install \
    -ldflags "-X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION#v}" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION"
}

build_runc() {
  # seccomp needs cgo and libseccomp-dev; urfave_cli_no_docs drops the man-page generator
  GOBIN=$1/bin CGO_ENABLED=1 gobuild install -tags "seccomp urfave_cli_no_docs" \
    -ldflags "-X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
}

build_cni_plugins() {
  local m=github.com/containernetworking/plugins/plugins
  GOBIN=$1/bin CGO_ENABLED=0 gobuild install \
    "$m/main/bridge@$CNI_PLUGINS_VERSION" "$m/main/loopback@$CNI_PLUGINS_VERSION" \
    "$m/ipam/host-local@$CNI_PLUGINS_VERSION" "$m/meta/portmap@$CNI_PLUGINS_VERSION"
}

build_crane() {
  GOBIN=$1/bin CGO_ENABLED=0 gobuild install \
    "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
}

build_cri_tools() {
  local out=$1 src
  # The checksum DB does not answer for cri-tools through this proxy (GONOSUMDB in lib.sh);
  # its dependencies verify against its own go.sum.
  src=$(cd / && go mod download -json "sigs.k8s.io/cri-tools@$CRI_TOOLS_VERSION" |
        sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$src" ] || { echo "go mod download gave no directory for cri-tools"; return 1; }
  cp -r "$src" "$out/src"
  chmod -R u+w "$out/src"
  local ldflags="-X sigs.k8s.io/cri-tools/pkg/version.Version=${CRI_TOOLS_VERSION#v}"
  # critest is a ginkgo test binary: upstream builds it with `go test -c`, not `go build`
  (cd "$out/src" &&
    CGO_ENABLED=0 nice -n 10 go test -c -trimpath -ldflags "$ldflags" -o "$out/bin/critest" ./cmd/critest &&
    CGO_ENABLED=0 nice -n 10 go build -trimpath -ldflags "$ldflags" -o "$out/bin/crictl" ./cmd/crictl)
  rm -rf "$out/src"
}

cmd_build() {
  ensure_built containerd "$CONTAINERD_VERSION" build_containerd containerd ctr containerd-shim-runc-v2
  ensure_built runc "$RUNC_VERSION" build_runc runc
  ensure_built cni-plugins "$CNI_PLUGINS_VERSION" build_cni_plugins bridge host-local loopback portmap
  ensure_built crane "$CRANE_VERSION" build_crane crane
  ensure_built cri-tools "$CRI_TOOLS_VERSION" build_cri_tools critest crictl
}

# --------------------------------------------------------------------------------- config

# No CAP_SYS_RESOURCE (some CI sandboxes): CRI asks runc for oom_score_adj -998 for
# sandboxes, which then fails with EACCES, unless containerd clamps it to its own value.
restrict_oom_score_adj() {
  local capeff
  capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
  if (( (16#$capeff >> 24) & 1 )); then echo false; else echo true; fi
}

# The vmpod runtime stanza is runtimeclass/containerd-config.toml, the snippet admins add on
# real nodes, so critest runs against exactly what we ship: only ConfigPath is ours.
vmpod_runtime_stanza() {
  local snippet=$VMPOD_ROOT/runtimeclass/containerd-config.toml
  [ -f "$snippet" ] || die "$snippet missing"
  grep -q '^[[:space:]]*ConfigPath = ' "$snippet" || die "$snippet: no ConfigPath line to point at the test config"
  echo "# ---- from runtimeclass/containerd-config.toml (ConfigPath replaced) ----"
  sed -e '/^version[[:space:]]*=/d' \
      -e "s|^\([[:space:]]*ConfigPath = \).*|\1\"$TB_VMPOD_CONFIG\"|" "$snippet"
}

# runsc_runtime_stanza: gVisor as a third runtime handler, "runsc", when VMPOD_GVISOR_DIR
# names a directory with runsc and containerd-shim-runsc-v1 (hack/gvisor.sh; make bench
# sets it). systrap: the platform that needs neither KVM nor ptrace.
# (cmd_config checks the directory first: a die in here would only end the substitution)
runsc_runtime_stanza() {
  [ -n "${VMPOD_GVISOR_DIR:-}" ] || return 0
  mkdir -p "$TB_ETC/runsc"
  cat > "$TB_ETC/runsc/config.toml" <<EOT
binary_name = "$VMPOD_GVISOR_DIR/runsc"
root = "$TB_RUN/runsc"
[runsc_config]
  platform = "systrap"
EOT
  cat <<EOT
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc]
        runtime_type = "io.containerd.runsc.v1"
        runtime_path = "$VMPOD_GVISOR_DIR/containerd-shim-runsc-v1"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runsc.options]
          TypeUrl = "io.containerd.runsc.v1.options"
          ConfigPath = "$TB_ETC/runsc/config.toml"
EOT
}

containerd_imports() { [ -z "${VMPOD_CONTAINERD_IMPORT:-}" ] || printf '"%s"' "$VMPOD_CONTAINERD_IMPORT"; }

cmd_config() {
  mkdir -p "$TB_ETC/containerd" "$TB_ETC/certs.d" "$TB_ETC/cni/net.d"
  if [ -n "${VMPOD_GVISOR_DIR:-}" ] &&
    ! { [ -x "$VMPOD_GVISOR_DIR/runsc" ] && [ -x "$VMPOD_GVISOR_DIR/containerd-shim-runsc-v1" ]; }; then
    die "VMPOD_GVISOR_DIR=$VMPOD_GVISOR_DIR: no runsc and containerd-shim-runsc-v1 there (hack/gvisor.sh builds them)"
  fi
  [ -f "$TB_VMPOD_CONFIG" ] ||
    log "note: $TB_VMPOD_CONFIG does not exist yet (VMPOD_CONFIG): the vmpod shim will get a missing ConfigPath"
  cat > "$TB_ETC/containerd/config.toml" <<EOF
# Generated by hack/containerd.sh config: a private, throwaway containerd for critest and
# the integration tests. Nothing here touches the host's own containerd.
version = 3
root = "$TB_ROOT"
state = "$TB_STATE"
temp = "$TB_TMP"
# no drop-ins: a host's /etc/containerd/conf.d must not change the test bed (a cluster
# node imports the one runtimeclass/install-node.sh wrote for it: VMPOD_CONTAINERD_IMPORT)
imports = [$(containerd_imports)]

[grpc]
  address = "$TB_SOCK"
[ttrpc]
  address = "$TB_SOCK.ttrpc"
[debug]
  level = "${VMPOD_CONTAINERD_LOG_LEVEL:-info}"

[plugins]
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "$TB_SANDBOX_IMAGE"
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "$TB_ETC/certs.d"

  [plugins."io.containerd.cri.v1.runtime"]
    enable_selinux = false
    # pod netns bind mounts under state, not /run/netns: leaks are ours to find
    netns_mounts_under_state_dir = true
    # ExecSync gives up draining output a background child holds after this (containerd's
    # default 0s waits for ever); integration/shim holds vmpod to runc's behaviour here
    drain_exec_sync_io_timeout = "10s"
    # true when this process lacks CAP_SYS_RESOURCE (see restrict_oom_score_adj in the script)
    restrict_oom_score_adj = $(restrict_oom_score_adj)
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = ["$TB_CNI_BIN"]
      conf_dir = "$TB_ETC/cni/net.d"
    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
          BinaryName = "$TB_RUNC_BIN/runc"
          Root = "$TB_RUN/runc"
          SystemdCgroup = false
$(runsc_runtime_stanza)

  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
  [plugins."io.containerd.internal.v1.opt"]
    path = "$TB_ROOT/opt"
  [plugins."io.containerd.nri.v1.nri"]
    disable = true
  [plugins."io.containerd.shim.v1.manager"]
    socket_dir = "$TB_SHIM_SOCKETS"
  [plugins."io.containerd.transfer.v1.local"]
    config_path = "$TB_ETC/certs.d"

$([ -n "${VMPOD_CONTAINERD_IMPORT:-}" ] || vmpod_runtime_stanza)
EOF

  # Every registry critest names, and the _default fallback, resolve to the local registry
  # only. No upstream server: a missing image fails at once instead of going to the internet.
  local r
  for r in _default registry.k8s.io k8s.gcr.io gcr.io docker.io; do
    mkdir -p "$TB_ETC/certs.d/$r"
    printf 'server = "http://%s"\n\n[host."http://%s"]\n  capabilities = ["pull", "resolve"]\n' \
      "$TB_REGISTRY" "$TB_REGISTRY" > "$TB_ETC/certs.d/$r/hosts.toml"
  done

  # containerd adds the loopback plugin itself. No default route in pods: they reach only
  # the bridge subnet (and VMPOD_POD_ROUTES), so nothing leaves the machine.
  local routes="" cidr
  local cidrs=${VMPOD_POD_ROUTES:-}
  for cidr in ${cidrs//,/ }; do routes+="${routes:+, }{ \"dst\": \"$cidr\" }"; done
  cat > "$TB_ETC/cni/net.d/10-$TB_CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$TB_CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$TB_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$TB_IPAM",
        "ranges": [[{ "subnet": "$TB_SUBNET" }]],
        "routes": [$routes]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
  printf 'runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 30\n' \
    "$TB_SOCK" "$TB_SOCK" > "$TB_ETC/crictl.yaml"
  log "config written under $TB_ETC (vmpod ConfigPath = $TB_VMPOD_CONFIG)"
}

# ---------------------------------------------------------------------------------- start

preflight() {
  need_root
  # a shim socket is $TB_SHIM_SOCKETS/<64 hex>; unix socket paths hold at most 107 bytes
  (( ${#TB_SHIM_SOCKETS} + 65 <= 107 )) || die "VMPOD_RUN=$TB_RUN is too long for unix socket paths (keep it under 40 characters)"
  local dev
  dev=$(ip -4 -o route show to match "${TB_SUBNET%/*}" 2>/dev/null | awk '$1 != "default" { for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1) }')
  for d in $dev; do
    [ "$d" = "$TB_BRIDGE" ] || die "subnet $TB_SUBNET is already routed via $d: set VMPOD_SUBNET"
  done
  [ -x "$TB_SHIM_DIR/$TB_SHIM_BINARY" ] ||
    log "note: no $TB_SHIM_BINARY in $TB_SHIM_DIR (VMPOD_SHIM_DIR): the vmpod handler will fail until it is there"
}

# cri_conditions: "RuntimeReady=true NetworkReady=true" as containerd reports them
cri_conditions() {
  crictl info -o go-template --template '{{range .status.conditions}}{{.type}}={{.status}} {{end}}' 2>/dev/null
}

cmd_start() {
  local t pid
  t=$(now_ms)
  if pid=$(tb_pid containerd) && [ -S "$TB_SOCK" ]; then
    log "containerd already running (pid $pid, $TB_SOCK)"
    registry_and_images   # re-pushes only if the registry lost its images
    return
  fi
  preflight
  # A crashed earlier run must not bleed into this one: refuse if it left processes or
  # mounts (a registry started by images.sh is fine), and start from an empty containerd.
  local stale
  stale=$(tb_leaks --expect-bridge | grep -v "^process: pid $(tb_pid registry || echo none) " || true)
  if [ -n "$stale" ]; then
    prefix_lines "  left: " <<< "$stale" >&2
    die "an earlier test bed at $TB_RUN left the above behind: hack/containerd.sh clean"
  fi
  rm -rf --one-file-system "$TB_ROOT" "$TB_STATE" "$TB_SHIM_SOCKETS" "$TB_IPAM"
  cmd_build
  mkdir -p "$TB_RUN" "$TB_LOGS" "$TB_TMP"
  STARTING=1
  # the CNI bridge plugin (isGateway) turns ip_forward on; stop puts back what was there
  [ -f "$TB_RUN/ip_forward.orig" ] || cat /proc/sys/net/ipv4/ip_forward > "$TB_RUN/ip_forward.orig"
  step "config" cmd_config
  step "registry + critest images" registry_and_images
  echo "$TB_SHIM_DIR" > "$TB_RUN/shim.dir"
  launch_containerd
  date +%s > "$TB_RUN/started"
  STARTING=0
  log "containerd $CONTAINERD_VERSION up in $(since "$t"): pid $(tb_pid containerd), socket $TB_SOCK, handlers: $(runtime_handlers)"
  log "clients: eval \"\$(hack/containerd.sh env)\"; crictl ps; ctr images pull --hosts-dir \$VMPOD_TESTBED_HOSTS_DIR \$VMPOD_TESTBED_BUSYBOX"
}

registry_and_images() {
  if [ "${VMPOD_REGISTRY_EXTERNAL:-0}" = 1 ]; then
    curl -fs "http://$TB_REGISTRY/v2/" >/dev/null || die "VMPOD_REGISTRY_EXTERNAL=1 but no registry answers at http://$TB_REGISTRY"
    log "registry: http://$TB_REGISTRY (external)"
    return
  fi
  "$VMPOD_ROOT/hack/images.sh"
}

# cmd_start_fresh: a run that owns the test bed (CI, make test) must not fail, nor reuse
# pods, because an earlier run was killed half-way (a machine reset, a timeout): what that
# run left is listed and removed, then the test bed starts from nothing.
cmd_start_fresh() {
  need_root
  if [ -d "$TB_RUN" ] || [ -n "$(tb_marked_pids)" ]; then
    local left
    left=$(tb_leaks --expect-bridge || true)
    log "an earlier run left a test bed at $TB_RUN; cleaning it first"
    [ -z "$left" ] || prefix_lines "  left: " <<< "$left" >&2
    cmd_clean
  fi
  cmd_start
}

# launch_containerd: start the daemon on the written config and wait until CRI is ready
# with both runtime handlers.
launch_containerd() {
  log "containerd: starting ($TB_CONTAINERD_BIN/containerd, log $TB_LOGS/containerd.log)"
  tb_daemon containerd "$TB_LOGS/containerd.log" "$TB_CONTAINERD_BIN/containerd" --config "$TB_ETC/containerd/config.toml"
  local conds="" i
  for ((i = 0; i < 300; i++)); do
    tb_pid containerd >/dev/null || { tail -30 "$TB_LOGS/containerd.log" >&2; die "containerd exited (log above)"; }
    conds=$(cri_conditions || true)
    [[ $conds == *RuntimeReady=true*NetworkReady=true* ]] && break
    sleep 0.1
  done
  [[ $conds == *RuntimeReady=true*NetworkReady=true* ]] ||
    { tail -30 "$TB_LOGS/containerd.log" >&2; die "CRI not ready after 30s: ${conds:-no answer}"; }
  local handlers
  handlers=$(runtime_handlers)
  [[ " $handlers " == *" runc "* && " $handlers " == *" vmpod "* ]] ||
    die "containerd is missing a runtime handler: has [$handlers], wants runc and vmpod"
}

runtime_handlers() {
  # shellcheck disable=SC2016  # a Go template, not a shell expansion
  crictl info -o go-template --template '{{range $k, $v := .config.containerd.runtimes}}{{$k}} {{end}}'
}

# cmd_restart: containerd only, as a node upgrade would: its state, the shims and the
# pods they run stay; the new daemon reconnects to the shims.
cmd_restart() {
  local t pid
  t=$(now_ms)
  pid=$(tb_pid containerd) || die "containerd is not running: hack/containerd.sh start"
  kill -TERM "$pid"
  local i
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null || die "containerd (pid $pid) did not stop within 10s"
  launch_containerd
  log "containerd restarted in $(since "$t"): pid $(tb_pid containerd)"
}

# ----------------------------------------------------------------------------------- stop

# remove_workloads: every pod through CRI (so CNI DEL runs), then what ctr users left in
# other namespaces. Tolerant: a failure here is reported by the leak check that follows.
remove_workloads() {
  local p ns c
  for p in $(crictl pods -q 2>/dev/null); do
    crictl stopp "$p" >/dev/null 2>&1 || log "warning: stopping pod $p failed"
    crictl rmp -f "$p" >/dev/null 2>&1 || log "warning: removing pod $p failed"
  done
  for ns in $(ctr namespaces ls -q 2>/dev/null); do
    [ "$ns" = k8s.io ] && continue
    for c in $(ctr -n "$ns" tasks ls -q 2>/dev/null); do
      ctr -n "$ns" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      ctr -n "$ns" tasks delete -f "$c" >/dev/null 2>&1 || log "warning: deleting task $ns/$c failed"
    done
    for c in $(ctr -n "$ns" containers ls -q 2>/dev/null); do
      ctr -n "$ns" containers delete "$c" >/dev/null 2>&1 || log "warning: deleting container $ns/$c failed"
    done
  done
}

# restore_host_network: undo what the CNI plugins did to the host itself
restore_host_network() {
  ip link del "$TB_BRIDGE" 2>/dev/null || true
  if [ -f "$TB_RUN/ip_forward.orig" ]; then
    cat "$TB_RUN/ip_forward.orig" > /proc/sys/net/ipv4/ip_forward
    rm -f "$TB_RUN/ip_forward.orig"
  fi
  # portmap creates CNI-HOSTPORT-{DNAT,SETMARK,MASQ} once and never removes them. They are
  # shared by every portmap user on the host: drop them only when no pod rule is left.
  if iptables -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1 &&
     [ "$(iptables -t nat -S CNI-HOSTPORT-DNAT | wc -l)" = 1 ]; then
    local hook chain
    for hook in PREROUTING OUTPUT POSTROUTING; do
      iptables -t nat -S "$hook" | grep -E -- '-j CNI-HOSTPORT-(DNAT|MASQ)( |$)' |
        while read -r rule; do echo "${rule/#-A /-D }" | xargs iptables -t nat; done
    done
    for chain in CNI-HOSTPORT-DNAT CNI-HOSTPORT-SETMARK CNI-HOSTPORT-MASQ; do
      iptables -t nat -F "$chain" 2>/dev/null || true
      iptables -t nat -X "$chain" 2>/dev/null || true
    done
  elif iptables -t nat -S CNI-HOSTPORT-DNAT >/dev/null 2>&1; then
    log "note: CNI-HOSTPORT-DNAT still has other users' rules: left in place"
  fi
}

cmd_stop() {
  need_root
  local t rc=0 leaks
  t=$(now_ms)
  if [ ! -d "$TB_RUN" ]; then
    log "not running (no $TB_RUN)"
    return 0
  fi
  if tb_pid containerd >/dev/null && [ -S "$TB_SOCK" ]; then
    step "removing pods and containers" remove_workloads
  fi
  step "stopping containerd and the registry" tb_stop_daemons 15 containerd registry
  step "waiting for shims to exit" wait_marked_gone 5
  leaks=$(tb_leaks --expect-bridge)
  if [ -n "$leaks" ]; then
    rc=1
    log "LEAKED after teardown (a bug in a runtime or shim, or in this test bed):"
    prefix_lines "  leak: " <<< "$leaks" >&2
    if [ "${VMPOD_KEEP_LEAKS:-0}" = 1 ]; then
      log "VMPOD_KEEP_LEAKS=1: left in place for inspection; hack/containerd.sh clean removes them"
      return $rc
    fi
    log "removing them (VMPOD_KEEP_LEAKS=1 keeps them for inspection)"
    tb_force_clean
  fi
  restore_host_network
  save_logs
  [ -z "$(tb_mounts_under "$TB_RUN")" ] || die "mounts remain under $TB_RUN; not deleting it"
  rm -rf --one-file-system "$TB_RUN"
  log "stopped in $(since "$t"); logs in ${VMPOD_TESTBED_LOGS_OUT:-$VMPOD_OUT/testbed-logs}"
  return $rc
}

# wait_marked_gone SECONDS: shims exit on their own once their tasks are gone
wait_marked_gone() {
  local i
  for ((i = 0; i < $1 * 10; i++)); do
    [ -z "$(tb_marked_pids)" ] && return
    sleep 0.1
  done
}

# save_logs: the logs outlive the run dir, in VMPOD_TESTBED_LOGS_OUT (a cluster node's go to
# the cluster's logs) or _output/testbed-logs
save_logs() {
  [ -d "$TB_LOGS" ] || return 0
  local out=${VMPOD_TESTBED_LOGS_OUT:-$VMPOD_OUT/testbed-logs}
  mkdir -p "$out"
  cp -a "$TB_LOGS"/. "$out/"
}

cmd_clean() {
  need_root
  tb_stop_daemons 5 containerd registry
  tb_force_clean
  restore_host_network
  save_logs
  [ -z "$(tb_mounts_under "$TB_RUN")" ] || die "mounts remain under $TB_RUN: $(tb_mounts_under "$TB_RUN" | tr '\n' ' ')"
  rm -rf --one-file-system "$TB_RUN"
  log "cleaned"
}

# --------------------------------------------------------------------------- status / env

cmd_status() {
  local pid running=3
  if pid=$(tb_pid containerd); then
    running=0
    echo "containerd: running, pid $pid, socket $TB_SOCK, CRI: $(cri_conditions || echo 'no answer')"
    echo "pods: $(crictl pods -q 2>/dev/null | wc -l), containers: $(crictl ps -aq 2>/dev/null | wc -l)"
  else
    echo "containerd: not running ($TB_RUN)"
  fi
  if pid=$(tb_pid registry); then
    echo "registry: running, pid $pid, http://$TB_REGISTRY, $("$TB_CRANE_BIN/crane" catalog "$TB_REGISTRY" 2>/dev/null | wc -l) repositories"
  else
    echo "registry: not running"
  fi
  if [ -x "$(tb_shim_dir)/$TB_SHIM_BINARY" ]; then
    echo "vmpod shim: $(tb_shim_dir)/$TB_SHIM_BINARY"
  else
    echo "vmpod shim: missing ($(tb_shim_dir)/$TB_SHIM_BINARY)"
  fi
  echo "processes carrying the test bed marker: $(tb_marked_pids | wc -l)"
  return $running
}

cmd_env() {
  cat <<EOF
export CONTAINERD_ADDRESS=$TB_SOCK
export CONTAINER_RUNTIME_ENDPOINT=unix://$TB_SOCK
export IMAGE_SERVICE_ENDPOINT=unix://$TB_SOCK
export CRI_CONFIG_FILE=$TB_ETC/crictl.yaml
export VMPOD_TESTBED_REGISTRY=$TB_REGISTRY
# ctr resolves registries client-side: pass --hosts-dir \$VMPOD_TESTBED_HOSTS_DIR to ctr pull
export VMPOD_TESTBED_HOSTS_DIR=$TB_ETC/certs.d
export VMPOD_TESTBED_BUSYBOX=docker.io/library/busybox:latest
# the shims' log lines land here too (make bench reads a pod start's phases from it)
export VMPOD_TESTBED_CONTAINERD_LOG=$TB_LOGS/containerd.log
# where the shims listen (tests check a removed pod's socket is gone)
export VMPOD_TESTBED_SHIM_SOCKETS=$TB_SHIM_SOCKETS
export PATH=$TB_CRI_TOOLS_BIN:$TB_CONTAINERD_BIN:\$PATH
EOF
}

main() {
  [ $# = 1 ] || die "usage: $0 build|config|start|start-fresh|restart|stop|status|env|clean"
  case $1 in
    build) step "build (cached under $VMPOD_CACHE)" cmd_build ;;
    config) cmd_config ;;
    start) cmd_start ;;
    start-fresh) cmd_start_fresh ;;
    restart) cmd_restart ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    clean) cmd_clean ;;
    *) die "unknown command $1: build|config|start|start-fresh|restart|stop|status|env|clean" ;;
  esac
}

# On failure: drop a half-built cache entry; stop a half-started test bed.
on_exit() {
  local rc=$?
  [ -z "$BUILD_TMP" ] || rm -rf "$BUILD_TMP"
  if [ "$STARTING" = 1 ] && [ $rc != 0 ]; then
    log "start failed: stopping what was started"
    STARTING=0
    cmd_stop || true
  fi
  exit $rc
}
BUILD_TMP=
STARTING=0
trap on_exit EXIT
main "$@"
