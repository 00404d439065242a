#!/usr/bin/env bash
# Build kube-apiserver and etcd from Go modules for the test control plane
# (the controller-runtime "envtest" pattern), or reuse existing binaries.
#
# Resolution order:
#   1. $KUBEBUILDER_ASSETS, when it holds both kube-apiserver and etcd: used
#      as is, nothing is built.
#   2. The cache dir
#        ${LLM_GATEWAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway}/envtest/k8s-<K8S_VERSION>-etcd-<ETCD_VERSION>/
#      when it already holds both binaries (a rerun is instant).
#   3. Otherwise both are built into that cache dir with the Go toolchain.
#
# The directory with the binaries is printed as the LAST line of stdout;
# everything else (progress, build logs) goes to stderr.
set -euo pipefail

# ---- pinned versions -------------------------------------------------------
K8S_VERSION="${K8S_VERSION:-v1.34.4}"     # k8s.io/kubernetes
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"   # go.etcd.io/etcd/server/v3
# Go language version / GODEBUG defaults for the throwaway k8s module, as in
# k8s.io/kubernetes' own go.mod at K8S_VERSION.
K8S_GO_LINE="1.24.0"
K8S_GODEBUG_DEFAULT="go1.24"
# ---------------------------------------------------------------------------

log() { echo "[controlplane/build.sh] $*" >&2; }

# 1. KUBEBUILDER_ASSETS
if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    if [[ -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/etcd" ]]; then
        log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
        echo "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks kube-apiserver and/or etcd; ignoring it"
fi

CACHE_ROOT="${LLM_GATEWAY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llm-gateway}"
OUT_DIR="$CACHE_ROOT/envtest/k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}"

have_both() { [[ -x "$OUT_DIR/kube-apiserver" && -x "$OUT_DIR/etcd" ]]; }

# 2. cached
if have_both; then
    log "binaries already built in $OUT_DIR"
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
        log "no Go toolchain found (set KUBEBUILDER_ASSETS to a dir with kube-apiserver and etcd, or install Go)"
        exit 2
    fi
fi

mkdir -p "$OUT_DIR"

# Serialise concurrent builds (e.g. several pytest sessions starting at once).
exec 9>"$OUT_DIR/.build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if have_both; then   # built by whoever held the lock before us
    log "binaries already built in $OUT_DIR"
    echo "$OUT_DIR"
    exit 0
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llm-gateway-envtest-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

export CGO_ENABLED=0
export GOFLAGS=-mod=mod
export GOTOOLCHAIN=local
# Keep GOMODCACHE/GOCACHE at their defaults so that reruns are fast.

log "go: $("$GO" version)"
log "building into $OUT_DIR (k8s $K8S_VERSION, etcd $ETCD_VERSION); this takes a while on a small machine"
T_ALL=$SECONDS

# ---- etcd ------------------------------------------------------------------
if [[ ! -x "$OUT_DIR/etcd" ]]; then
    T0=$SECONDS
    mkdir -p "$WORK/etcd"
    cat >"$WORK/etcd/main.go" <<'EOF'
// Throwaway main for the etcd server (same as go.etcd.io/etcd/v3's main.go).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
EOF
    cat >"$WORK/etcd/go.mod" <<EOF
module llmgateway.local/envtest/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
    (
        cd "$WORK/etcd"
        "$GO" mod tidy >&2
        "$GO" build -trimpath \
            -ldflags="-s -w" \
            -o "$OUT_DIR/etcd.tmp" . >&2
    )
    mv -f "$OUT_DIR/etcd.tmp" "$OUT_DIR/etcd"
    log "etcd built in $((SECONDS - T0))s"
fi

# ---- kube-apiserver ----------------------------------------------------------
if [[ ! -x "$OUT_DIR/kube-apiserver" ]]; then
    T0=$SECONDS
    mkdir -p "$WORK/k8s"
    # Staging modules: k8s.io/kubernetes requires them at v0.0.0 and replaces
    # them with ./staging/src/...; a consumer must replace each with the
    # published v0.<minor>.<patch> instead.
    STAGING_VERSION="v0.${K8S_VERSION#v1.}"
    K8S_MOD="$("$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    if [[ -z "$K8S_MOD" || ! -f "$K8S_MOD" ]]; then
        log "could not download go.mod of k8s.io/kubernetes@$K8S_VERSION"
        exit 1
    fi
    STAGING_MODULES="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$K8S_MOD" | sort -u)"
    {
        echo "module llmgateway.local/envtest/k8s"
        echo
        echo "go $K8S_GO_LINE"
        echo
        echo "godebug default=$K8S_GODEBUG_DEFAULT"
        echo
        echo "require k8s.io/kubernetes $K8S_VERSION"
        echo
        echo "replace ("
        for m in $STAGING_MODULES; do
            # Only modules k8s.io/kubernetes actually requires need a replace
            # (sample-* etc. are not all published).
            if grep -Eq "^[[:space:]]+${m//./\\.} v0\.0\.0([[:space:]]|$)" "$K8S_MOD"; then
                echo "	$m => $m $STAGING_VERSION"
            fi
        done
        echo ")"
    } >"$WORK/k8s/go.mod"
    cat >"$WORK/k8s/tools.go" <<'EOF'
//go:build tools

// Keeps the command package in the module graph for `go mod tidy`.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF
    log "k8s go.mod:"; sed 's/^/    /' "$WORK/k8s/go.mod" >&2
    BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    MINOR="${K8S_VERSION#v1.}"; MINOR="${MINOR%%.*}"
    VPKG=k8s.io/component-base/version
    LDFLAGS="-s -w"
    LDFLAGS+=" -X $VPKG.gitVersion=$K8S_VERSION -X $VPKG.gitMajor=1 -X $VPKG.gitMinor=$MINOR"
    LDFLAGS+=" -X $VPKG.gitTreeState=clean -X $VPKG.buildDate=$BUILD_DATE"
    (
        cd "$WORK/k8s"
        "$GO" mod tidy >&2
        "$GO" build -trimpath \
            -ldflags="$LDFLAGS" \
            -o "$OUT_DIR/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
    )
    mv -f "$OUT_DIR/kube-apiserver.tmp" "$OUT_DIR/kube-apiserver"
    log "kube-apiserver built in $((SECONDS - T0))s"
fi

log "build finished in $((SECONDS - T_ALL))s"
"$OUT_DIR/etcd" --version >&2 || true
"$OUT_DIR/kube-apiserver" --version >&2 || true
echo "$OUT_DIR"
