#!/usr/bin/env bash
# cluster.sh: a real Kubernetes cluster on this machine, built from source: etcd,
# kube-apiserver, kube-controller-manager and kube-scheduler on the host, and N nodes, each
# a network namespace with its own containerd (runc + vmpod, hack/containerd.sh), kubelet
# and kube-proxy, joined by a bridge. Everything it creates lives under $VMPOD_CLUSTER_RUN
# (default /run/vmpod-k8s); binaries come from hack/kube-assets.sh and hack/containerd.sh
# build (cached). Design: docs/design/400-test-cluster.md.
#
#   hack/cluster.sh start        certificates, control plane, nodes; waits until every node
#                                is Ready; prints how to reach it
#   hack/cluster.sh start-fresh  clean what an interrupted run left, then start
#   hack/cluster.sh stop         delete the workloads, stop everything, check nothing leaked
#   hack/cluster.sh clean        force removal of whatever the cluster left
#   hack/cluster.sh status       what runs (exit 0 when the API answers)
#   hack/cluster.sh env          exports for clients: eval "$(hack/cluster.sh env)"
#
# Layout (VMPOD_CLUSTER_NODES, default 3; VMPOD_CLUSTER_VMPOD_NODES, default 2):
#   host        bridge vmpod-k8s0 10.98.0.1/24: the API (:6443) and the registry (:5100)
#   node i      netns vmpod-n<i>, eth0 10.98.0.1<i>; pods 10.244.<i>.0/24 on its own CNI
#               bridge; routes to the other nodes' pod subnets over the bridge
#   services    10.96.0.0/24 (kube-proxy, iptables mode, in each node's netns)
# vmpod-controller runs in-cluster from config/default, its images built from this tree
# (hack/controller-images.sh) and pushed to the cluster's registry.
# Nodes 1 to VMPOD_CLUSTER_VMPOD_NODES carry vmpod.dev/runtime=true (runtimeclass.yaml
# selects it): two, so VMs migrate between nodes. The others run runc pods only, so
# scheduling by RuntimeClass is tested. With VMPOD_QEMU_NEXT (hack/qemu-next.sh) the
# nodes have a second vmpod handler on that QEMU, and RuntimeClass vmpod-next selects it.
# Storage: local-path (node-local, the default class), local-block (loop devices on node 1)
# and vmpod-shared: local-path's shared-filesystem mode over a directory every node sees
# (the nodes share the host's filesystem), ReadWriteMany, standing in for NFS: the shared
# storage live migration needs.
set -euo pipefail
export VMPOD_RUN=${VMPOD_CLUSTER_RUN:-/run/vmpod-k8s}
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

CL_NODES=${VMPOD_CLUSTER_NODES:-3}
CL_VMPOD_NODES=${VMPOD_CLUSTER_VMPOD_NODES:-2}
CL_BRIDGE=vmpod-k8s0
CL_NET=10.98.0
CL_API=$CL_NET.1
CL_REGISTRY=$CL_API:5100 # not :5000, the test bed registry's port (any address)
CL_SERVICES=10.96.0.0/24
CL_PODS=10.244.0.0/16
CL_ETCD_PORT=12379 # not 2379: a host etcd may own it
CL_PKI=$TB_RUN/pki
KUBECONFIG_ADMIN=$CL_PKI/admin.kubeconfig
KUBE_BIN=$VMPOD_CACHE/kube/$ENVTEST_K8S_VERSION

