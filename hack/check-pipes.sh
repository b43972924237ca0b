#!/usr/bin/env bash
# check-pipes.sh: no early-closing reader after a pipe in the scripts `make test` runs.
#
# Under `set -o pipefail`, `producer | head -1` (or `| grep -q`, `| sed ...q`) fails when the
# reader exits before the producer has written everything: the producer dies of SIGPIPE and
# the pipeline's status is 141. It only shows when the producer writes more than the reader
# takes, often only on a cold path (a first build), which is how `make test` failed on every
# fresh machine (issue 15). Read the whole output instead: capture it ($(...)), then match;
# `sed -n 1p` and `grep ... >/dev/null` read to the end. A line that is safe for a reason says
# so in a `# pipefail-ok: <reason>` comment on the same line.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$VMPOD_ROOT"

files=(hack/*.sh runtimeclass/*.sh Makefile .ci/run)
pattern='\|[[:space:]]*(head|tail -n *\+?[0-9]*q|grep[[:space:]]+(-[a-zA-Z]*[qm]|--quiet|--max-count)|sed[[:space:]][^|]*[0-9/}]q|awk[[:space:]][^|]*exit)'
# comments (from a '#' that starts a word to the end of the line) are not code
found=$(awk -v pat="$pattern" '
  /pipefail-ok:/ { next }
  { code = $0; sub(/(^|[[:space:]])#.*/, "", code); if (code ~ pat) printf "%s:%d: %s\n", FILENAME, FNR, $0 }
' "${files[@]}")
if [ -n "$found" ]; then
  printf '%s\n' "$found" >&2
  die "an early-closing reader after a pipe (above): read the whole output, or say why it is safe with '# pipefail-ok: <reason>'"
fi
log "no early-closing readers after pipes in ${#files[@]} scripts"
