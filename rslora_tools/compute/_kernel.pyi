"""Types of the compiled merge kernel (`_kernel.c`); see kernel.py for how it is used."""

from typing_extensions import Buffer

def available() -> bool:
    """This CPU can run merge_rows and widen (AVX2, FMA and F16C)."""

def merge_rows(
    w: Buffer,
    dtype: int,
    b: Buffer,
    b_row: int,
    b_col: int,
    panels: Buffer,
    rows: int,
    r: int,
    n: int,
    scale: float,
    round_delta: bool,
    out: Buffer,
) -> int:
    """out = round(w + scale * (b @ a)) for `rows` rows; returns the number of groups with a non-finite sum."""

def pack(a: Buffer, a_row: int, a_col: int, r: int, n: int) -> bytearray:
    """a (r x n fp32, strides in elements) in merge_rows' panel layout."""

def widen(src: Buffer, dtype: int, dst: Buffer) -> None:
    """bf16/f16/f32 -> fp32, exactly."""

def count_nonfinite(src: Buffer, dtype: int) -> int:
    """The number of NaN/Inf values (dtype 0 bf16, 1 f16, 2 f32, 3 f64)."""

def block_absmax(w: Buffer, dtype: int, blocksize: int, absmax: Buffer) -> int:
    """absmax (fp32) = max |w| per block of `blocksize`; returns the number of blocks holding NaN/Inf."""

def simulate_4bit(
    w: Buffer,
    dtype: int,
    blocksize: int,
    first_block: int,
    absmax: Buffer,
    scale: Buffer,
    code: Buffer,
    midpoints: Buffer,
    out: Buffer,
    use_avx512: bool = True,
) -> None:
    """bitsandbytes' 4-bit quantization of w and its dequantization with `scale`, rounded to dtype, into out
    (16 lanes where the CPU has AVX-512 and use_avx512, else 8: the same bits)."""

def quant_norms(w: Buffer, q: Buffer, m: Buffer, dtype: int, have_m: bool) -> tuple[float, float, float]:
    """(sum w^2, sum (q - w)^2, sum (m - q)^2) in double; m is ignored unless have_m."""

def dequant_rows(
    q: Buffer, lut: Buffer, scales: Buffer, per_row: bool, rows: int, cols: int, dtype: int, out: Buffer
) -> int:
    """out = round(lut[q] * scale) in dtype, one fp32 scale per column (or per row); returns non-finite results."""

def quantize_fp8_band(
    m: Buffer,
    start: Buffer,
    have_start: bool,
    rows: int,
    cols: int,
    block_cols: int,
    dtype: int,
    mode: int,
    lut: Buffer,
    codes: Buffer,
    inv: Buffer,
) -> tuple[int, tuple[float, float, float]]:
    """transformers' Fp8Quantize of one block row of m: codes, fp32 inverse scales per block; non-finite count and
    the requantization sums (|start|^2, |dequantized - m|^2, |m - start|^2) when have_start."""

def dequant_mxfp4(blocks: Buffer, scales: Buffer, rows: int, groups: int, dtype: int, out: Buffer) -> int:
    """MXFP4 rows (16 bytes and one e8m0 scale per group of 32 values) into dtype; returns non-finite results."""

def quantize_mxfp4_rows(
    m: Buffer, start: Buffer, have_start: bool, rows: int, cols: int, dtype: int, blocks: Buffer, scales: Buffer
) -> tuple[int, tuple[float, float, float]]:
    """MXFP4 of (out, in) rows, groups of 32 (scales rounded up); non-finite count and requantization sums."""
