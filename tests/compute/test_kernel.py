"""The C merge kernel against torch: the same bits as PEFT's `W += (B @ A) * s` wherever it is used."""

from __future__ import annotations

import os

import pytest
import torch

from rslora_tools.compute import kernel
from rslora_tools.formats.safetensors_file import tensor_bytes

needs_kernel = pytest.mark.skipif(not kernel.available(), reason="merge kernel not built or CPU without AVX2/FMA/F16C")


def test_kernel_is_built_where_it_can_be():
    """A machine with a C compiler and an AVX2/FMA/F16C CPU gets the kernel (so the tests below do run)."""
    import platform
    import shutil

    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    if not (
        shutil.which("cc")
        and platform.machine() == "x86_64"
        and all(f" {f} " in flags for f in ("avx2", "fma", "f16c"))
    ):
        pytest.skip("no C compiler or CPU without AVX2/FMA/F16C here")
    if os.environ.get("RSLORA_TOOLS_KERNEL") == "0":
        pytest.skip("RSLORA_TOOLS_KERNEL=0")
    assert kernel.available()


DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def peft_merge(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's Linear.merge on CPU: fp32 delta = (B @ A) * s, then W += delta (one rounding)."""
    w = w.clone()
    w += (b.float() @ a.float()) * s
    return w


def kernel_merge(
    w: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    s: float,
    block: int | None = None,
    kind: str = "linear",
    transposed: bool = False,
) -> tuple[torch.Tensor, bool]:
    """The kernel over row blocks of `block` rows (all rows at once by default)."""
    dtype = next(k for k, v in DTYPES.items() if v == w.dtype)
    a32 = kernel.widen(tensor_bytes(a), next(k for k, v in DTYPES.items() if v == a.dtype))
    b32 = kernel.widen(tensor_bytes(b), next(k for k, v in DTYPES.items() if v == b.dtype))
    out = torch.empty_like(w)
    rows, cols = w.shape
    operands = kernel.Operands(kind, a32, b32, a.shape[0], rows, cols, transposed)
    block = block or rows
    finite = True
    for start in range(0, rows, block):
        n = min(block, rows - start)
        finite &= kernel.merge_rows(
            tensor_bytes(w[start : start + n]), dtype, operands, start, n, s, tensor_bytes(out[start : start + n])
        )
    return out, finite


def peft_embedding_merge(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's Embedding.merge on CPU: delta = (B @ A).T * s in fp32, cast to W's dtype, then added."""
    w = w.clone()
    w += ((b.float() @ a.float()).T * s).to(w.dtype)
    return w


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rank", [1, 3, 8, 16, 17, 32, 64, 100, 128])
def test_kernel_equals_torch(dtype, rank):
    g = torch.Generator().manual_seed(rank)
    for rows, cols in [(16, 16), (16, 45), (33, 100), (256, 2048), (2048, 256), (100, 1000)]:
        for s in (8.0, 0.123456789, 2 / 3**0.5, 1 / 16):
            w = (torch.randn(rows, cols, generator=g) * 0.02).to(DTYPES[dtype])
            a = torch.randn(rank, cols, generator=g) * 0.02
            b = torch.randn(rows, rank, generator=g) * 0.02
            got, finite = kernel_merge(w, b, a, s, block=7)
            assert finite
            assert torch.equal(got, peft_merge(w, b, a, s)), (dtype, rank, rows, cols, s)


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kernel_special_values(dtype):
    """Subnormals, zeros, values that round across a binade or overflow the output dtype."""
    g = torch.Generator().manual_seed(5)
    rows, cols, rank = 64, 80, 8
    tiny = torch.finfo(DTYPES[dtype]).tiny
    big = torch.finfo(DTYPES[dtype]).max
    w = torch.randn(rows, cols, generator=g)
    w[0] = tiny * torch.rand(cols, generator=g)  # subnormal base weights
    w[1] = 0.0
    w[2] = -0.0
    w[3] = big * 0.999  # near the largest value: the delta may round to inf
    w = w.to(DTYPES[dtype])
    a = torch.randn(rank, cols, generator=g)
    b = torch.randn(rows, rank, generator=g) * 1e-3
    b[4] = 0.0  # an untrained row: the weight must come back unchanged
    b[5] = 1e-30  # subnormal products
    for s in (1.0, 3.0, 1e-20):
        got, _ = kernel_merge(w, b, a, s)
        assert torch.equal(got, peft_merge(w, b, a, s))


@needs_kernel
def test_adapter_in_half_precision_is_upcast_exactly():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 64, generator=g).bfloat16()
    for adapter_dtype in (torch.bfloat16, torch.float16):
        a = (torch.randn(16, 64, generator=g) * 0.1).to(adapter_dtype)
        b = (torch.randn(64, 16, generator=g) * 0.1).to(adapter_dtype)
        got, _ = kernel_merge(w, b, a, 2.0)
        assert torch.equal(got, peft_merge(w, b, a, 2.0))


@needs_kernel
def test_nonfinite_sums_are_reported():
    w = torch.ones(16, 16, dtype=torch.bfloat16)
    w[3, 5] = float("inf")
    a, b = torch.ones(4, 16), torch.ones(16, 4)
    _, finite = kernel_merge(w, b, a, 1.0)
    assert not finite
    w[3, 5] = float("nan")
    assert not kernel_merge(w, b, a, 1.0)[1]
    w[3, 5] = 1.0
    assert kernel_merge(w, b, a, 1.0)[1]


@needs_kernel
def test_count_nonfinite():
    for dtype in ("BF16", "F16", "F32"):
        t = torch.zeros(100, dtype=DTYPES[dtype])
        t[[3, 50, 99]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=DTYPES[dtype])
        assert kernel.count_nonfinite(tensor_bytes(t), dtype) == 3
    assert kernel.count_nonfinite(tensor_bytes(torch.tensor([1.0, float("nan")], dtype=torch.float64)), "F64") == 1


@needs_kernel
def test_bad_buffers_raise_instead_of_crashing():
    w = bytearray(16 * 16 * 2)
    with pytest.raises(ValueError):  # A too small for 1 x 16
        kernel.Operands("linear", bytearray(4), bytearray(16 * 4), 1, 16, 16)
    operands = kernel.Operands("linear", bytearray(16 * 4), bytearray(4), 1, 16, 16)
    with pytest.raises(ValueError):  # B too small for 16 rows
        kernel.merge_rows(memoryview(w), "BF16", operands, 0, 16, 1.0, memoryview(bytearray(16 * 16 * 2)))
    operands = kernel.Operands("linear", bytearray(16 * 4), bytearray(16 * 4), 1, 16, 16)
    with pytest.raises(ValueError):
        kernel.merge_rows(memoryview(w), "BF16", operands, 0, 16, 1.0, memoryview(bytearray(10)))


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rank", [1, 8, 16, 33, 128])
def test_embedding_mode_equals_peft(dtype, rank):
    """Embedding LoRA: W (vocab, dim) += ((B @ A).T * s) rounded to W's dtype first, as PEFT's Embedding merge."""
    g = torch.Generator().manual_seed(rank)
    for vocab, dim in [(16, 16), (1000, 48), (300, 2048)]:
        for s in (8.0, 0.123456789, 1e-3):
            w = (torch.randn(vocab, dim, generator=g) * 0.02).to(DTYPES[dtype])
            a = torch.randn(rank, vocab, generator=g)  # lora_embedding_A
            b = torch.randn(dim, rank, generator=g) * 0.02  # lora_embedding_B
            got, finite = kernel_merge(w, b, a, s, block=37, kind="embedding")
            assert finite
            assert torch.equal(got, peft_embedding_merge(w, b, a, s)), (dtype, rank, vocab, dim, s)


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_conv1d_layout_equals_peft(dtype):
    """GPT-2's Conv1D (fan_in_fan_out): W (in, out) += (B @ A).T * s in fp32, rounded once."""
    g = torch.Generator().manual_seed(3)
    for rank in (1, 16, 64):
        for fan_in, fan_out in [(16, 16), (48, 144), (768, 2304)]:
            w = (torch.randn(fan_in, fan_out, generator=g) * 0.02).to(DTYPES[dtype])
            a = torch.randn(rank, fan_in, generator=g) * 0.02
            b = torch.randn(fan_out, rank, generator=g) * 0.02
            expected = w.clone()
            expected += (b @ a).T * 2.5
            got, finite = kernel_merge(w, b, a, 2.5, block=29, transposed=True)
            assert finite and torch.equal(got, expected), (dtype, rank, fan_in, fan_out)