node_name() { echo "vmpod-n$1"; }
node_ip() { echo "$CL_NET.1$1"; }
node_run() { echo "$TB_RUN/n$1"; }
node_netns() { echo "vmpod-n$1"; }
node_root() { echo "$TB_RUN/n$1/install"; } # where runtimeclass/install-node.sh installs the node ("/" of a real one)
kubectl() { "$KUBE_BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# in_node I CMD...: run CMD in node I's network namespace (only the netns: the node shares
# the host's mounts, so kubelet, containerd and the shims see one filesystem)
in_node() {
  local i=$1
  shift
  nsenter --net="/run/netns/$(node_netns "$i")" "$@"
}

# node_testbed I CMD: hack/containerd.sh CMD for node I, inside its netns
node_testbed() {
  local i=$1 r routes=$CL_SERVICES,$CL_API/32
  for ((r = 1; r <= CL_NODES; r++)); do [ "$r" = "$i" ] || routes+=",10.244.$r.0/24"; done
  # the test bed's client settings (make test exports them) must not reach a node's
  in_node "$i" env -u CONTAINER_RUNTIME_ENDPOINT -u IMAGE_SERVICE_ENDPOINT -u CRI_CONFIG_FILE -u CONTAINERD_ADDRESS \
    VMPOD_RUN="$(node_run "$i")" VMPOD_REGISTRY="$CL_REGISTRY" VMPOD_REGISTRY_EXTERNAL=1 \
    VMPOD_SUBNET="10.244.$i.0/24" VMPOD_BRIDGE=cni0 VMPOD_CNI_NETWORK="vmpod-n$i" \
    VMPOD_POD_ROUTES="$routes" VMPOD_CONFIG="$(node_root "$i")/etc/vmpod/config.toml" \
    VMPOD_CONTAINERD_IMPORT="$(node_root "$i")/etc/containerd/conf.d/*.toml" \
    VMPOD_TESTBED_LOGS_OUT="$VMPOD_OUT/cluster-logs/node-$i" \
    "$VMPOD_ROOT/hack/containerd.sh" "$2"
}

# ------------------------------------------------------------------------------ certificates

# cert NAME SUBJECT [SANS]: a key and a certificate signed by the cluster's CA
cert() {
  local name=$1 subj=$2 sans=${3:-}
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$CL_PKI/$name.key" -subj "$subj" -out "$CL_PKI/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    if [ -n "$sans" ]; then
      echo "extendedKeyUsage=serverAuth,clientAuth"
      echo "subjectAltName=$sans"
    else
      echo "extendedKeyUsage=clientAuth"
    fi
  } > "$CL_PKI/$name.ext"
  openssl x509 -req -in "$CL_PKI/$name.csr" -CA "$CL_PKI/ca.crt" -CAkey "$CL_PKI/ca.key" \
    -CAcreateserial -days 2 -extfile "$CL_PKI/$name.ext" -out "$CL_PKI/$name.crt" 2>/dev/null
  rm -f "$CL_PKI/$name.csr" "$CL_PKI/$name.ext"
}

# kubeconfig NAME: a kubeconfig for the certificate NAME
kubeconfig() {
  cat > "$CL_PKI/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vmpod
  cluster:
    server: https://$CL_API:6443
    certificate-authority: $CL_PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $CL_PKI/$1.crt
    client-key: $CL_PKI/$1.key
contexts:
- name: vmpod
  context: { cluster: vmpod, user: $1 }
current-context: vmpod
EOF
}

make_pki() {
  mkdir -p "$CL_PKI"
  chmod 700 "$CL_PKI"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$CL_PKI/ca.key" -out "$CL_PKI/ca.crt" -subj "/CN=vmpod-test-cluster-ca" 2>/dev/null
  cert apiserver "/CN=kube-apiserver" \
    "IP:$CL_API,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  cert admin "/O=system:masters/CN=vmpod-admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kube-proxy "/CN=system:kube-proxy"
  local i
  for ((i = 1; i <= CL_NODES; i++)); do
    cert "kubelet-$i" "/O=system:nodes/CN=system:node:$(node_name "$i")" "IP:$(node_ip "$i"),DNS:$(node_name "$i")"
    kubeconfig "kubelet-$i"
  done
  openssl ecparam -name prime256v1 -genkey -noout -out "$CL_PKI/sa.key" 2>/dev/null
  openssl ec -in "$CL_PKI/sa.key" -pubout -out "$CL_PKI/sa.pub" 2>/dev/null
  local k
  for k in admin controller-manager scheduler kube-proxy; do kubeconfig "$k"; done
}

# ---------------------------------------------------------------------------------- network

net_up() {
  ip link add "$CL_BRIDGE" type bridge
  ip addr add "$CL_API/24" dev "$CL_BRIDGE"
  ip link set "$CL_BRIDGE" up
  local i ns
  for ((i = 1; i <= CL_NODES; i++)); do
    ns=$(node_netns "$i")
    ip netns add "$ns"
    ip link add "vmpod-n$i-h" type veth peer name eth0 netns "$ns"
    ip link set "vmpod-n$i-h" master "$CL_BRIDGE" up
    in_node "$i" ip addr add "$(node_ip "$i")/24" dev eth0
    in_node "$i" ip link set eth0 up
    in_node "$i" ip link set lo up
    in_node "$i" ip route add default via "$CL_API"
    # pods of the other nodes: straight over the bridge, not through the host
    local r
    for ((r = 1; r <= CL_NODES; r++)); do
      [ "$r" = "$i" ] || in_node "$i" ip route add "10.244.$r.0/24" via "$(node_ip "$r")"
    done
    ip route add "10.244.$i.0/24" via "$(node_ip "$i")"
    # a Service's pod answering a pod on the same bridge must pass kube-proxy's conntrack
    in_node "$i" sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
  done
}

