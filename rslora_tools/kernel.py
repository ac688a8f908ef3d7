"""The C merge kernel (`_kernel.c`): exact merges of linear LoRA weights without torch.

Most of a merge is `W += s * (B @ A)` on bf16/fp16/fp32 linear weights. The kernel does it for a
block of rows in one cache-friendly pass, bit for bit as PEFT does it with torch on CPU. `handles`
says which tensors it takes; every other tensor (and every tensor when the kernel was not built,
the CPU lacks AVX2/FMA/F16C, or RSLORA_TOOLS_KERNEL=0) is computed with torch by delta.py.
A merge whose tensors all go through the kernel never imports torch.
"""

from __future__ import annotations

import os
from types import ModuleType

from .plan import TensorPlan

DTYPE_CODES = {"BF16": 0, "F16": 1, "F32": 2}
_NONFINITE_CODES = {**DTYPE_CODES, "F64": 3}
# torch's CPU sgemm (MKL) sums the rank in one in-order chain of FMAs, as the kernel does, for
# ranks up to 192 and matrices of at least 4 x 16 (measured); past that it blocks the rank or
# takes other kernels, whose rounding differs. The kernel keeps well inside that region.
MAX_RANK = 128
MIN_DIM = 16

_module: ModuleType | None | bool = False  # False: not loaded yet


def _kernel() -> ModuleType | None:
    global _module
    if _module is False:
        try:
            from . import _kernel as compiled  # type: ignore[attr-defined]
        except ImportError:  # built without a C compiler
            compiled = None
        _module = compiled
    return _module  # type: ignore[return-value]


def available() -> bool:
    """Whether merges can use the kernel here (built, CPU able, not switched off)."""
    if os.environ.get("RSLORA_TOOLS_KERNEL", "1") == "0":
        return False
    compiled = _kernel()
    return compiled is not None and compiled.available()


def handles(t: TensorPlan, base_dtype: str, adapter_dtypes: dict[str, str], adapter_shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether the kernel computes this tensor exactly: a plain linear LoRA merge, same dtype in and out."""
    op = t.lora
    if op is None or op.kind != "linear" or op.dora or op.transpose or op.experts != 1:
        return False
    if t.source is None or t.replacement is not None or t.bias_of is not None or t.tokens is not None:
        return False
    if t.dtype != base_dtype or t.dtype not in DTYPE_CODES or len(t.shape) != 2 or min(t.shape) < MIN_DIM:
        return False
    a_key, b_key = op.module.a_key, op.module.b_key
    if a_key is None or b_key is None or a_key not in adapter_dtypes or b_key not in adapter_dtypes:
        return False
    if adapter_dtypes[a_key] not in DTYPE_CODES or adapter_dtypes[b_key] not in DTYPE_CODES:
        return False
    rank = adapter_shapes[a_key][0]
    rows, cols = t.shape
    return (1 <= rank <= MAX_RANK and adapter_shapes[a_key] == (rank, cols) and adapter_shapes[b_key] == (rows, rank)
            and available())


def widen(data: bytes | bytearray | memoryview, dtype: str) -> bytearray:
    """bf16/fp16/fp32 bytes as fp32 bytes (exact), as PEFT upcasts half-precision adapter weights."""
    code = DTYPE_CODES[dtype]
    out = bytearray(len(data) // (4 if dtype == "F32" else 2) * 4)
    _kernel().widen(data, code, out)  # type: ignore[union-attr]
    return out


def merge_rows(w: memoryview, dtype: str, b: memoryview, a: bytearray, rows: int, rank: int, cols: int,
               scale: float, out: memoryview) -> bool:
    """out = round(w + scale * (b @ a)) for `rows` rows; False when a sum is not finite (use torch instead)."""
    bad = _kernel().merge_rows(w, DTYPE_CODES[dtype], b, a, rows, rank, cols, scale, out)  # type: ignore[union-attr]
    return bad == 0


def count_nonfinite(data: bytes | bytearray | memoryview, dtype: str) -> int | None:
    """NaN/Inf values in raw float bytes; None when the compiled module is missing or the dtype is not a float."""
    compiled = _kernel()
    if compiled is None or dtype not in _NONFINITE_CODES:
        return None
    return compiled.count_nonfinite(data, _NONFINITE_CODES[dtype])
