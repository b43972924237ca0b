#!/usr/bin/env bash
# critest.sh [handler...]: CRI conformance (critest v1.36, offline) against the running test
# bed (hack/containerd.sh start), once per runtime handler (default: runc vmpod).
#
# For each handler: $VMPOD_OUT/critest/<handler>/{junit.xml,critest.log,result.env}. Then
# the report $VMPOD_OUT/critest/conformance.md is written (a column per handler, each with the
# date and commit of its run) and the script ends with one line per handler it was asked to run:
#   critest[runc]: 107 passed, 0 failed, 15 skipped in 92.1s wall
# A handler that cannot run (no shim binary, handler not configured) is not run and its line
# says why; it never counts as passing. Exit status: 0 only if every handler ran and passed.
#
#   hack/critest.sh --publish   copies the last run's report to docs/conformance.md (what
#                               `make conformance-doc` does): the committed document changes
#                               only on purpose, never as a side effect of `make test`.
#
# Settings: CRITEST_SKIP (ginkgo skip regex; default: the one spec impossible offline),
# CRITEST_ARGS (more critest flags, e.g. -ginkgo.focus=Networking).
set -euo pipefail
# shellcheck source=hack/testbed-lib.sh
source "$(dirname "$0")/testbed-lib.sh"

# Its image is gcr.io/...test-image-digest@sha256:9700f9a2…, upstream bytes we cannot rebuild.
SKIP=${CRITEST_SKIP:-public image with digest should be pulled and removed}
RESULTS=$VMPOD_OUT/critest
REPORT=$RESULTS/conformance.md
DOC=$VMPOD_ROOT/docs/conformance.md
CRITEST=$TB_CRI_TOOLS_BIN/critest

# handler_problem HANDLER: why HANDLER cannot run here, or nothing if it can
handler_problem() {
  local h=$1 type binary
  type=$(crictl info -o go-template --template "{{with index .config.containerd.runtimes \"$h\"}}{{.runtimeType}}{{end}}" 2>/dev/null || true)
  if [ -z "$type" ]; then
    echo "handler $h is not configured in the test bed's containerd"
    return
  fi
  # containerd maps runtime_type io.containerd.<name>.<version> to containerd-shim-<name>-<version>
  # and looks for it on its PATH: look exactly there
  if [[ $type =~ ^io\.containerd\.([a-z0-9]+)\.(v[0-9]+)$ ]]; then
    binary=containerd-shim-${BASH_REMATCH[1]}-${BASH_REMATCH[2]}
    PATH=$(tb_containerd_path) command -v "$binary" >/dev/null ||
      echo "$binary not found on containerd's PATH (shim dir: $(tb_shim_dir | sed "s|^$VMPOD_ROOT/||")): build it there, or restart the test bed with VMPOD_SHIM_DIR set"
  fi
}

run_handler() {
  local h=$1 dir=$RESULTS/$1 problem t rc=0 ms shim
  rm -rf "$dir"
  mkdir -p "$dir"
  {
    echo "handler=$h"
    echo "date=$(date -u +'%Y-%m-%d %H:%M UTC')"
    echo "commit=$(git -C "$VMPOD_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$VMPOD_ROOT" diff --quiet HEAD 2>/dev/null || echo +changes)"
    echo "critest_version=$CRI_TOOLS_VERSION"
    echo "containerd_version=$CONTAINERD_VERSION"
    echo "runc_version=$RUNC_VERSION"
    echo "critest_args=${CRITEST_ARGS:-}"
  } > "$dir/result.env"
  problem=$(handler_problem "$h")
  if [ -n "$problem" ]; then
    log "critest[$h]: NOT RUN: $problem"
    printf 'status=not-run\nreason=%s\n' "$problem" >> "$dir/result.env"
    return
  fi
  if [ "$h" != runc ]; then
    shim=$(PATH=$(tb_containerd_path) command -v "$TB_SHIM_BINARY" || true)
    # the binary's name and hash, not its path: the report may be published (docs/)
    [ -z "$shim" ] || echo "shim=${shim##*/} (sha256 $(sha256sum < "$shim" | cut -c1-12))" >> "$dir/result.env"
  fi
  log "critest[$h]: running (log: $dir/critest.log)"
  t=$(now_ms)
  # cwd: critest reads a crictl.yaml from it if there is one; we pass endpoints instead
  # shellcheck disable=SC2086  # CRITEST_ARGS is a list of flags
  (cd "$dir" && "$CRITEST" \
      -runtime-endpoint "unix://$TB_SOCK" -image-endpoint "unix://$TB_SOCK" \
      -runtime-handler "$h" \
      -ginkgo.skip "$SKIP" \
      -ginkgo.junit-report "$dir/junit.xml" \
      -ginkgo.no-color -ginkgo.timeout 60m ${CRITEST_ARGS:-}) > "$dir/critest.log" 2>&1 || rc=$?
  ms=$(( $(now_ms) - t ))
  printf 'status=ran\nexit_code=%s\nwall_seconds=%d.%d\n' "$rc" $((ms / 1000)) $((ms % 1000 / 100)) >> "$dir/result.env"
  log "critest[$h]: finished in $(since "$t"), exit $rc: $(grep -E '^(SUCCESS|FAIL)!' "$dir/critest.log" || echo 'no ginkgo summary')"
  remove_critest_pods "$h"
}

