#!/usr/bin/env bash
# proto.sh: regenerate the agent API (agent/api/v1) with pinned generators.
#   hack/proto.sh          regenerate in place
#   hack/proto.sh --check  fail if the committed code differs from a fresh generation
# protoc comes from Debian (protobuf-compiler); protoc-gen-go and protoc-gen-go-ttrpc are
# built from the Go proxy at the versions in lib.sh and cached by version.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

BIN=$VMPOD_CACHE/tools/proto-$PROTOC_GEN_GO_VERSION-$TTRPC_VERSION
if [ ! -x "$BIN/protoc-gen-go-ttrpc" ]; then
  log "building protoc-gen-go $PROTOC_GEN_GO_VERSION, protoc-gen-go-ttrpc $TTRPC_VERSION"
  mkdir -p "$BIN.tmp"
  GOBIN=$BIN.tmp CGO_ENABLED=0 go install google.golang.org/protobuf/cmd/protoc-gen-go@"$PROTOC_GEN_GO_VERSION"
  GOBIN=$BIN.tmp CGO_ENABLED=0 go install github.com/containerd/ttrpc/cmd/protoc-gen-go-ttrpc@"$TTRPC_VERSION"
  publish "$BIN.tmp" "$BIN"
fi
command -v protoc >/dev/null || die "protoc missing: run hack/install-deps.sh"

gen() { # gen OUTDIR
  PATH=$BIN:$PATH protoc -I "$VMPOD_ROOT/agent/api/v1" \
    --go_out="$1" --go_opt=paths=source_relative \
    --go-ttrpc_out="$1" --go-ttrpc_opt=paths=source_relative \
    "$VMPOD_ROOT/agent/api/v1/agent.proto"
}

if [ "${1:-}" = --check ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  gen "$tmp"
  for f in agent.pb.go agent_ttrpc.pb.go; do
    cmp -s "$tmp/$f" "$VMPOD_ROOT/agent/api/v1/$f" || die "agent/api/v1/$f is stale: run make proto"
  done
  log "generated code is up to date"
else
  gen "$VMPOD_ROOT/agent/api/v1"
  log "generated agent/api/v1"
fi
