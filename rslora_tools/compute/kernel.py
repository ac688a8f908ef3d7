"""The C merge kernel (`_kernel.c`), exact merges of linear and embedding LoRA without torch.

Most of a merge is `W += s * (B @ A)` on bf16/fp16/fp32 linear (and embedding) weights. The
kernel does it for a block of rows in one cache-friendly pass, bit for bit as PEFT does it with
torch on CPU (docs/peft-rules.md, "Rounding"). `supports` says which tensors it can compute;
the executor's lowering decides, and every other tensor (and every tensor when the kernel was
not built, the CPU lacks AVX2/FMA/F16C, or RSLORA_TOOLS_KERNEL=0) is computed with torch by
compute/torch_ops.py. A merge whose tensors all go through the kernel never imports torch.
"""

from __future__ import annotations

import functools
import os
import struct
from types import ModuleType

from ..formats.quant import FOUR_BIT_CODES

DTYPE_CODES = {"BF16": 0, "F16": 1, "F32": 2}
FLOAT8_DTYPES = ("F8_E4M3", "F8_E5M2")
_NONFINITE_CODES = {**DTYPE_CODES, "F64": 3}
# torch's CPU sgemm (MKL) sums the rank in one in-order chain of FMAs, as the kernel does, for
# ranks up to 192 and matrices of at least 4 x 16 (measured); past that it blocks the rank or
# takes other kernels, whose rounding differs. The kernel keeps well inside that region.
MAX_RANK = 128
MIN_DIM = 16

_module: ModuleType | None | bool = False  # False: not loaded yet


def _kernel() -> ModuleType | None:
    """The compiled module, or None when it was not built (no C compiler at install time)."""
    global _module
    if _module is False:
        try:
            from . import _kernel as compiled
        except ImportError:
            _module = None
        else:
            _module = compiled
    assert not isinstance(_module, bool)
    return _module


def _loaded() -> ModuleType:
    compiled = _kernel()
    if compiled is None:
        raise RuntimeError("the merge kernel is not built")
    return compiled


def available() -> bool:
    """Whether merges can use the kernel here (built, CPU able, not switched off)."""
    if os.environ.get("RSLORA_TOOLS_KERNEL", "1") == "0":
        return False
    compiled = _kernel()
    return compiled is not None and compiled.available()