net_down() {
  local i
  for ((i = 1; i <= CL_NODES + 4; i++)); do
    ip route del "10.244.$i.0/24" 2>/dev/null || true
    ip link del "vmpod-n$i-h" 2>/dev/null || true
    ip netns del "$(node_netns "$i")" 2>/dev/null || true
  done
  ip link del "$CL_BRIDGE" 2>/dev/null || true
}

# ----------------------------------------------------------------------------- control plane

wait_for() { # SECONDS WHAT CMD...
  local s=$1 what=$2 i
  shift 2
  for ((i = 0; i < s * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what: not up after ${s}s"
}

control_plane_up() {
  tb_daemon etcd "$TB_LOGS/etcd.log" "$KUBE_BIN/etcd" --data-dir "$TB_RUN/etcd" \
    --listen-client-urls "http://127.0.0.1:$CL_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$CL_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((CL_ETCD_PORT + 1))" --unsafe-no-fsync
  tb_daemon kube-apiserver "$TB_LOGS/kube-apiserver.log" "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$CL_ETCD_PORT" \
    --bind-address "$CL_API" --advertise-address "$CL_API" --secure-port 6443 \
    --tls-cert-file "$CL_PKI/apiserver.crt" --tls-private-key-file "$CL_PKI/apiserver.key" \
    --client-ca-file "$CL_PKI/ca.crt" \
    --kubelet-client-certificate "$CL_PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$CL_PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$CL_PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --service-cluster-ip-range "$CL_SERVICES" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$CL_PKI/sa.pub" --service-account-signing-key-file "$CL_PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false
  wait_for 60 "kube-apiserver" kubectl get --raw /readyz
  tb_daemon kube-controller-manager "$TB_LOGS/kube-controller-manager.log" "$KUBE_BIN/kube-controller-manager" \
    --kubeconfig "$CL_PKI/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$CL_PKI/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$CL_PKI/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$CL_PKI/sa.key" --root-ca-file "$CL_PKI/ca.crt" \
    --cluster-signing-cert-file "$CL_PKI/ca.crt" --cluster-signing-key-file "$CL_PKI/ca.key" \
    --service-cluster-ip-range "$CL_SERVICES" --profiling=false
  tb_daemon kube-scheduler "$TB_LOGS/kube-scheduler.log" "$KUBE_BIN/kube-scheduler" \
    --kubeconfig "$CL_PKI/scheduler.kubeconfig" \
    --authentication-kubeconfig "$CL_PKI/scheduler.kubeconfig" \
    --authorization-kubeconfig "$CL_PKI/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false
}

# ----------------------------------------------------------------------------------- storage

LPP_DIR=$VMPOD_CACHE/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION
CL_BLOCK_PVS=${VMPOD_CLUSTER_BLOCK_PVS:-2} # loop-device PVs on node 1, 2 GiB each

# build_local_path_provisioner: the provisioner's static binary from the module proxy (go
# install: its go.mod has no replace directives), cached by version
build_local_path_provisioner() {
  [ -x "$LPP_DIR/bin/local-path-provisioner" ] && return
  local tmp=$LPP_DIR.build.$$
  rm -rf "$tmp"
  mkdir -p "$tmp/bin"
  (cd / && GOBIN=$tmp/bin CGO_ENABLED=0 go install -trimpath "github.com/rancher/local-path-provisioner@$LOCAL_PATH_PROVISIONER_VERSION")
  publish "$tmp" "$LPP_DIR"
}

storage_up() {
  build_local_path_provisioner
  local crane=$TB_CRANE_BIN/crane ref w
  ref=$CL_REGISTRY/rancher/local-path-provisioner:$LOCAL_PATH_PROVISIONER_VERSION
  w=$(mktemp -d)
  install -m 0755 "$LPP_DIR/bin/local-path-provisioner" "$w/local-path-provisioner"
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$w" -cf "$w.tar" local-path-provisioner
  "$crane" append --oci-empty-base -f "$w.tar" -t "$ref" >/dev/null 2>&1
  "$crane" mutate "$ref" --set-platform linux/amd64 --entrypoint /local-path-provisioner -t "$ref" >/dev/null 2>&1
  rm -rf "$w" "$w.tar"
  # each node's volumes in its own directory: the nodes share the host's filesystem
  local i map=""
  for ((i = 1; i <= CL_NODES; i++)); do
    mkdir -p "$(node_run "$i")/storage"
    map+="${map:+,}{\"node\":\"$(node_name "$i")\",\"paths\":[\"$(node_run "$i")/storage\"]}"
  done
  mkdir -p "$TB_RUN/shared"
  sed -e "s|NODE_PATH_MAP|[$map]|" -e "s|SHARED_PATH|$TB_RUN/shared|" -e "s|LPP_VERSION|$LOCAL_PATH_PROVISIONER_VERSION|" \
    "$VMPOD_ROOT/hack/cluster/local-path-storage.yaml" | kubectl apply -f - >/dev/null
  block_pvs_up
  kubectl rollout status -n local-path-storage deployment/local-path-provisioner --timeout=120s >/dev/null ||
    die "local-path-provisioner did not become ready"
}

# block_pvs_up: Block PersistentVolumes on node 1, each a loop device over a sparse file,
# of the local-block class; stop detaches them (loops_down)
block_pvs_up() {
  local n dev file
  mkdir -p "$TB_RUN/block"
  for ((n = 1; n <= CL_BLOCK_PVS; n++)); do
    file=$TB_RUN/block/pv$n.img
    truncate -s 2G "$file"
    dev=$(losetup --find --show "$file")
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: vmpod-block-$n
spec:
  capacity: {storage: 2Gi}
  volumeMode: Block
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local-block
  local: {path: $dev}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$(node_name 1)]}
EOF
  done
}

