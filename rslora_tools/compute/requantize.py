"""Merged weights quantized back into their base's format (`merge --keep-quantization`), and its error.

Each quantizer is the one the format's own library applies to a full-precision weight, op for op
(docs/quantization.md, "Keeping the base's format"):
- block-scaled FP8 (transformers 5.25's Fp8Quantize): per block the largest |value| in float32, the
  scale 448 / amax (1 for an all-zero block), the stored `weight_scale_inv` = float32(1 / scale); ue8m0
  scales rounded up to a power of two first and the scale taken back from them; then
  clamp(value * scale, -448, 448) cast to float8. Blocks at the right and bottom edges are partial: their
  amax is over the values they hold (transformers 5.25 leaves such a weight unquantized);
- compressed-tensors float-quantized FP8 (0.20.1's calculate_qparams and _quantize): in the scale's dtype,
  per output row (strategy channel) or for the tensor, amax = max(|min(x, 0)|, max(x, 0)), scale = amax /
  448 (a zero scale becomes the dtype's eps), then clamp(x / scale, -448, 448) cast to float8;
- compressed-tensors pack-quantized INT4/INT8 (the same functions, round to nearest): per group (or row) in the
  scale's dtype, symmetric: scale = amax / ((qmax - qmin) / 2); asymmetric: scale = (max - min) / (qmax - qmin),
  zero point round(clamp(qmin - min / scale, qmin, qmax)); codes round(clamp(x / scale + zero, qmin, qmax)),
  packed as its pack_to_int32 does.
`requantize` returns the new stored tensors by role; the side tensors (activation scales) do not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..formats.checkpoint import Checkpoint
from ..formats.quant import QuantizedWeight
from ..formats.safetensors_file import safetensors_to_torch_dtype
from ..plan.tensors import TensorPlan

Reader = Callable[[str], torch.Tensor]


StoredLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # role -> (dtype, shape) of the base's stored tensor


def requantize(stored: QuantizedWeight, merged: torch.Tensor, layout: StoredLayout) -> dict[str, torch.Tensor]:
    """The merged weight in `stored`'s format: role -> new tensor, in the dtypes and shapes the base stores them."""
    method = stored.scheme.method
    if method == "fp8":
        q, scale_inv = quantize_fp8_blocks(merged, stored.scheme.block, layout["weight"][0], layout["scale_inv"][0])
        return {"weight": q, "scale_inv": scale_inv.reshape(layout["scale_inv"][1])}
    if method == "ct_fp8":
        dtype, shape = layout["weight_scale"]
        q, scale = quantize_ct_fp8(merged, math.prod(shape) > 1, layout["weight"][0], dtype)
        return {"weight": q, "weight_scale": scale.reshape(shape)}
    if method == "ct_int":
        dtype, shape = layout["weight_scale"]
        packed, scale, zero = quantize_ct_int(merged, stored.scheme.bits, stored.scheme.blocksize, stored.scheme.sym,
                                              dtype)
        out = {"weight_packed": packed, "weight_scale": scale.reshape(shape)}
        return out | ({"weight_zero_point": zero} if zero is not None else {})
    raise AssertionError(f"no quantizer for {method}")


def stored_layout(stored: QuantizedWeight, checkpoint: Checkpoint) -> StoredLayout:
    """The dtype and shape of each stored tensor of a quantized weight, from the checkpoint's headers."""
    return {role: (safetensors_to_torch_dtype(checkpoint.info(name).dtype), checkpoint.info(name).shape)
            for role, name in stored.parts.items()}


