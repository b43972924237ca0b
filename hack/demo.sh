#!/usr/bin/env bash
# demo.sh (make demo): what a user comes for, step by step.
#   1. a container pod through CRI: a busybox container in a VM, on a private containerd
#      with the vmpod runtime; the guest kernel next to the host's, the pod start time;
#   2. a VirtualMachine on a Kubernetes node: a KubeVirt manifest converted with
#      kubectl vmpod convert, applied to the test cluster (hack/cluster.sh: kubelet nodes,
#      the controller in-cluster); it boots a Debian guest from a containerDisk, its serial
#      console shows the login prompt, and exec and guestosinfo answer through the QEMU
#      guest agent.
# Builds and caches what it needs; stops what it started at the end. DEMO_VM=0 stops after 1.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

prepare_testbed

W=$(mktemp -d)
started_testbed=0 started_cluster=0 POD=
cleanup() {
  if [ -n "$POD" ]; then crictl stopp "$POD" >/dev/null 2>&1 || true; crictl rmp "$POD" >/dev/null 2>&1 || true; fi
  if [ $started_testbed = 1 ]; then hack/containerd.sh stop >/dev/null || true; fi
  if [ $started_cluster = 1 ]; then
    log "stopping the test cluster"
    hack/cluster.sh stop >/dev/null || true
  elif [ -n "${KUBECONFIG:-}" ]; then
    kubectl delete namespace vmpod-demo --wait=false >/dev/null 2>&1 || true
  fi
  rm -rf "$W"
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. a container pod (CRI)
log "== 1. a container pod through CRI: busybox in a VM"
if ! hack/containerd.sh status >/dev/null 2>&1; then
  hack/containerd.sh start
  started_testbed=1
fi
eval "$(hack/containerd.sh env)"
quiet() { "$@" 2> >(grep -vE 'cgroup_parent|DEPRECATION' >&2); }

cat > "$W/pod.json" <<EOJ
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-$$"},
 "hostname": "vmpod-demo", "log_directory": "$W", "linux": {}}
EOJ
cat > "$W/ctr.json" <<EOJ
{"metadata": {"name": "busybox"}, "image": {"image": "$VMPOD_TESTBED_BUSYBOX"},
 "command": ["sleep", "3600"], "log_path": "busybox.log", "linux": {}}
EOJ
quiet crictl pull "$VMPOD_TESTBED_BUSYBOX" >/dev/null

t0=$(date +%s%N)
POD=$(quiet crictl runp --runtime vmpod "$W/pod.json")
CTR=$(quiet crictl create "$POD" "$W/ctr.json" "$W/pod.json")
quiet crictl start "$CTR" >/dev/null
t1=$(date +%s%N)

echo
echo "host kernel:   $(uname -r)"
echo "guest kernel:  $(quiet crictl exec -s "$CTR" uname -r)   (pod $POD, handler vmpod)"
echo "guest:         $(quiet crictl exec -s "$CTR" sh -c 'echo $(hostname), $(nproc) vCPU, $(grep MemTotal /proc/meminfo | tr -s " " | cut -d" " -f2-)')"
echo "pod IP:        $(quiet crictl inspectp -o go-template --template '{{.status.network.ip}}' "$POD")"
echo "pod start (RunPodSandbox + CreateContainer + StartContainer): $(( (t1 - t0) / 1000000 )) ms"
echo

quiet crictl stopp "$POD" >/dev/null
quiet crictl rmp "$POD" >/dev/null
POD=
if [ $started_testbed = 1 ]; then hack/containerd.sh stop >/dev/null; started_testbed=0; fi
unset CONTAINER_RUNTIME_ENDPOINT IMAGE_SERVICE_ENDPOINT CRI_CONFIG_FILE

if [ "${DEMO_VM:-1}" = 0 ]; then
  log "DEMO_VM=0: done"
  exit 0
fi

# ------------------------------------------------------- 2. a VirtualMachine on a kubelet node
log "== 2. a KubeVirt VirtualMachine on a Kubernetes node"
log "the guest: Debian with cloud-init and qemu-guest-agent (cached; ~1.2 min to build)"
export VMPOD_VM_GUEST
VMPOD_VM_GUEST=$(hack/vm-guest-image.sh)
if ! hack/cluster.sh status >/dev/null 2>&1; then
  log "the cluster: control plane + 2 kubelet nodes, vmpod installed on node 1 (cold: builds Kubernetes, ~15 min)"
  started_cluster=1
  hack/cluster.sh start
