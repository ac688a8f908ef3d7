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
  packed as its pack_to_int32 does;
- MXFP4 (transformers 5.25's quantize_to_mxfp4: triton_kernels' downcast_to_mxfp_torch on the bf16 weight, scales
  rounded up): per expert and output row, groups of 32 inputs, amax / 6 in float32 rounded up to a power of two
  (its exponent is the e8m0 byte), each value times 1 / that scale rounded to the nearest e2m1 value (ties to
  even, above 6 saturating), two per byte, the first in the low nibble;
- compressed-tensors NVFP4 (its generate_gparam, calculate_qparams with float8 scales, and the CPU quantize and
  pack path): global scale = 448 * 6 / amax of the tensor (in the weight's dtype), per 16 inputs the local scale
  global * amax / 6 rounded to float8 e4m3 (0 becomes 0.125), codes x / (local / global) rounded to e2m1 (ties to
  even) with torch.sign's sign, two per byte, the first in the low nibble.
`requantize` returns the new stored tensors by role; the side tensors (activation scales) do not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.quant import QuantizedWeight
from ..formats.safetensors_file import safetensors_to_torch_dtype
from ..plan.tensors import FusedGroup, TensorPlan

Reader = Callable[[str], torch.Tensor]


StoredLayout = dict[str, tuple[torch.dtype, tuple[int, ...]]]  # role -> (dtype, shape) of the base's stored tensor


def requantize(
    stored: QuantizedWeight, merged: torch.Tensor, layout: StoredLayout, global_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The merged weight in `stored`'s format: role -> new tensor, in the dtypes and shapes the base stores them;
    `global_scale`: NVFP4, its fused group's (else the weight's own)."""
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
        packed, scale, zero = quantize_ct_int(
            merged, stored.scheme.bits, stored.scheme.blocksize, stored.scheme.sym, dtype
        )
        out = {"weight_packed": packed, "weight_scale": scale.reshape(shape)}
        return out | ({"weight_zero_point": zero} if zero is not None else {})
    if method == "ct_nvfp4":
        packed, scale, global_scale = quantize_nvfp4(merged, global_scale)
        return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": global_scale}
    if method == "mxfp4":
        blocks, scales = quantize_mxfp4(merged)
        return {"blocks": blocks, "scales": scales}
    raise AssertionError(f"no quantizer for {method}")


def stored_layout(stored: QuantizedWeight, checkpoint: Checkpoint) -> StoredLayout:
    """The dtype and shape of each stored tensor of a quantized weight, from the checkpoint's headers."""
    return {
        role: (safetensors_to_torch_dtype(checkpoint.info(name).dtype), checkpoint.info(name).shape)
        for role, name in stored.parts.items()
    }


def requantized(
    stored: QuantizedWeight,
    merged: torch.Tensor,
    layout: StoredLayout,
    read_base: Reader,
    global_scale: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the new stored tensors by role, what they dequantize to in merged's dtype): what the output holds, and what
    a loader makes of it."""
    from .quantization import dequantize_stored

    parts = requantize(stored, merged, layout, global_scale)
    written = {stored.parts[role]: tensor for role, tensor in parts.items()}
    back = dequantize_stored(stored, lambda name: written[name] if name in written else read_base(name))
    return parts, back.to(merged.dtype)


@dataclass
class KeptWeight:
    """One weight of a --keep-quantization merge: its stored tensors by role; the merged weight, what the stored
    tensors dequantize to, and the dequantized base it started from (all three None where the stored tensors are
    copied as they are; `start` None where the adapter replaces the whole weight)."""

    parts: dict[str, torch.Tensor]
    merged: torch.Tensor | None = None
    back: torch.Tensor | None = None
    start: torch.Tensor | None = None


def kept_weight(
    t: TensorPlan,
    checkpoint: Checkpoint,
    read_base: Reader,
    read_adapter: Reader,
    global_scales: dict[int, torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> KeptWeight:
    """--keep-quantization of one weight: merged in its compute dtype (on `device`) and quantized back on the CPU; an
    NVFP4 weight with the global scale of its fused group (`global_scales` caches them by group), a member the
    adapter leaves unchanged copied as it is where the group's scale is the one it is stored with."""
    from .torch_ops import merged_tensor, quantized_base

    q = t.quant
    assert q is not None and q.keep is not None and q.stored is not None
    fused = q.keep.fused
    global_scale = None
    if fused is not None:
        cache = global_scales if global_scales is not None else {}
        if id(fused) not in cache:
            cache[id(fused)] = fused_global_scale(fused, read_base, read_adapter, device)
        global_scale = cache[id(fused)]
        own = read_base(q.stored.parts["weight_global_scale"]).to(torch.float32).reshape(1)
        if not t.changed and torch.equal(own, global_scale):
            return KeptWeight({role: read_base(name) for role, name in q.stored.parts.items()})
    compute = safetensors_to_torch_dtype(q.keep.dtype)
    start = quantized_base(t, read_base).to(compute) if t.replacement is None else None
    merged = merged_tensor(
        t, read_base, read_adapter, compute, device, base=start.to(device, copy=True) if start is not None else None
    ).cpu()
    parts, back = requantized(q.stored, merged, stored_layout(q.stored, checkpoint), read_base, global_scale)
    return KeptWeight(parts, merged, back, start)


def fused_global_scale(
    group: FusedGroup, read_base: Reader, read_adapter: Reader, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The one NVFP4 global scale of a fused group after the merge, as llm-compressor sets it
    (update_fused_layer_weight_global_scales: the members' smallest): a changed member's is compressed-tensors'
    generate_gparam of its merged weight, an unchanged member's the one it is stored with."""
    from .torch_ops import merged_tensor

    scales = []
    for member in group.members:
        q = member.quant
        assert q is not None and q.keep is not None and q.stored is not None
        if member.changed:
            merged = merged_tensor(member, read_base, read_adapter, safetensors_to_torch_dtype(q.keep.dtype), device)
            scales.append(nvfp4_global_scale(merged.cpu()))
        else:
            scales.append(read_base(q.stored.parts["weight_global_scale"]).to(torch.float32).reshape(1))
    return torch.min(torch.cat(scales)).reshape(1)


_SAMPLED_EXPERTS = 4  # a fused expert tensor's requantization error is measured on this many experts, spread out


def requantization_error(
    t: TensorPlan, checkpoint: Checkpoint, files: CheckpointFiles, read_adapter: Reader
) -> tuple[float, float, float]:
    """requantization_norms of one quantized weight the adapter changes (a dry run's sample; an as-trained merge's
    measure of what keeping the format would cost); a fused expert tensor on a few of its experts."""
    from ..plan.quantization import by_expert
    from .quantization import dequantize_expert
    from .torch_ops import adapter_weight, merged_expert, merged_tensor, quantized_base

    q = t.quant
    assert q is not None and q.stored is not None
    compute = safetensors_to_torch_dtype(q.keep.dtype if q.keep is not None else t.dtype)
    if q.keep is not None and q.keep.fused is not None:  # NVFP4 with its fused group's global scale
        kept = kept_weight(t, checkpoint, files.read, read_adapter)
        if kept.merged is None or kept.back is None or kept.start is None:
            return 0.0, 0.0, 0.0
        return requantization_norms(kept.merged, kept.back, kept.start)
    if not by_expert(t, checkpoint):
        start = quantized_base(t, files.read).to(compute)
        merged = merged_tensor(t, files.read, read_adapter, compute, base=start.clone())
        _, back = requantized(q.stored, merged, stored_layout(q.stored, checkpoint), files.read)
        return requantization_norms(merged, back, start)
    experts = q.stored.shape[0]
    factors = {
        key: adapter_weight(read_adapter, key, torch.device("cpu"))
        for op in t.all_lora
        for key in (op.module.a_key, op.module.b_key)
    }
    layout = {role: (dtype, (1, *shape[1:])) for role, (dtype, shape) in stored_layout(q.stored, checkpoint).items()}
    sums = [0.0, 0.0, 0.0]
    for expert in sorted({round(i * (experts - 1) / max(1, _SAMPLED_EXPERTS - 1)) for i in range(_SAMPLED_EXPERTS)}):
        start = dequantize_expert(q.stored, files.read_slice, expert).to(compute)
        merged = merged_expert(t, expert, start.clone(), factors).unsqueeze(0)
        _, back = requantized(q.stored, merged, layout, lambda name: files.read_slice(name, expert).unsqueeze(0))
        sums = [a + b for a, b in zip(sums, requantization_norms(merged, back, start.unsqueeze(0)))]
    return sums[0], sums[1], sums[2]


_UE8M0 = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))


def quantize_fp8_blocks(
    w: torch.Tensor, block: tuple[int, int] | None, fp8: torch.dtype, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Fp8Quantize on (..., rows, cols), a band of block rows at a time: (codes, weight_scale_inv)."""
    *lead, rows, cols = w.shape
    bm, bn = block if block is not None else (rows, cols)
    fmax = torch.finfo(fp8).max
    q = torch.empty(w.shape, dtype=fp8)
    grid = (-(-rows // bm), -(-cols // bn))
    inv_all = torch.empty((*lead, *grid), dtype=torch.float32)
    for i in range(grid[0]):
        band = w[..., i * bm : (i + 1) * bm, :].to(torch.float32)
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
        q[..., i * bm : (i + 1) * bm, :] = codes.reshape(*lead, band.shape[-2], grid[1] * bn)[..., :cols]
        inv_all[..., i, :] = inv
    if scale_dtype == torch.uint8:  # ue8m0 as bytes: the biased exponent
        return q, (torch.log2(inv_all).round() + 127).to(torch.uint8)
    return q, inv_all.to(scale_dtype)


def quantize_ct_fp8(
    w: torch.Tensor, per_row: bool, fp8: torch.dtype, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
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


def requantization_norms(
    merged: torch.Tensor, dequantized: torch.Tensor, start: torch.Tensor
) -> tuple[float, float, float]:
    """(|start|^2, |Q(M) - M|^2, |M - start|^2): the requantization error of a merged weight M against the delta the
    merge added to the weight it started from (the same triple as torch_ops.quantization_norms). Norms in float32
    (a statistic for the report), squared in double."""
    m, s = merged.float(), start.float()
    norms = (
        torch.linalg.vector_norm(s),
        torch.linalg.vector_norm(dequantized.float() - m),
        torch.linalg.vector_norm(m - s),
    )
    w, e, d = (float(n) ** 2 for n in norms)
    return w, e, d


def quantize_ct_int(
    w: torch.Tensor, bits: int, group: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """compressed-tensors' round-to-nearest INT quantization of a (rows, cols) weight, packed: (words, scale, packed
    zero points or None)."""
    x = w.to(scale_dtype)
    rows, cols = x.shape
    size = group if group > 0 else cols
    groups = x.unflatten(-1, (cols // size, size))
    lo, hi = groups.amin(-1), groups.amax(-1)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    qmin, qmax = (
        torch.tensor(-(1 << (bits - 1)), dtype=torch.float32),
        torch.tensor((1 << (bits - 1)) - 1, dtype=torch.float32),
    )
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


_E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between 0, .5, 1, 1.5, 2, 3, 4, 6


def quantize_mxfp4(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An (E, in, out) expert parameter as MXFP4: (blocks (E, out, in / 32, 16) uint8, scales (E, out, in / 32))."""
    experts, inputs, outputs = param.shape
    x = (
        param.to(torch.bfloat16)
        .transpose(1, 2)
        .to(torch.float32)
        .contiguous()
        .reshape(experts, outputs, inputs // 32, 32)
    )
    amax = x.abs().amax(dim=-1, keepdim=True)
    bits = (amax / 6.0).view(torch.int32)
    rounded = ((bits + 0x007FFFFF) & 0x7F800000).view(torch.float32)  # up to a power of two (the exponent kept)
    step = torch.where(rounded == 0, torch.zeros_like(rounded), 1.0 / rounded)
    q = x * step
    magnitude = q.abs()
    code = torch.bucketize(magnitude, _E2M1_MIDPOINTS)  # a tie goes to the lower code here
    tie = (code < 7) & (magnitude == _E2M1_MIDPOINTS[code.clamp(max=6)]) & (code % 2 == 1)
    code = (code + tie.to(code.dtype)) | torch.where(torch.signbit(q), 8, 0)
    pairs = code.to(torch.uint8).reshape(experts, outputs, inputs // 32, 16, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (rounded.view(torch.int32) >> 23).to(torch.uint8).squeeze(-1)
    return blocks, scales


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' generate_gparam of a weight: 448 * 6 / its largest |value| (in its dtype), float32 (1,)."""
    lo, hi = torch.aminmax(w)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    top = torch.clamp(torch.max(torch.abs(lo), torch.abs(hi)), min=torch.finfo(w.dtype).tiny)
    return torch.nan_to_num(448.0 * 6.0 / top, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (rows, cols) weight as compressed-tensors NVFP4: (packed uint8 (rows, cols / 2), float8 scales (rows,
    cols / 16), float32 global scale (1,)); `global_scale`: its fused group's (else its own, nvfp4_global_scale)."""
    rows, cols = w.shape
    global_scale = nvfp4_global_scale(w) if global_scale is None else global_scale.to(torch.float32).reshape(1)
    groups = w.unflatten(-1, (cols // 16, 16))
    glo, ghi = groups.amin(-1), groups.amax(-1)
    glo, ghi = torch.min(glo, torch.zeros_like(glo)), torch.max(ghi, torch.zeros_like(ghi))
    local = torch.max(torch.abs(glo), torch.abs(ghi)) / (torch.tensor(12.0).to(glo.dtype) / 2)
    fp8 = torch.float8_e4m3fn
    scale = torch.clamp(global_scale * local, torch.finfo(fp8).min, torch.finfo(fp8).max).to(fp8).to(torch.float32)
    scale = torch.where(scale == 0, torch.tensor(0.125, dtype=scale.dtype), scale)
    scaled = torch.clamp(groups / (scale / global_scale).unsqueeze(-1), -6.0, 6.0)
    values = (_round_e2m1(scaled.abs()) * torch.sign(scaled)).flatten(-2).to(w.dtype)
    sign = torch.signbit(values).to(torch.uint8)
    doubled = (values * 2).to(torch.int8).abs()
    codes = torch.zeros_like(doubled, dtype=torch.uint8)
    for code, twice in enumerate((1, 2, 3, 4, 6, 8), start=1):
        codes[doubled == twice] = code
    codes[doubled >= 12] = 7
    codes = (codes | (sign << 3)).reshape(-1, 2)
    return (codes[:, 0] | (codes[:, 1] << 4)).reshape(rows, cols // 2), scale.to(fp8), global_scale


def _round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """|values| to the nearest e2m1 magnitude, ties to the even code (compressed-tensors' cast_to_fp4 thresholds)."""
    out = torch.full_like(x, 6.0)
    for bound, value, inclusive in (
        (5.0, 4.0, True),
        (3.5, 3.0, False),
        (2.5, 2.0, True),
        (1.75, 1.5, False),
        (1.25, 1.0, True),
        (0.75, 0.5, False),
        (0.25, 0.0, True),
    ):
        out = torch.where(x <= bound if inclusive else x < bound, value, out)
    return out
