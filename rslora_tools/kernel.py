"""The C merge kernel (`_kernel.c`): exact merges of linear and embedding LoRA weights without torch.

Most of a merge is `W += s * (B @ A)` on bf16/fp16/fp32 linear (and embedding) weights. The
kernel does it for a block of rows in one cache-friendly pass, bit for bit as PEFT does it with
torch on CPU. `handles` says which tensors it takes; every other tensor (and every tensor when
the kernel was not built, the CPU lacks AVX2/FMA/F16C, or RSLORA_TOOLS_KERNEL=0) is computed
with torch by delta.py.
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
    """Whether the kernel computes this tensor exactly: a plain linear or embedding LoRA merge, same dtype in and out.

    `base_dtype` is the dtype of the value the delta is added to (the base tensor, or the adapter's replacement).
    """
    op = t.lora
    if op is None or op.kind not in ("linear", "embedding") or op.dora or op.experts != 1:
        return False
    if t.bias_of is not None or t.tokens is not None:
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
    if op.kind == "linear" and not op.transpose:  # W (out, in) += B (out, r) @ A (r, in)
        shapes_fit = adapter_shapes[a_key] == (rank, cols) and adapter_shapes[b_key] == (rows, rank)
    else:  # embedding W (vocab, dim), Conv1D W (in, out): += (B (cols, r) @ A (r, rows)).T
        shapes_fit = adapter_shapes[a_key] == (rank, rows) and adapter_shapes[b_key] == (cols, rank)
    return 1 <= rank <= MAX_RANK and shapes_fit and available()


def widen(data: bytes | bytearray | memoryview, dtype: str) -> bytearray:
    """bf16/fp16/fp32 bytes as fp32 bytes (exact), as PEFT upcasts half-precision adapter weights."""
    code = DTYPE_CODES[dtype]
    out = bytearray(len(data) // (4 if dtype == "F32" else 2) * 4)
    _kernel().widen(data, code, out)  # type: ignore[union-attr]
    return out


class Operands:
    """One tensor's LoRA factors (fp32) as the kernel reads them for W's rows.

    Linear: W (out, in) += s * B @ A, row i takes B[i, :] and A. Embedding, and Conv1D
    (`transposed`, W is (in, out)): W += s * (B @ A).T, row v takes A[:, v] and B.T. PEFT's
    Embedding merge rounds that delta to W's dtype before adding it.
    """

    def __init__(self, kind: str, a: bytearray, b: bytearray, rank: int, rows: int, cols: int, transposed: bool = False):
        self.rank, self.cols = rank, cols
        self.round_delta = kind == "embedding"
        if kind == "linear" and not transposed:
            self.left, self.left_strides = memoryview(b), (rank, 1)  # row i: B[i, k]
            right, right_strides = a, (cols, 1)  # A[k, j]
        else:
            self.left, self.left_strides = memoryview(a), (1, rows)  # row v: A[k, v]
            right, right_strides = b, (1, rank)  # B[j, k]
        self.panels = _kernel().pack(right, *right_strides, rank, cols)  # type: ignore[union-attr]


def merge_rows(w: memoryview, dtype: str, operands: Operands, start: int, rows: int, scale: float, out: memoryview) -> bool:
    """out = W + scale * delta for `rows` rows from row `start`; False when a sum is not finite (use torch instead)."""
    o = operands
    left = o.left[start * o.left_strides[0] * 4:]
    bad = _kernel().merge_rows(w, DTYPE_CODES[dtype], left, *o.left_strides, o.panels,  # type: ignore[union-attr]
                               rows, o.rank, o.cols, scale, o.round_delta, out)
    return bad == 0


def count_nonfinite(data: bytes | bytearray | memoryview, dtype: str) -> int | None:
    """NaN/Inf values in raw float bytes; None when the compiled module is missing or the dtype is not a float."""
    compiled = _kernel()
    if compiled is None or dtype not in _NONFINITE_CODES:
        return None
    return compiled.count_nonfinite(data, _NONFINITE_CODES[dtype])