fi
eval "$(hack/cluster.sh env)"
kubectl get nodes -L vmpod.dev/runtime

# a VirtualMachine as KubeVirt's user guide writes one; the image is the test guest,
# served by the cluster's registry
cat > "$W/kubevirt-vm.yaml" <<'EOV'
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: debian
spec:
  runStrategy: Always
  template:
    spec:
      domain:
        cpu: {cores: 1}
        resources:
          requests: {memory: 1Gi}
        devices:
          disks:
          - {name: containerdisk, disk: {bus: virtio}}
          - {name: cloudinitdisk, disk: {bus: virtio}}
          interfaces:
          - {name: default, masquerade: {}}
      networks:
      - {name: default, pod: {}}
      readinessProbe:
        guestAgentPing: {}
        periodSeconds: 5
      volumes:
      - name: containerdisk
        containerDisk: {image: docker.io/vmpod-test/debian-vm:bookworm}
      - name: cloudinitdisk
        cloudInitNoCloud:
          userData: |
            #cloud-config
            hostname: vmpod-demo-vm
            write_files:
              - path: /etc/motd
                content: "booted by vmpod, configured by cloud-init\n"
EOV
log "kubectl vmpod convert -f kubevirt-vm.yaml | kubectl apply -f -"
kubectl vmpod convert -f "$W/kubevirt-vm.yaml" > "$W/vm.yaml"
kubectl create namespace vmpod-demo >/dev/null 2>&1 || true
kubectl apply -n vmpod-demo -f "$W/vm.yaml"

t0=$(date +%s)
last=
while :; do
  st=$(kubectl get vm.vmpod.dev -n vmpod-demo debian -o \
    jsonpath='{.status.printableStatus} {.status.conditions[?(@.type=="Ready")].status} {.status.podName} {.status.nodeName}' 2>/dev/null || true)
  if [ "$st" != "$last" ]; then
    log "VM: status, Ready, pod, node: $st"
    last=$st
  fi
  read -r status ready pod node <<<"$st" || true
  [ "$status" = Running ] && [ "$ready" = True ] && break
  if [ $(( $(date +%s) - t0 )) -gt 480 ]; then
    kubectl describe vm.vmpod.dev -n vmpod-demo debian >&2 || true
    die "the VM was not Ready after 8 minutes"
  fi
  sleep 2
done
ready_s=$(( $(date +%s) - t0 ))

# the serial console: the compute container's log (kubectl vmpod console attaches to it)
t1=$(date +%s)
until kubectl logs -n vmpod-demo "$pod" -c compute > "$W/console.log" 2>/dev/null && grep -q 'login:' "$W/console.log"; do
  [ $(( $(date +%s) - t1 )) -lt 120 ] || die "no login prompt on the console after 2 minutes"
  sleep 2
done
echo
echo "VirtualMachine debian: Ready in ${ready_s} s on node $node (pod $pod)"
echo "console:       $(grep -a -m1 -o '[[:alnum:]-]* login:' "$W/console.log")   (kubectl logs -c compute: the serial port)"
echo "exec (guest agent): $(kubectl exec -n vmpod-demo "$pod" -c compute -- cat /etc/motd)"
echo "guest kernel:  $(kubectl exec -n vmpod-demo "$pod" -c compute -- uname -r)   (host: $(uname -r))"
echo "kubectl vmpod guestosinfo debian:"
kubectl vmpod guestosinfo -n vmpod-demo debian | sed 's/^/  /'
echo
echo "Try: kubectl vmpod console -n vmpod-demo debian   (Ctrl-] detaches)"
echo "     kubectl vmpod vnc -n vmpod-demo debian"
echo

log "deleting the VM: the guest gets an ACPI power-off"
t1=$(date +%s)
kubectl delete vm.vmpod.dev -n vmpod-demo debian --wait=true --timeout=150s >/dev/null
kubectl delete namespace vmpod-demo --wait=true --timeout=150s >/dev/null
log "VM and its pod gone in $(( $(date +%s) - t1 )) s"
