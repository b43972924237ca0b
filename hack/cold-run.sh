#!/usr/bin/env bash
# cold-run.sh [TARGET...]: run `make TARGET` (default: test) the way a new user's first run
# goes: in a fresh clone of HEAD (committed work only) with an empty VMPOD_CACHE, one target
# after the other, so every path that only runs cold runs. COLD_GO=1 also starts Go's module
# and build caches empty (a truly fresh machine: ~700 MB of modules download again).
#
#   make cold-test                  # = hack/cold-run.sh test
#   COLD_GO=1 hack/cold-run.sh test demo
#
# Prints each target's wall time; fails if a target fails or leaves the clone's `git status`
# changed (a run must leave the checkout as it found it). Everything lives under one
# directory, removed at the end unless KEEP=1 (or a target failed, for inspection).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(test)
top=$(mktemp -d /var/tmp/vmpod-cold.XXXXXX)
git clone -q "$VMPOD_ROOT" "$top/vmpod"
log "fresh clone of $(git -C "$top/vmpod" rev-parse --short HEAD) in $top/vmpod; empty cache $top/cache"
env=(VMPOD_CACHE="$top/cache")
if [ "${COLD_GO:-0}" = 1 ]; then
  env+=(GOCACHE="$top/go-build" GOMODCACHE="$top/go-mod")
  log "COLD_GO=1: empty Go build and module caches too"
fi

failed=
n=0
for t in "${targets[@]}"; do
  n=$((n + 1))
  tlog=$top/$n-$t.log # numbered: `test test` keeps both runs' logs
  log "make $t (log: $tlog)"
  start=$(date +%s)
  if env "${env[@]}" make -C "$top/vmpod" "$t" > "$tlog" 2>&1; then rc=0; else rc=$?; fi
  secs=$(( $(date +%s) - start ))
  dirty=$(git -C "$top/vmpod" status --porcelain)
  if [ "$rc" != 0 ]; then
    tail -30 "$tlog" >&2
    failed+=" $t"
  elif [ -n "$dirty" ]; then
    printf '%s\n' "$dirty" >&2
    log "make $t changed the checkout (above)"
    failed+=" $t"
  fi
  log "make $t: exit $rc in $((secs / 60)) min $((secs % 60)) s (cold)"
  echo "cold make $t: exit $rc, $secs s, $(nproc) cores, $(date -u +%F)" >> "$top/times.txt"
done
cat "$top/times.txt"
if [ -n "$failed" ]; then
  die "failed:$failed; the clone, cache and logs are kept in $top"
fi
if [ "${KEEP:-0}" = 1 ]; then
  log "kept $top"
else
  # the Go module cache is read-only on disk
  chmod -R u+w "$top" 2>/dev/null || true
  rm -rf --one-file-system "$top"
fi
