"""The kernel's float8 paths against the torch definitions (which tests/merge prove against transformers):
dequant_rows (every code, e4m3fn and e5m2) and quantize_fp8_band (transformers' Fp8Quantize, every scale dtype)."""

from __future__ import annotations

import struct

import pytest
import torch

from rslora_tools.compute import kernel
from rslora_tools.compute.quantization import dequantize_fp8
from rslora_tools.compute.requantize import quantize_fp8_blocks, requantization_norms

pytestmark = pytest.mark.skipif(not kernel.available(), reason="the merge kernel is not built or this CPU lacks AVX2")

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_float8_code_dequantizes_as_torch_does(fp8, dtype):
    codes = torch.arange(256, dtype=torch.uint8).repeat(3, 4)[:, :1021]  # a ragged tail: the scalar path too
    out = torch.empty(codes.shape, dtype=DTYPES[dtype])
    scales = torch.rand(codes.shape[1]) + 0.01
    assert (
        kernel.dequant_rows(
            view(codes),
            fp8,
            struct.pack(f"{codes.shape[1]}f", *scales.tolist()),
            False,
            *codes.shape,
            dtype,
            view(out),
        )
        is False
    )  # NaN codes: the caller uses torch
    torch_fp8 = torch.float8_e4m3fn if fp8 == "F8_E4M3" else torch.float8_e5m2
    expected = (codes.view(torch_fp8).float() * scales).to(DTYPES[dtype])
    finite = torch.isfinite(expected)
    assert torch.equal(
        out[finite].view(torch.uint8 if dtype == "F32" else torch.int16).float(),
        expected[finite].view(torch.uint8 if dtype == "F32" else torch.int16).float(),
    )


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    ("scale_dtype", "torch_scale"), [("F32", torch.float32), ("U8", torch.uint8), ("BF16", torch.bfloat16)]
)
def test_the_band_quantizer_is_fp8quantize(dtype, scale_dtype, torch_scale):
    torch.manual_seed(9)
    for trial in range(4):
        w = (torch.randn(48, 100) * torch.logspace(-12, 2, 100)).to(DTYPES[dtype])
        if trial % 2:
            w[:, :32] = 0  # an all-zero block: scale 1
        start = (w.float() * 0.9).to(DTYPES[dtype])
        for first in (0, 32):  # a full block row, then a partial one (16 rows); the last block is 4 columns wide
            band, before = w[first : first + 32].contiguous(), start[first : first + 32].contiguous()
            codes, inv = torch.empty(band.shape, dtype=torch.uint8), torch.empty(4, dtype=torch.float32)
            sums = kernel.quantize_fp8_band(
                view(band), view(before), band.shape[0], 100, 32, dtype, scale_dtype, view(codes), view(inv)
            )
            q, stored = quantize_fp8_blocks(band, (32, 32), torch.float8_e4m3fn, torch_scale)
            expected_inv = (stored.float() - 127).exp2() if torch_scale == torch.uint8 else stored.float()
            assert torch.equal(codes, q.view(torch.uint8)) and torch.equal(inv, expected_inv.reshape(-1))
            reference = requantization_norms(band, dequantize_fp8(q, stored, (32, 32)).to(band.dtype), before)
            assert sums == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mxfp4_through_the_kernel_is_transformers_dequantization(dtype):
    """Every scale byte and every code: the kernel's experts equal dequantize_mxfp4 (transformers' op for op); the
    top scale (255, NaN in e8m0) sends the expert to torch."""
    from rslora_tools.compute.quantization import _mxfp4_by_kernel, dequantize_mxfp4

    torch.manual_seed(10)
    blocks = torch.randint(0, 256, (255, 4, 16), dtype=torch.uint8)
    scales = torch.arange(255, dtype=torch.uint8).reshape(255, 1).repeat(1, 4)
    fast = _mxfp4_by_kernel(blocks, scales, dtype)
    assert torch.equal(
        fast.view(torch.uint8), dequantize_mxfp4(blocks[None], scales[None], DTYPES[dtype])[0].view(torch.uint8)
    )
    assert _mxfp4_by_kernel(blocks, torch.full_like(scales, 255), dtype) is None


def test_mxfp4_quantized_back_by_the_kernel_is_the_torch_quantizer():
    """The kernel's MXFP4 quantizer (keep-quantization of experts) against compute.requantize.quantize_mxfp4, which
    tests/merge/test_keep_quantization.py checks value by value: zeros, ties and tiny values included."""
    from rslora_tools.compute.requantize import quantize_mxfp4

    torch.manual_seed(11)
    param = (torch.randn(1, 256, 96) * torch.logspace(-8, 1, 96)).to(torch.bfloat16)
    param[0, :32, 0] = 0
    param[0, :32, 1] = 0
    param[0, :8, 1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * 2**-3
    param[0, 8:11, 1] = torch.tensor([-0.25, -0.0, -5.0]) * 2**-3
    expected_blocks, expected_scales = quantize_mxfp4(param)
    rows = param[0].T.contiguous()
    blocks, scales = torch.empty(96, 8, 16, dtype=torch.uint8), torch.empty(96, 8, dtype=torch.uint8)
    sums = kernel.quantize_mxfp4_rows(view(rows), view(rows), 96, 256, "BF16", view(blocks), view(scales))
    assert torch.equal(blocks, expected_blocks[0]) and torch.equal(scales, expected_scales[0])
    assert sums is not None and sums[2] == 0.0