# loops_down: detach the loop devices whose backing files are the cluster's
loops_down() {
  local dev
  for dev in $(losetup -n -O NAME,BACK-FILE | awk -v d="$TB_RUN/block/" 'index($2, d) == 1 { print $1 }'); do
    losetup -d "$dev" || true
  done
}

# ------------------------------------------------------------------------------------- nodes

# The cgroup v1 controllers (this host has no v2; kubelet's cgroupfs driver uses these).
CL_CGROUP_CONTROLLERS=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)

# node_cgroup_root I: create /vmpod-n<I> in every controller (kubelet's cgroupRoot must
# exist); a new cpuset is empty until given its parent's CPUs and memory nodes
node_cgroup_root() {
  local c d
  for c in "${CL_CGROUP_CONTROLLERS[@]}"; do
    d=/sys/fs/cgroup/$c/vmpod-n$1
    [ -d "/sys/fs/cgroup/$c" ] || continue
    mkdir -p "$d"
    if [ "$c" = cpuset ]; then
      cat /sys/fs/cgroup/cpuset/cpuset.cpus > "$d/cpuset.cpus"
      cat /sys/fs/cgroup/cpuset/cpuset.mems > "$d/cpuset.mems"
    fi
  done
}

# cgroups_down: remove the nodes' cgroup subtrees (kubelet leaves kubepods behind), deepest
# first; a cgroup that still has processes cannot go and is reported by cluster_leaks
cgroups_down() {
  local c i
  for c in "${CL_CGROUP_CONTROLLERS[@]}"; do
    for ((i = 1; i <= CL_NODES + 4; i++)); do
      [ -d "/sys/fs/cgroup/$c/vmpod-n$i" ] || continue
      find "/sys/fs/cgroup/$c/vmpod-n$i" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  done
}

write_node_configs() {
  local i=$1 run
  run=$(node_run "$i")
  mkdir -p "$run/kubelet" "$run/pod-logs"
  cat > "$run/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$i")
