#!/usr/bin/env bash
# CPU vs GPU merge on a ~7B-shaped random bf16 checkpoint; prints GB/s and the ratio to a copy.
# Needs: an NVIDIA GPU, a CUDA build of torch, ~30 GB free under $WORK (default /tmp), ~5 minutes.
#   bash benchmarks/gpu_bench.sh            # full 7B shape (32 layers)
#   LAYERS=4 bash benchmarks/gpu_bench.sh   # a quick smaller run
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import rslora_tools" 2>/dev/null || pip install -q -e .
exec python benchmarks/gpu_bench.py
