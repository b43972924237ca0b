#!/usr/bin/env bash
# leakcheck.sh: assert the host is clean after a test run: nothing the test bed (or a
# runtime it ran) started or created is left. Prints each leak and exits 1; exits 0 when
# clean. Looks only at what is attributable to this test bed ($VMPOD_RUN), so other
# engineers' containerd or QEMU processes on the same machine are not reported.
#
# Checked (see tb_leaks in testbed-lib.sh):
#   processes  any process carrying VMPOD_TESTBED_RUN=$VMPOD_RUN (containerd, registry,
#              shims, QEMU, virtiofsd ... whatever inherited it); any
#              containerd-shim-vmpod-v2 / vmpod-pid-proxy / qemu-system-* / virtiofsd whose command line names
#              the run dir; any process whose root is an overlay of the test bed's
#              snapshotter (runc containers orphaned by a dead shim)
#   mounts     anything mounted under the run dir: rootfs, shm, pod netns (with the
#              interfaces, e.g. a VM's tap, still inside a leaked netns); a VM's shared
#              dir still bound in /run/vmpod-virtiofsd for its virtiofsd
#   network    the test bed's bridge and veths on it, CNI cached results in
#              /var/lib/cni/results, IPs still reserved, portmap NAT rules of its network
#   files      pods the CRI plugin still has state for, temp files of containerd/shims/QEMU
#              (their TMPDIR is $VMPOD_RUN/tmp), task bundles, shim sockets
#
#   hack/leakcheck.sh              check
#   hack/leakcheck.sh --self-test  plant one leak of every kind in a scratch run dir, check
#                                  that each is reported and that `clean` removes them all
set -euo pipefail
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

check() {
  local leaks others
  leaks=$(tb_leaks)
  others=$(pgrep -c -f "^[^ ]*(containerd-shim-vmpod-v2|vmpod-pid-proxy|qemu-system-[a-z0-9_]+|virtiofsd)( |$)" || true)
  if [ -n "$leaks" ]; then
    prefix_lines "leak: " <<< "$leaks"
    log "LEAKS found for the test bed at $TB_RUN (hack/containerd.sh clean removes them)"
    return 1
  fi
  log "clean: nothing left by the test bed at $TB_RUN (processes, mounts, netns, bridge $TB_BRIDGE, CNI state and NAT rules of $TB_CNI_NETWORK, temp files, bundles, shim sockets)"
  [ "${others:-0}" = 0 ] || log "note: $others vmpod-shim/QEMU/virtiofsd processes on this host belong to something else (not counted)"
  return 0
}

# ------------------------------------------------------------------------------ self-test

self_test() {
  local scratch=/run/vmpod-lc-$$
  VMPOD_RUN=$scratch VMPOD_BRIDGE=vmpodlc$$ VMPOD_CNI_NETWORK=vmpod-lc-$$ "$0" --self-test-in-scratch
}

plant_leaks() {
  local chain
  mkdir -p "$TB_TMP" "$TB_STATE/io.containerd.runtime.v2.task/k8s.io/podid" "$TB_SHIM_SOCKETS" \
    "$TB_IPAM/$TB_CNI_NETWORK" "$TB_STATE/mnt" "$TB_STATE/netns"
  env "$TB_MARKER=$TB_RUN" sleep 600 &
  disown
  mount -t tmpfs leaktest "$TB_STATE/mnt"
  touch "$TB_STATE/netns/cni-leaktest"
  unshare --net="$TB_STATE/netns/cni-leaktest" true
  nsenter --net="$TB_STATE/netns/cni-leaktest" ip tuntap add tapleak0 mode tap
  ip link add "$TB_BRIDGE" type bridge
  mkdir -p /var/lib/cni/results
  touch "/var/lib/cni/results/$TB_CNI_NETWORK-podid-eth0" "/var/lib/cni/results/cni-loopback-podid-lo"
  mkdir -p "$TB_ROOT/io.containerd.grpc.v1.cri/sandboxes/podid"
  echo podid > "$TB_IPAM/$TB_CNI_NETWORK/10.99.0.7"
  # portmap's shape: a jump carrying the comment, from a shared chain (here a scratch one)
  # to the pod's own chain
  iptables -t nat -N "$SELFTEST_PARENT_CHAIN"
  iptables -t nat -N "$SELFTEST_POD_CHAIN"
  iptables -t nat -A "$SELFTEST_POD_CHAIN" -p tcp --dport 65000 -j RETURN
  iptables -t nat -A "$SELFTEST_PARENT_CHAIN" -p tcp -m comment \
    --comment "dnat name: \"$TB_CNI_NETWORK\" id: \"podid\"" -j "$SELFTEST_POD_CHAIN"
  touch "$TB_TMP/vmpod-leaked" "$TB_SHIM_SOCKETS/0123abcd"
  # a VM's shared dir, still bound for its virtiofsd (docs/design/025)
  mkdir -p "$TB_RUN/vm/podid/shared" "/run/vmpod-virtiofsd/leaktest-$$"
  mount --bind "$TB_RUN/vm/podid/shared" "/run/vmpod-virtiofsd/leaktest-$$"
}

self_test_in_scratch() {
  local kinds=(process mount "in that netns: tapleak0" "link: bridge" "cni: cached" "cni-loopback-podid-lo"
               "cni: IP" "iptables:" "tmp:" "bundle:" "socket:" "sandbox: pod podid" "bound for its virtiofsd")
  local leaks k failed=0
  SELFTEST_PARENT_CHAIN=CNI-LEAKTEST-$$
  SELFTEST_POD_CHAIN=CNI-DN-$(printf '%x' $$)0c0ffee
  trap 'set +e; tb_force_clean; rm -rf --one-file-system "$TB_RUN"
        iptables -t nat -F "$SELFTEST_PARENT_CHAIN" 2>/dev/null; iptables -t nat -X "$SELFTEST_PARENT_CHAIN" 2>/dev/null
        iptables -t nat -F "$SELFTEST_POD_CHAIN" 2>/dev/null; iptables -t nat -X "$SELFTEST_POD_CHAIN" 2>/dev/null' EXIT
  [ -z "$(tb_leaks)" ] || die "self-test: scratch run dir $TB_RUN is not clean to begin with"
  plant_leaks
  sleep 0.2
  leaks=$(tb_leaks)
  for k in "${kinds[@]}"; do
    if grep -qF "$k" <<< "$leaks"; then log "self-test: detected: $k"; else log "self-test: MISSED: $k"; failed=1; fi
  done
  if check >/dev/null 2>&1; then log "self-test: check passed with leaks planted"; failed=1; fi
  tb_force_clean
  leaks=$(tb_leaks)
  [ -z "$leaks" ] || { prefix_lines "  still there: " <<< "$leaks" >&2; log "self-test: force clean left leaks"; failed=1; }
  check >/dev/null 2>&1 || { log "self-test: check fails after clean"; failed=1; }
  if iptables -t nat -S "$SELFTEST_POD_CHAIN" >/dev/null 2>&1; then
    log "self-test: clean left the pod's NAT chain $SELFTEST_POD_CHAIN"; failed=1
  fi
  [ $failed = 0 ] || die "self-test FAILED"
  log "self-test passed: ${#kinds[@]} kinds of leak detected, all removed by clean"
}

need_root
case "${1:-}" in
  "") check ;;
  --self-test) self_test ;;
  --self-test-in-scratch) self_test_in_scratch ;;
  *) die "usage: $0 [--self-test]" ;;
esac