readOnlyPort: 0
containerRuntimeEndpoint: unix://$run/containerd.sock
cgroupDriver: cgroupfs
# two kubelets on one host: each node's pods under its own cgroup subtree
cgroupRoot: /vmpod-n$i
# these machines run cgroup v1 (kubelet >= 1.35 refuses it unless told)
failCgroupV1: false
failSwapOn: false
podLogsDir: $run/pod-logs
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $CL_PKI/ca.crt }
authorization: { mode: Webhook }
tlsCertFile: $CL_PKI/kubelet-$i.crt
tlsPrivateKeyFile: $CL_PKI/kubelet-$i.key
podCIDR: 10.244.$i.0/24
maxPods: 40
# a test machine's disk is shared with builds: do not evict for its fill level
evictionHard: { memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%" }
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
resolvConf: ""
EOF
  cat > "$run/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: { kubeconfig: $CL_PKI/kube-proxy.kubeconfig }
hostnameOverride: $(node_name "$i")
mode: iptables
clusterCIDR: $CL_PODS
bindAddress: $(node_ip "$i")
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# the nodes share the host's conntrack table size: leave it alone
conntrack: { maxPerCore: 0 }
EOF
}

# node_qemu_next I: a second vmpod handler on node I, "vmpod-next", when VMPOD_QEMU_NEXT
# names hack/qemu-next.sh's QEMU and virtiofsd, which migrate virtio-fs: container pods
# move only there (docs/design/212), and the VM pods' tests stay on the host's QEMU. The
# node's config and drop-in as install-node.sh wrote them, pointed at that QEMU; the
# RuntimeClass vmpod-next selects it.
node_qemu_next() {
  local root
  root=$(node_root "$1")
  rm -f "$root/etc/vmpod/config-next.toml" "$root/etc/containerd/conf.d/vmpod-next.toml"
  [ -n "${VMPOD_QEMU_NEXT:-}" ] || return 0
  [ -x "$VMPOD_QEMU_NEXT/bin/qemu-system-x86_64" ] || die "VMPOD_QEMU_NEXT=$VMPOD_QEMU_NEXT: no bin/qemu-system-x86_64 there (hack/qemu-next.sh)"
  # its templates apart from the vmpod handler's: a container pod booted while its node
  # made its template cannot move to a node that has one (docs/design/212), and the
  # cluster test waits for these
  sed -e "s|^\[hypervisor\]$|[hypervisor]\nqemu = \"$VMPOD_QEMU_NEXT/bin/qemu-system-x86_64\"\nvirtiofsd = \"$VMPOD_QEMU_NEXT/bin/virtiofsd\"\ntemplate_dir = \"$(node_run "$1")/vm-templates-next\"|" \
    "$root/etc/vmpod/config.toml" > "$root/etc/vmpod/config-next.toml"
  sed -e 's|containerd\.runtimes\.vmpod\([].]\)|containerd.runtimes.vmpod-next\1|' \
    -e 's|/etc/vmpod/config\.toml"|/etc/vmpod/config-next.toml"|' \
    "$root/etc/containerd/conf.d/vmpod.toml" > "$root/etc/containerd/conf.d/vmpod-next.toml"
  grep -q '^qemu = ' "$root/etc/vmpod/config-next.toml" &&
    grep -q 'runtimes.vmpod-next]' "$root/etc/containerd/conf.d/vmpod-next.toml" &&
    grep -q 'config-next.toml"' "$root/etc/containerd/conf.d/vmpod-next.toml" ||
    die "node $1: could not derive the vmpod-next handler from $root/etc"
}

node_up() {
  local i=$1 run name
  run=$(node_run "$i")
  name=$(node_name "$i")
  write_node_configs "$i"
  node_cgroup_root "$i"
  # vmpod the way an admin installs it: binary, guest, config, containerd drop-in
  "$VMPOD_ROOT/runtimeclass/install-node.sh" --root "$(node_root "$i")" --state-dir "$run/vm" \
    --shim "$VMPOD_OUT/bin/containerd-shim-vmpod-v2" \
    --kernel "$VMPOD_OUT/guest/vmlinux" --initrd "$VMPOD_OUT/guest/initrd.img" >/dev/null
  node_qemu_next "$i"
  step "node $name: containerd" node_testbed "$i" start
  tb_daemon "kubelet-$i" "$TB_LOGS/kubelet-$i.log" nsenter --net="/run/netns/$(node_netns "$i")" \
    "$KUBE_BIN/kubelet" --config "$run/kubelet.yaml" --kubeconfig "$CL_PKI/kubelet-$i.kubeconfig" \
    --root-dir "$run/kubelet" --hostname-override "$name" --node-ip "$(node_ip "$i")" \
    --cert-dir "$run/kubelet/pki"
  tb_daemon "kube-proxy-$i" "$TB_LOGS/kube-proxy-$i.log" nsenter --net="/run/netns/$(node_netns "$i")" \
    "$KUBE_BIN/kube-proxy" --config "$run/kube-proxy.yaml"
}

