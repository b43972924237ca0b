#!/usr/bin/env bash
# install-node.sh: install the vmpod runtime on a Kubernetes node running containerd 2.x —
# what an admin runs once per node (Kata ships kata-deploy for the same job). The test
# cluster (hack/cluster.sh) installs its nodes with this very script.
#
#   runtimeclass/install-node.sh --shim BIN --kernel FILE --initrd FILE [options]
#
#   --shim FILE        containerd-shim-vmpod-v2 (make build: _output/bin/); vmpod-pid-proxy
#                      is taken from the same directory
#   --kernel FILE      the guest kernel and initramfs for container pods (make guest:
#   --initrd FILE        _output/guest/vmlinux, initrd.img)
#   --root DIR         install below DIR instead of / (a node image being built, or a test
#                      node); the files it writes name their paths with DIR in front
#   --state-dir DIR    the shim's run-time state (default /run/vmpod)
#   --node NAME        label the Node vmpod.dev/runtime=true afterwards (needs kubectl and
#                      a kubeconfig allowed to patch nodes; runtimeclass.yaml selects it)
#
# It writes:
#   <root>/usr/local/bin/containerd-shim-vmpod-v2, vmpod-pid-proxy (the host pid of each
#                                                  container: it must sit next to the shim)
#   <root>/usr/local/share/vmpod/guest/{vmlinux,initrd.img}
#   <root>/etc/vmpod/config.toml                  (runtime/nodeconfig: defaults for the rest)
#   <root>/etc/containerd/conf.d/vmpod.toml       (runtimeclass/containerd-config.toml with
#                                                  ConfigPath and the shim's path filled in)
# and does not restart containerd: do that with the node's init system (the default
# /etc/containerd/config.toml of containerd 2.x imports conf.d/*.toml), then check
# `crictl info` lists the vmpod runtime. Idempotent: a second run replaces the files.
set -euo pipefail

die() { echo "install-node.sh: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
root=/ shim= kernel= initrd= state_dir=/run/vmpod node=
while [ $# -gt 0 ]; do
  case $1 in
    --root) root=$2; shift 2 ;;
    --shim) shim=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --state-dir) state_dir=$2; shift 2 ;;
    --node) node=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (--help lists them)" ;;
  esac
done
for f in shim kernel initrd; do
  [ -n "${!f}" ] || die "--$f is required"
  [ -f "${!f}" ] || die "--$f ${!f}: no such file"
done
[ -x "$shim" ] || die "--shim $shim: not executable"
"$shim" -v >/dev/null 2>&1 || die "--shim $shim does not run ($shim -v failed)"
proxy=$(dirname "$shim")/vmpod-pid-proxy
[ -x "$proxy" ] || die "$proxy: missing (make build puts it next to the shim)"
root=${root%/}
snippet=$here/containerd-config.toml
[ -f "$snippet" ] || die "$snippet missing (run the script from the vmpod tree or a release)"

bin=$root/usr/local/bin
guest=$root/usr/local/share/vmpod/guest
etc=$root/etc/vmpod
dropin=$root/etc/containerd/conf.d
install -d -m 0755 "$bin" "$guest" "$etc" "$dropin"
install -m 0755 "$shim" "$bin/containerd-shim-vmpod-v2"
install -m 0755 "$proxy" "$bin/vmpod-pid-proxy"
install -m 0644 "$kernel" "$guest/vmlinux"
install -m 0644 "$initrd" "$guest/initrd.img"

cat > "$etc/config.toml.new" <<EOF
# vmpod node configuration, written by runtimeclass/install-node.sh; the keys and their
# defaults: runtime/nodeconfig (README: Install on a node)
state_dir = "$state_dir"
[hypervisor]
kernel = "$guest/vmlinux"
initrd = "$guest/initrd.img"
EOF
mv "$etc/config.toml.new" "$etc/config.toml"

# the shipped snippet, ConfigPath pointing at this config; with --root the shim is named by
# path (containerd would otherwise look for it on its PATH)
{
  echo "# written by runtimeclass/install-node.sh from runtimeclass/containerd-config.toml"
  sed -e "s|^\([[:space:]]*ConfigPath = \).*|\1\"$etc/config.toml\"|" \
    -e "s|^\([[:space:]]*runtime_type = \"io.containerd.vmpod.v2\"\)|\1\n  runtime_path = \"$bin/containerd-shim-vmpod-v2\"|" "$snippet"
} > "$dropin/vmpod.toml.new"
grep -q "ConfigPath = \"$etc/config.toml\"" "$dropin/vmpod.toml.new" || die "could not set ConfigPath in $snippet"
mv "$dropin/vmpod.toml.new" "$dropin/vmpod.toml"
echo "installed: $bin/containerd-shim-vmpod-v2, $bin/vmpod-pid-proxy, $guest, $etc/config.toml, $dropin/vmpod.toml"

if [ -n "$node" ]; then
  kubectl label node "$node" vmpod.dev/runtime=true --overwrite >/dev/null || die "could not label node $node"
  echo "labelled node $node vmpod.dev/runtime=true"
fi
echo "next: restart containerd; crictl info should list the vmpod runtime"