def supports(
    *,
    layer: str,
    transposed: bool,
    dtype: str,
    start_dtype: str,
    shape: tuple[int, ...],
    a_dtype: str,
    b_dtype: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> bool:
    """Whether the kernel computes this merge exactly: plain linear (or Conv1D) or embedding LoRA, same dtype in and
    out.

    `start_dtype` is the dtype of the value the delta is added to (the base tensor, or the adapter's
    replacement); `dtype` the output's.
    """
    if layer not in ("linear", "embedding") or dtype != start_dtype or dtype not in DTYPE_CODES:
        return False
    if len(shape) != 2 or min(shape) < MIN_DIM or a_dtype not in DTYPE_CODES or b_dtype not in DTYPE_CODES:
        return False
    rank = a_shape[0]
    rows, cols = shape
    if layer == "linear" and not transposed:  # W (out, in) += B (out, r) @ A (r, in)
        shapes_fit = a_shape == (rank, cols) and b_shape == (rows, rank)
    else:  # embedding W (vocab, dim), Conv1D W (in, out): += (B (cols, r) @ A (r, rows)).T
        shapes_fit = a_shape == (rank, rows) and b_shape == (cols, rank)
    return 1 <= rank <= MAX_RANK and shapes_fit and available()


def widen(data: bytes | bytearray | memoryview, dtype: str) -> bytearray:
    """bf16/fp16/fp32 bytes as fp32 bytes (exact), as PEFT upcasts half-precision adapter weights."""
    code = DTYPE_CODES[dtype]
    out = bytearray(len(data) // (4 if dtype == "F32" else 2) * 4)
    _loaded().widen(data, code, out)
    return out


class Operands:
    """One tensor's LoRA factors (fp32) as the kernel reads them for W's rows.

    Linear: W (out, in) += s * B @ A, row i takes B[i, :] and A. Embedding, and Conv1D
    (`transposed`, W is (in, out)): W += s * (B @ A).T, row v takes A[:, v] and B.T. PEFT's
    Embedding merge rounds that delta to W's dtype before adding it.
    """

    def __init__(
        self, kind: str, a: bytearray, b: bytearray, rank: int, rows: int, cols: int, transposed: bool = False
    ):
        self.rank, self.cols = rank, cols
        self.round_delta = kind == "embedding"
        if kind == "linear" and not transposed:
            self.left, self.left_strides = memoryview(b), (rank, 1)  # row i: B[i, k]
            right, right_strides = a, (cols, 1)  # A[k, j]
        else:
            self.left, self.left_strides = memoryview(a), (1, rows)  # row v: A[k, v]
            right, right_strides = b, (1, rank)  # B[j, k]
        self.panels = _loaded().pack(right, *right_strides, rank, cols)


def merge_rows(
    w: memoryview, dtype: str, operands: Operands, start: int, rows: int, scale: float, out: memoryview
) -> bool:
    """out = W + scale * delta for `rows` rows from row `start`; False when a sum is not finite (use torch instead)."""
    o = operands
    left = o.left[start * o.left_strides[0] * 4 :]
    bad = _loaded().merge_rows(
        w, DTYPE_CODES[dtype], left, *o.left_strides, o.panels, rows, o.rank, o.cols, scale, o.round_delta, out
    )
    return bad == 0


def count_nonfinite(data: bytes | bytearray | memoryview, dtype: str) -> int | None:
    """NaN/Inf values in raw float bytes; None when the compiled module is missing or the dtype is not a float."""
    compiled = _kernel()
    if compiled is None or dtype not in _NONFINITE_CODES:
        return None
    return compiled.count_nonfinite(data, _NONFINITE_CODES[dtype])


def quantizes(*, method: str, blocksize: int, dtype: str, shape: tuple[int, ...]) -> bool:
    """Whether the kernel quantizes this weight as bitsandbytes does: 4-bit, 2-D, rows made of whole blocks."""
    return (
        method in FOUR_BIT_CODES
        and dtype in DTYPE_CODES
        and len(shape) == 2
        and shape[1] % blocksize == 0
        and blocksize % 8 == 0
        and available()
    )


def block_absmax(data: memoryview, dtype: str, blocksize: int, out: memoryview) -> int:
    """absmax (fp32) of each block of `blocksize` elements into `out`; returns the number of non-finite blocks."""
    bad: int = _loaded().block_absmax(data, DTYPE_CODES[dtype], blocksize, out)
    return bad


@functools.cache
def _four_bit_tables(method: str) -> tuple[bytes, bytes]:
    """(code sorted, the 15 midpoints between neighbours) as fp32, computed as bitsandbytes computes them in torch:
    code / max |code| and (a + b) / 2, each rounded to fp32 (exact through float64 for these operations)."""

    def f32(x: float) -> float:
        return float(struct.unpack("f", struct.pack("f", x))[0])

    data = [f32(v) for v in FOUR_BIT_CODES[method]]
    top = max(abs(v) for v in data)
    code = sorted(f32(v / top) for v in data)
    midpoints = [f32(f32(a + b) / 2) for a, b in zip(code, code[1:])]
    return struct.pack("16f", *code), struct.pack("15f", *midpoints)


def simulate_4bit(
    data: memoryview,
    dtype: str,
    method: str,
    blocksize: int,
    first_block: int,
    absmax: memoryview,
    scale: memoryview,
    out: memoryview,
    *,
    wide: bool = True,
) -> None:
    """out = bitsandbytes' 4-bit quantization of `data` (its blocks from `first_block` on, with `absmax`), dequantized
    with `scale` (the absmax values, double quantized or not) and rounded to `dtype`. AVX-512 where the CPU has it
    (and `wide`), else AVX2: the same bits (the tests check both)."""
    code, midpoints = _four_bit_tables(method)
    _loaded().simulate_4bit(
        data, DTYPE_CODES[dtype], blocksize, first_block, absmax, scale, code, midpoints, out, wide
    )


def quant_norms(
    w: memoryview, quantized: memoryview, merged: memoryview | None, dtype: str
) -> tuple[float, float, float]:
    """Squared norms for the merge report: (|W|^2, |Wq - W|^2, |merged - Wq|^2), W the original weight block."""
    sums: tuple[float, float, float] = _loaded().quant_norms(
        w, quantized, merged if merged is not None else w, DTYPE_CODES[dtype], merged is not None
    )
    return sums


def _float8_value(byte: int, exponent_bits: int, bias: int) -> float:
    """The value of a float8 code: e4m3fn (no infinities; S.1111.111 is NaN) or e5m2 (IEEE-like)."""
    mantissa_bits = 7 - exponent_bits
    sign = -1.0 if byte & 0x80 else 1.0
    exponent = (byte >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = byte & ((1 << mantissa_bits) - 1)
    top = (1 << exponent_bits) - 1
    if exponent_bits == 4 and exponent == top and mantissa == (1 << mantissa_bits) - 1:
        return float("nan")
    if exponent_bits == 5 and exponent == top:
        return float("nan") if mantissa else sign * float("inf")
    if exponent == 0:
        return sign * mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
    return sign * (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)


@functools.cache
def float8_table(dtype: str) -> bytes:
    """The 256 values of a float8 format (F8_E4M3 or F8_E5M2) as fp32, by code."""
    bits, bias = (4, 7) if dtype == "F8_E4M3" else (5, 15)
    return struct.pack("256f", *(_float8_value(b, bits, bias) for b in range(256)))


def dequant_rows(
    codes: memoryview,
    fp8: str,
    scales: bytes | memoryview,
    per_row: bool,
    rows: int,
    cols: int,
    dtype: str,
    out: memoryview,
) -> bool:
    """out = float8 value * scale in fp32, rounded once to `dtype` (one fp32 scale per column, or per row); False when
    a value is not finite (use torch, whose NaN encodings this does not reproduce)."""
    bad: int = _loaded().dequant_rows(codes, float8_table(fp8), scales, per_row, rows, cols, DTYPE_CODES[dtype], out)
    return bad == 0


FP8_SCALE_MODES = {"F32": 0, "U8": 1, "F8_E8M0": 1, "BF16": 2}  # stored weight_scale_inv dtype -> quantize_fp8_band


def quantize_fp8_band(
    merged: memoryview,
    start: memoryview | None,
    rows: int,
    cols: int,
    block_cols: int,
    dtype: str,
    scale_dtype: str,
    codes: memoryview,
    inv: memoryview,
) -> tuple[float, float, float] | None:
    """transformers' Fp8Quantize of one block row (`rows` rows) of a merged weight into e4m3 `codes` and one fp32
    inverse scale per block (`inv`); with `start` (the weight before the merge) the requantization sums (|start|^2,
    |dequantized - merged|^2, |merged - start|^2). None when a value is not finite (use torch)."""
    bad, sums = _loaded().quantize_fp8_band(
        merged,
        start if start is not None else merged,
        start is not None,
        rows,
        cols,
        block_cols,
        DTYPE_CODES[dtype],
        FP8_SCALE_MODES[scale_dtype],
        float8_table("F8_E4M3"),
        codes,
        inv,
    )
    return None if bad else sums


def dequant_mxfp4(blocks: memoryview, scales: memoryview, rows: int, groups: int, dtype: str, out: memoryview) -> bool:
    """MXFP4 rows (out, in / 32 groups) dequantized into `dtype` (out, in), as transformers computes them; False when
    a value is not finite or a scale is at the range's ends (use torch)."""
    bad: int = _loaded().dequant_mxfp4(blocks, scales, rows, groups, DTYPE_CODES[dtype], out)
    return bad == 0


def quantize_mxfp4_rows(
    merged: memoryview,
    start: memoryview | None,
    rows: int,
    cols: int,
    dtype: str,
    blocks: memoryview,
    scales: memoryview,
) -> tuple[float, float, float] | None:
    """triton_kernels' downcast_to_mxfp_torch (scales rounded up) of (out, in) rows into `blocks` and `scales`; with
    `start`, the requantization sums. None when a value is not finite (use torch)."""
    bad, sums = _loaded().quantize_mxfp4_rows(
        merged,
        start if start is not None else merged,
        start is not None,
        rows,
        cols,
        DTYPE_CODES[dtype],
        blocks,
        scales,
    )
    return None if bad else sums