# ------------------------------------------------------------------------------- start/stop

preflight() {
  need_root
  [ "$CL_NODES" -ge 1 ] && [ "$CL_NODES" -le 4 ] || die "VMPOD_CLUSTER_NODES=$CL_NODES: 1 to 4"
  [ "$CL_VMPOD_NODES" -ge 1 ] && [ "$CL_VMPOD_NODES" -le "$CL_NODES" ] || die "VMPOD_CLUSTER_VMPOD_NODES=$CL_VMPOD_NODES: 1 to $CL_NODES"
  ! ip link show "$CL_BRIDGE" >/dev/null 2>&1 || die "bridge $CL_BRIDGE exists: an earlier cluster is up (hack/cluster.sh stop or clean)"
  [ -z "$(ip -4 -o route show "$CL_NET.0/24")" ] || die "$CL_NET.0/24 is routed on this host already"
  [ -z "$(ip -4 -o route show root "$CL_PODS")" ] || die "part of $CL_PODS is routed on this host already"
}

cmd_start() {
  local t i
  t=$(now_ms)
  if tb_pid kube-apiserver >/dev/null; then
    log "cluster already running at https://$CL_API:6443"
    return
  fi
  preflight
  KUBE_BIN=$("$VMPOD_ROOT/hack/kube-assets.sh")
  prepare_testbed # guest, shim, containerd + runc + CNI builds
  STARTING=1
  mkdir -p "$TB_RUN" "$TB_LOGS"
  step "certificates" make_pki
  step "network: bridge $CL_BRIDGE, $CL_NODES node namespaces" net_up
  step "registry + images at $CL_REGISTRY" env VMPOD_REGISTRY="$CL_REGISTRY" "$VMPOD_ROOT/hack/images.sh"
  step "vmpod-controller and vmpod-importer images" "$VMPOD_ROOT/hack/controller-images.sh" "$CL_REGISTRY"
  step "control plane" control_plane_up
  for ((i = 1; i <= CL_NODES; i++)); do node_up "$i"; done
  step "nodes Ready" wait_for 120 "$CL_NODES nodes Ready" nodes_ready
  # the installer's last step on the vmpod nodes (the others stay runc-only): the label
  # the RuntimeClass selects
  for ((i = 1; i <= CL_VMPOD_NODES; i++)); do
    PATH=$KUBE_BIN:$PATH KUBECONFIG=$KUBECONFIG_ADMIN "$VMPOD_ROOT/runtimeclass/install-node.sh" \
      --root "$(node_root "$i")" --state-dir "$(node_run "$i")/vm" --shim "$VMPOD_OUT/bin/containerd-shim-vmpod-v2" \
      --kernel "$VMPOD_OUT/guest/vmlinux" --initrd "$VMPOD_OUT/guest/initrd.img" --node "$(node_name "$i")" >/dev/null
  done
  kubectl apply -f "$VMPOD_ROOT/runtimeclass/runtimeclass.yaml" >/dev/null
  if [ -n "${VMPOD_QEMU_NEXT:-}" ]; then # node_qemu_next's handler
    # the pods of this class migrate: a migrating QEMU holds the guest's whole RAM, so the
    # overhead holds what the guest boots with beyond its limit (64 MiB), QEMU (~45),
    # TCG's code cache (64), the shim's margin for QEMU's growth while it migrates (48)
    # and room for the page cache of the pod's files (docs/design/212)
    sed -e 's/^  name: vmpod$/  name: vmpod-next/' -e 's/^handler: vmpod$/handler: vmpod-next/' \
      -e 's/^    memory: "128Mi"$/    memory: "320Mi"/' \
      "$VMPOD_ROOT/runtimeclass/runtimeclass.yaml" | kubectl apply -f - >/dev/null
  fi
  step "storage: local-path-provisioner, Block PVs on loop devices" storage_up
  step "vmpod-controller from config/default" deploy_controller
  STARTING=0
  date +%s > "$TB_RUN/started"
  log "cluster up in $(since "$t"): $CL_NODES nodes, API https://$CL_API:6443"
  log "clients: eval \"\$(hack/cluster.sh env)\"; kubectl get nodes"
}