def requantized(stored: QuantizedWeight, merged: torch.Tensor, layout: StoredLayout,
                read_base: Reader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the new stored tensors by role, what they dequantize to in merged's dtype): what the output holds, and what
    a loader makes of it."""
    from .quantization import dequantize_stored

    parts = requantize(stored, merged, layout)
    written = {stored.parts[role]: tensor for role, tensor in parts.items()}
    back = dequantize_stored(stored, lambda name: written[name] if name in written else read_base(name))
    return parts, back.to(merged.dtype)


def requantization_error(t: TensorPlan, checkpoint: Checkpoint, read_base: Reader,
                         read_adapter: Reader) -> tuple[float, float, float]:
    """requantization_norms of one quantized weight the adapter changes (a dry run's sample; an as-trained merge's
    measure of what keeping the format would cost)."""
    from .torch_ops import merged_tensor, quantized_base

    q = t.quant
    assert q is not None and q.stored is not None
    compute = safetensors_to_torch_dtype(q.keep.dtype if q.keep is not None else t.dtype)
    start = quantized_base(t, read_base).to(compute)
    merged = merged_tensor(t, read_base, read_adapter, compute, base=start.clone())
    _, back = requantized(q.stored, merged, stored_layout(q.stored, checkpoint), read_base)
    return requantization_norms(merged, back, start)


_UE8M0 = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] | None, fp8: torch.dtype,
                        scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize on (..., rows, cols), a band of block rows at a time: (codes, weight_scale_inv)."""
    *lead, rows, cols = w.shape
    bm, bn = block if block is not None else (rows, cols)
    fmax = torch.finfo(fp8).max
    q = torch.empty(w.shape, dtype=fp8)
    grid = (-(-rows // bm), -(-cols // bn))
    inv_all = torch.empty((*lead, *grid), dtype=torch.float32)
    for i in range(grid[0]):
        band = w[..., i * bm:(i + 1) * bm, :].to(torch.float32)
        pad = grid[1] * bn - cols
        tiles = torch.nn.functional.pad(band, (0, pad)) if pad else band
        tiles = tiles.reshape(*lead, band.shape[-2], grid[1], bn)
        max_abs = tiles.abs().amax(dim=(-3, -1))  # (..., col tiles)
        safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
        scales = torch.where(max_abs > 0, fmax / safe, torch.ones_like(safe))
        inv = (1.0 / scales).to(torch.float32)
        if scale_dtype in _UE8M0:
            inv = torch.pow(2.0, torch.ceil(torch.log2(inv.clamp(min=torch.finfo(torch.float32).tiny))))
            scales = 1.0 / inv
        elif scale_dtype != torch.float32:
            inv = inv.to(scale_dtype).to(torch.float32)  # the stored scale is what dequantization multiplies by
            scales = 1.0 / inv
        scaled = tiles * scales.unsqueeze(-1).unsqueeze(-3)
        codes = torch.clamp(scaled, min=-fmax, max=fmax).to(fp8)
        q[..., i * bm:(i + 1) * bm, :] = codes.reshape(*lead, band.shape[-2], grid[1] * bn)[..., :cols]
        inv_all[..., i, :] = inv
    if scale_dtype == torch.uint8:  # ue8m0 as bytes: the biased exponent
        return q, (torch.log2(inv_all).round() + 127).to(torch.uint8)
    return q, inv_all.to(scale_dtype)


def quantize_ct_fp8(w: torch.Tensor, per_row: bool, fp8: torch.dtype,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' symmetric FP8 quantization of a (rows, cols) weight: (codes, scale (rows, 1) or (1,))."""
    x = w.to(scale_dtype)
    if per_row:
        lo, hi = torch.amin(x, dim=1, keepdim=True), torch.amax(x, dim=1, keepdim=True)
    else:
        lo, hi = torch.aminmax(x)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    fmax = torch.finfo(fp8).max
    bit_range = torch.tensor(fmax, dtype=torch.float32) - torch.tensor(-fmax, dtype=torch.float32)
    amax = torch.max(torch.abs(lo), torch.abs(hi))
    scale = amax / (bit_range.to(amax.dtype) / 2)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    if scale.ndim == 0:
        scale = scale.reshape(1)
    codes = torch.clamp(x / scale, -fmax, fmax).to(fp8)
    return codes, scale


def requantization_norms(merged: torch.Tensor, dequantized: torch.Tensor, start: torch.Tensor) -> tuple[float, float, float]:
    """(|start|^2, |Q(M) - M|^2, |M - start|^2) in double: the requantization error of a merged weight M against the
    delta the merge added to the weight it started from (the same triple as torch_ops.quantization_norms)."""
    m, q, s = merged.double(), dequantized.double(), start.double()
    return float((s * s).sum()), float(((q - m) ** 2).sum()), float(((m - s) ** 2).sum())


def quantize_ct_int(w: torch.Tensor, bits: int, group: int, symmetric: bool,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """compressed-tensors' round-to-nearest INT quantization of a (rows, cols) weight, packed: (words, scale, packed
    zero points or None)."""
    x = w.to(scale_dtype)
    rows, cols = x.shape
    size = group if group > 0 else cols
    groups = x.unflatten(-1, (cols // size, size))
    lo, hi = groups.amin(-1), groups.amax(-1)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    qmin, qmax = torch.tensor(-(1 << (bits - 1)), dtype=torch.float32), torch.tensor((1 << (bits - 1)) - 1,
                                                                                       dtype=torch.float32)
    span = qmax - qmin
    zero: torch.Tensor | None = None
    if symmetric:
        scale = torch.max(torch.abs(lo), torch.abs(hi)) / (span.to(lo.dtype) / 2)
    else:
        scale = (hi - lo) / span.to(hi.dtype)
        zero = torch.round(torch.clamp(torch.clamp(qmin - (lo / scale), qmin, qmax), -128, 127)).to(torch.int8)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype), scale)
    scaled = groups / scale.unsqueeze(-1)
    if zero is not None:
        scaled += zero.to(scaled.dtype).unsqueeze(-1)
    codes = torch.round(torch.clamp(scaled, qmin, qmax)).to(scaled.dtype).to(torch.int8).flatten(-2)
    packed_zero = pack_ct_int(zero.T.contiguous(), bits).T.contiguous() if zero is not None else None
    return pack_ct_int(codes, bits), scale, packed_zero


def pack_ct_int(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 or 8 bits: each row's values plus 2 ** (bits - 1), 32 // bits to a
    word, the first in the lowest bits; the row padded with raw zeros to whole words."""
    rows, cols = values.shape
    per_word = 32 // bits
    fields = values.to(torch.int64) + (1 << (bits - 1))
    pad = -cols % per_word
    if pad:
        fields = torch.nn.functional.pad(fields, (0, pad))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (fields.reshape(rows, -1, per_word) << shifts).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement of the low 32 bits
