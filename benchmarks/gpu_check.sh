#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no network there): builds the merge kernel in place,
# runs the tests that a different CPU and a GPU can break (the C kernel against torch on that
# CPU's BLAS, PEFT equality, --device cuda), then the GPU benchmark (benchmarks/gpu_bench.py).
# Everything is printed and, when $OUT is set, also written to $OUT/gpu_check.log.
#   bash benchmarks/gpu_check.sh              # LAYERS=32: the 7B shape
set -uo pipefail
cd "$(dirname "$0")/.."
exec > >(tee "${OUT:-/tmp}/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_XET=1 PYTHONPATH="$PWD"
PY=${PYTHON:-python3}
echo "== machine"
nproc; grep -m1 "model name" /proc/cpuinfo; grep -ow "avx512f\|avx2\|fma\|f16c" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY - <<'PYEOF'
import torch, importlib.metadata as md
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())
print([l.strip()[:80] for l in torch.__config__.show().splitlines() if "BLAS_INFO" in l or "CPU capability" in l])
for name in ("peft", "transformers", "safetensors", "huggingface_hub", "click", "tqdm"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
PYEOF
echo "== build the merge kernel in place"
$PY setup.py -q build_ext --inplace 2>&1 | tail -3
$PY -c "from rslora_tools import kernel; print('merge kernel available:', kernel.available())"
echo "== tests"
timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider tests/compute/test_kernel.py tests/merge/test_merge_matrix.py \
    tests/gpu/test_cuda.py 2>&1 | tail -25
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-330}" $PY benchmarks/gpu_bench.py
echo "== done"
