"""Types of the compiled merge kernel (`_kernel.c`); see kernel.py for how it is used."""

from typing_extensions import Buffer

def available() -> bool:
    """This CPU can run merge_rows and widen (AVX2, FMA and F16C)."""

def merge_rows(w: Buffer, dtype: int, b: Buffer, b_row: int, b_col: int, panels: Buffer, rows: int, r: int, n: int,
               scale: float, round_delta: bool, out: Buffer) -> int:
    """out = round(w + scale * (b @ a)) for `rows` rows; returns the number of groups with a non-finite sum."""

def pack(a: Buffer, a_row: int, a_col: int, r: int, n: int) -> bytearray:
    """a (r x n fp32, strides in elements) in merge_rows' panel layout."""

def widen(src: Buffer, dtype: int, dst: Buffer) -> None:
    """bf16/f16/f32 -> fp32, exactly."""

def count_nonfinite(src: Buffer, dtype: int) -> int:
    """The number of NaN/Inf values (dtype 0 bf16, 1 f16, 2 f32, 3 f64)."""