# remove_critest_pods HANDLER: what critest left running. A test that times out leaves its
# pod behind (vmpod's HostNetwork deviation does, docs/design/007: a VM of 4 vCPUs and
# 8 GiB until the test bed stops); critest makes its pods in namespaces named
# cri-test-namespace*, and nothing else does.
remove_critest_pods() {
  local id ids
  ids=$(crictl pods --namespace '^cri-test-namespace' -q) || { log "critest[$1]: cannot list its pods"; return 0; }
  for id in $ids; do
    log "critest[$1]: removing the pod $id it left"
    crictl stopp "$id" >/dev/null || true
    crictl rmp "$id" >/dev/null || log "critest[$1]: pod $id: not removed"
  done
}

main() {
  need_root
  local handlers=("$@") h columns=(runc vmpod)
  [ ${#handlers[@]} -gt 0 ] || handlers=(runc vmpod)
  [ -x "$CRITEST" ] || die "critest is not built: run hack/containerd.sh build"
  if ! tb_pid containerd >/dev/null || [ ! -S "$TB_SOCK" ]; then
    die "the test bed is not running ($TB_RUN): hack/containerd.sh start (or: make critest)"
  fi
  command -v ipcmk >/dev/null || die "critest needs ipcmk on the host (util-linux): hack/install-deps.sh"
  for h in "${handlers[@]}"; do
    [[ " ${columns[*]} " == *" $h "* ]] || columns+=("$h")
  done
  rm -f "$RESULTS/summary.txt"
  for h in "${handlers[@]}"; do
    run_handler "$h"
  done
  local summary rc=0
  summary=$(IFS=,; echo "${handlers[*]}")
  (cd "$VMPOD_ROOT" && go build -o "$VMPOD_OUT/bin/critestreport" ./integration/testbed/critestreport)
  log "writing $REPORT; summary (also in $RESULTS/summary.txt):"
  "$VMPOD_OUT/bin/critestreport" -results "$RESULTS" -handlers "$(IFS=,; echo "${columns[*]}")" \
    -summary "$summary" -out "$REPORT" -skip "$SKIP" \
    -deviations "$VMPOD_ROOT/hack/critest-deviations.txt" -baseline runc > "$RESULTS/summary.txt" || rc=$?
  cat "$RESULTS/summary.txt"
  return $rc
}

# publish: the last full run's report becomes docs/conformance.md. Only a run of every
# handler the document shows, with critest's whole suite, and no machine paths.
publish_report() {
  [ -f "$REPORT" ] || die "no report at $REPORT: run make critest (or make test) first"
  local h
  for h in runc vmpod; do
    grep -q "^status=ran$" "$RESULTS/$h/result.env" 2>/dev/null || die "the last run did not run handler $h: nothing published"
    grep -q '^critest_args=$' "$RESULTS/$h/result.env" || die "the last run of $h was partial (CRITEST_ARGS): nothing published"
  done
  if grep -nE "$VMPOD_ROOT|$HOME|/tmp/" "$REPORT" >&2; then
    die "the report names local paths (above): nothing published"
  fi
  cp "$REPORT" "$DOC"
  log "published $REPORT to ${DOC#"$VMPOD_ROOT"/}"
}

if [ "${1:-}" = --publish ]; then publish_report; else main "$@"; fi