# deploy_controller: what an admin applies, unchanged (its ghcr.io images resolve to the
# cluster's registry through the nodes' containerd mirrors)
deploy_controller() {
  kubectl apply -k "$VMPOD_ROOT/config/default" >/dev/null
  kubectl rollout status -n vmpod-system deployment/vmpod-controller --timeout=180s >/dev/null ||
    { kubectl get pods -n vmpod-system -o wide >&2; kubectl logs -n vmpod-system deployment/vmpod-controller --tail=30 >&2 || true
      die "vmpod-controller did not become ready"; }
}

nodes_ready() {
  local ready
  ready=$(kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}')
  [ "$(grep -c '^True$' <<< "$ready")" = "$CL_NODES" ]
}

# delete_workloads: every namespaced object users created, so kubelets tear their pods
# down the normal way (volumes unmounted, CNI DEL) before they stop
delete_workloads() {
  tb_pid kube-apiserver >/dev/null || return 0
  # VirtualMachines and DataVolumes first, while their controller still runs: it deletes
  # what it made (pods, Jobs) and would otherwise recreate a VM's pod deleted below
  kubectl delete virtualmachines.vmpod.dev,datavolumes.vmpod.dev --all -A --wait=false >/dev/null 2>&1 || true
  local ns
  for ns in $(kubectl get ns -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
    case $ns in kube-system | kube-public | kube-node-lease) continue ;; esac
    # controllers first, leaving their pods (so nothing recreates them); then the pods with
    # a short grace period: this is teardown, not a test of how pods stop
    kubectl delete deployments,statefulsets,daemonsets,jobs,replicasets,services --all -n "$ns" \
      --cascade=orphan >/dev/null 2>&1 || true
    kubectl delete pods --all -n "$ns" --grace-period=2 --wait=false >/dev/null 2>&1 || true
  done
  # volumes: the provisioner's helper pods remove the directories of Delete-policy PVs
  kubectl delete pvc --all -A --wait=false >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 300; i++)); do
    [ -z "$(kubectl get pods -A -o name 2>/dev/null)" ] && return
    sleep 0.2
  done
  log "warning: pods still present after 60s: $(kubectl get pods -A --no-headers 2>&1 | tr '\n' ';')"
}

cmd_stop() {
  need_root
  local t rc=0 i leaks
  t=$(now_ms)
  [ -d "$TB_RUN" ] || { log "not running (no $TB_RUN)"; return 0; }
  rm -rf "$VMPOD_OUT/cluster-logs"
  step "deleting workloads" delete_workloads
  for ((i = 1; i <= CL_NODES; i++)); do
    tb_stop_daemons 15 "kubelet-$i" "kube-proxy-$i"
    # kubelet bind-mounts its root dir onto itself (to make it rshared) and leaves that
    # mount when it stops; what is mounted below it (volumes) is a leak, reported below
    ! mountpoint -q "$(node_run "$i")/kubelet" || umount "$(node_run "$i")/kubelet" || true
    if [ -e "/run/netns/$(node_netns "$i")" ]; then
      # not through step, which would hide the exit status: the node's own leak check
      log "node $(node_name "$i"): stopping containerd"
      node_testbed "$i" stop || { rc=1; log "node $(node_name "$i"): containerd stop failed or found leaks (above)"; }
    fi
  done
  # in dependency order: kube-apiserver waits out its etcd connection retries otherwise
  tb_stop_daemons 15 kube-scheduler kube-controller-manager
  tb_stop_daemons 15 kube-apiserver
  tb_stop_daemons 15 etcd registry
  net_down
  cgroups_down
  loops_down
  leaks=$(cluster_leaks)
  if [ -n "$leaks" ]; then
    rc=1
    log "LEAKED after teardown:"
    prefix_lines "  leak: " <<< "$leaks" >&2
    force_clean
  fi
  save_cluster_logs
  rm -rf --one-file-system "$TB_RUN"
  log "stopped in $(since "$t"); logs in $VMPOD_OUT/cluster-logs"
  return $rc
}

