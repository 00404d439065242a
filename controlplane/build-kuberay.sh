#!/usr/bin/env bash
# Build the real KubeRay operator from its Go module at a pinned release, and
# expose the CRDs that ship in the same module (config/crd/bases), for
# tests/test_kuberay_operator.py.  Same conventions as controlplane/build.sh.
#
# Resolution order:
#   1. $KUBERAY_ASSETS, when it holds `kuberay-operator` and `crd/` with the
#      three CRD YAMLs: used as is, nothing is built.
#   2. The cache dir
#        ${LLM_GATEWAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway}/kuberay/ray-operator-<KUBERAY_VERSION>/
#      when it already holds both (a rerun is instant).
#   3. Otherwise the operator is built into that cache dir with the Go
#      toolchain and the CRD YAMLs are copied there from the module cache.
#
# The directory is printed as the LAST line of stdout:
#   <dir>/kuberay-operator
#   <dir>/crd/ray.io_rayclusters.yaml, ray.io_rayjobs.yaml, ray.io_rayservices.yaml
# Everything else (progress, build logs) goes to stderr.
set -euo pipefail

# ---- pinned version ----------------------------------------------------------
KUBERAY_VERSION="${KUBERAY_VERSION:-v1.5.0}"   # github.com/ray-project/kuberay/ray-operator
KUBERAY_MODULE="github.com/ray-project/kuberay/ray-operator"
# Go language line for the throwaway module, as in ray-operator's go.mod.
KUBERAY_GO_LINE="1.24.0"
# ------------------------------------------------------------------------------

log() { echo "[controlplane/build-kuberay.sh] $*" >&2; }

CRDS=(ray.io_rayclusters.yaml ray.io_rayjobs.yaml ray.io_rayservices.yaml)

have_all() {
    local d="$1"
    [[ -x "$d/kuberay-operator" ]] || return 1
    for c in "${CRDS[@]}"; do [[ -f "$d/crd/$c" ]] || return 1; done
}

# 1. KUBERAY_ASSETS
if [[ -n "${KUBERAY_ASSETS:-}" ]]; then
    if have_all "$KUBERAY_ASSETS"; then
        log "using KUBERAY_ASSETS=$KUBERAY_ASSETS"
        echo "$KUBERAY_ASSETS"
        exit 0
    fi
    log "KUBERAY_ASSETS=$KUBERAY_ASSETS lacks kuberay-operator and/or crd/*.yaml; ignoring it"
fi

CACHE_ROOT="${LLM_GATEWAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway}"
OUT_DIR="$CACHE_ROOT/kuberay/ray-operator-${KUBERAY_VERSION}"

# 2. cached
if have_all "$OUT_DIR"; then
    log "operator and CRDs already in $OUT_DIR"
    echo "$OUT_DIR"
    exit 0
fi

# 3. build
GO="${GO:-}"
if [[ -z "$GO" ]]; then
    if command -v go >/dev/null 2>&1; then
        GO="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    else
        log "no Go toolchain found (set KUBERAY_ASSETS to a dir with kuberay-operator and crd/, or install Go)"
        exit 2
    fi
fi

mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if have_all "$OUT_DIR"; then   # built by whoever held the lock before us
    log "operator and CRDs already in $OUT_DIR"
    echo "$OUT_DIR"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-kuberay-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

export CGO_ENABLED=0
export GOFLAGS=-mod=mod
export GOTOOLCHAIN=local

log "go: $("$GO" version)"
log "building $KUBERAY_MODULE@$KUBERAY_VERSION into $OUT_DIR; this takes a while on a small machine"
T0=$SECONDS

# The module's own source dir in the module cache (CRDs live there too).
MOD_DIR="$("$GO" mod download -json "$KUBERAY_MODULE@$KUBERAY_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
if [[ -z "$MOD_DIR" || ! -d "$MOD_DIR/config/crd/bases" ]]; then
    log "could not download $KUBERAY_MODULE@$KUBERAY_VERSION (or it has no config/crd/bases)"
    exit 1
fi

# Throwaway main module that requires ray-operator and builds its main package
# (the module root).  ray-operator's go.mod has no replace directives, so its
# requirements resolve as they are; `go mod tidy` fills go.sum.
mkdir -p "$WORK/op"
cat >"$WORK/op/go.mod" <<EOF
module llmgateway.local/kuberay/operator

go $KUBERAY_GO_LINE

require $KUBERAY_MODULE $KUBERAY_VERSION
EOF
cat >"$WORK/op/tools.go" <<EOF
//go:build tools

// Keeps the operator's main package in the module graph for \`go mod tidy\`.
package tools

import _ "$KUBERAY_MODULE"
EOF
(
    cd "$WORK/op"
    "$GO" mod tidy >&2
    "$GO" build -trimpath -ldflags="-s -w" \
        -o "$OUT_DIR/kuberay-operator.tmp" "$KUBERAY_MODULE" >&2
)

mkdir -p "$OUT_DIR/crd"
for c in "${CRDS[@]}"; do
    install -m 0644 "$MOD_DIR/config/crd/bases/$c" "$OUT_DIR/crd/$c"
done
echo "$KUBERAY_VERSION" >"$OUT_DIR/VERSION"
mv -f "$OUT_DIR/kuberay-operator.tmp" "$OUT_DIR/kuberay-operator"
log "kuberay-operator built in $((SECONDS - T0))s"
echo "$OUT_DIR"
