#!/usr/bin/env bash
# demo.sh (make demo): a pod with a busybox container through crictl and a private
# containerd with the vmpod runtime; prints the guest kernel next to the host's and the pod
# start time. Builds and caches what it needs; stops containerd again at the end.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

prepare_testbed

started_here=0
if ! hack/containerd.sh status >/dev/null 2>&1; then
  hack/containerd.sh start
  started_here=1
fi
eval "$(hack/containerd.sh env)"
W=$(mktemp -d)
cleanup() {
  [ -n "${POD:-}" ] && { crictl stopp "$POD" >/dev/null 2>&1; crictl rmp "$POD" >/dev/null 2>&1; }
  rm -rf "$W"
  if [ $started_here = 1 ]; then hack/containerd.sh stop >/dev/null; fi
}
trap cleanup EXIT
quiet() { "$@" 2> >(grep -vE 'cgroup_parent|DEPRECATION' >&2); }

cat > "$W/pod.json" <<EOF
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-$$"},
 "hostname": "vmpod-demo", "log_directory": "$W", "linux": {}}
EOF
cat > "$W/ctr.json" <<EOF
{"metadata": {"name": "busybox"}, "image": {"image": "$VMPOD_TESTBED_BUSYBOX"},
 "command": ["sleep", "3600"], "log_path": "busybox.log", "linux": {}}
EOF
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