# cluster_leaks: what the cluster left: marked processes (its own and its nodes'), mounts
# under its run dir (kubelet volumes, pod netns, rootfs), its netns and links
cluster_leaks() {
  local i pid m
  for pid in $(tb_marked_pids); do echo "process: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null))"; done
  for ((i = 1; i <= CL_NODES; i++)); do
    for pid in $(grep -lzxF "$TB_MARKER=$(node_run "$i")" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
      echo "process: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) of node $i"
    done
    [ ! -e "/run/netns/$(node_netns "$i")" ] || echo "netns: $(node_netns "$i")"
  done
  for m in $(tb_mounts_under "$TB_RUN"); do echo "mount: $m ($(tb_fstype "$m"))"; done
  ! ip link show "$CL_BRIDGE" >/dev/null 2>&1 || echo "link: bridge $CL_BRIDGE"
  losetup -n -O NAME,BACK-FILE | awk -v d="$TB_RUN/" 'index($2, d) == 1 { print "loop device: " $1 " over " $2 }'
  ip -4 -o route show 10.244.0.0/16 2>/dev/null | prefix_lines "route: "
  local c
  for c in "${CL_CGROUP_CONTROLLERS[@]}"; do
    for ((i = 1; i <= CL_NODES; i++)); do
      [ ! -d "/sys/fs/cgroup/$c/vmpod-n$i" ] || echo "cgroup: /sys/fs/cgroup/$c/vmpod-n$i"
    done
  done
  return 0
}

force_clean() {
  local pid m i
  for ((i = 1; i <= CL_NODES; i++)); do
    [ ! -e "/run/netns/$(node_netns "$i")" ] || node_testbed "$i" clean || true
    for pid in $(grep -lzxF "$TB_MARKER=$(node_run "$i")" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  for pid in $(tb_marked_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  sleep 0.5
  for m in $(tb_mounts_under "$TB_RUN"); do umount -l "$m" 2>/dev/null || true; done
  net_down
  cgroups_down
  loops_down
}

# save_cluster_logs: the control plane's, kubelets' and kube-proxies' logs (each node's
# containerd.sh stop saved its own into cluster-logs/node-<i>)
save_cluster_logs() {
  mkdir -p "$VMPOD_OUT/cluster-logs"
  [ ! -d "$TB_LOGS" ] || cp -a "$TB_LOGS"/. "$VMPOD_OUT/cluster-logs/"
}

cmd_clean() {
  need_root
  force_clean
  save_cluster_logs
  [ -z "$(tb_mounts_under "$TB_RUN")" ] || die "mounts remain under $TB_RUN: $(tb_mounts_under "$TB_RUN" | tr '\n' ' ')"
  rm -rf --one-file-system "$TB_RUN"
  log "cleaned"
}

cmd_start_fresh() {
  need_root
  if [ -d "$TB_RUN" ] || [ -n "$(tb_marked_pids)" ] || ip link show "$CL_BRIDGE" >/dev/null 2>&1; then
    log "an earlier run left a cluster at $TB_RUN; cleaning it first"
    cluster_leaks | prefix_lines "  left: " >&2
    cmd_clean
  fi
  cmd_start
}

cmd_status() {
  if ! tb_pid kube-apiserver >/dev/null; then
    echo "cluster: not running ($TB_RUN)"
    return 3
  fi
  echo "API: https://$CL_API:6443"
  kubectl get nodes -o wide
}

cmd_env() {
  cat <<EOF
export KUBECONFIG=$KUBECONFIG_ADMIN
export VMPOD_CLUSTER=$TB_RUN
export VMPOD_CLUSTER_REGISTRY=$CL_REGISTRY
# kubectl, crictl, and kubectl-vmpod (so "kubectl vmpod ..." works as for users)
export PATH=$KUBE_BIN:$TB_CRI_TOOLS_BIN:$VMPOD_OUT/bin:\$PATH
EOF
}

main() {
  [ $# = 1 ] || die "usage: $0 start|start-fresh|stop|status|env|clean"
  case $1 in
    start) cmd_start ;;
    start-fresh) cmd_start_fresh ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    clean) cmd_clean ;;
    *) die "unknown command $1: start|start-fresh|stop|status|env|clean" ;;
  esac
}

on_exit() {
  local rc=$?
  if [ "$STARTING" = 1 ] && [ $rc != 0 ]; then
    log "start failed: stopping what was started (logs: $VMPOD_OUT/cluster-logs)"
    STARTING=0
    cmd_stop || true
  fi
  exit $rc
}
STARTING=0
trap on_exit EXIT
main "$@"
