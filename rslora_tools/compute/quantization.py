"""Quantized weights as the adapter saw them, dequantized (or quantized and dequantized) with torch.

The arithmetic of bitsandbytes (0.50, CPU), GPTQ and AWQ (as gptqmodel 7.7 unpacks them),
op for op, so that the values are the same bits (docs/quantization.md):
- 4-bit: code[q] * absmax in fp32, rounded once to the quant state's dtype; with double
  quantization the absmax values are first rebuilt as code8[q8] * absmax2 + offset (fp32);
- quantizing (`--trained-on`): absmax per block, x * (1 / absmax) clamped to [-1, 1], the
  nearest code by bucketize against the midpoints (bitsandbytes' torch path); double
  quantization subtracts the mean and quantizes to 8 bits through bitsandbytes' CPU lookup
  table of 65536 entries;
- int8: round(x16 * (127 / rowmax)) from the fp16 weight, and back as q * SCB * (1/127) in fp32;
- GPTQ: scales[g_idx] * (q - zeros[g_idx]) (v1 checkpoints store zeros - 1); AWQ GEMM: the same
  with AWQ's nibble order and contiguous groups;
- block-scaled FP8: q (as float32) * scale_inv of its block, in float32, the edge blocks partial (ue8m0
  scales are 2 ** (byte - 127)), as transformers 5.25's Fp8Dequantize computes it;
- compressed-tensors float-quantized FP8: q in the scale's dtype times the scale (per tensor or per output
  row), one rounding in that dtype, as compressed-tensors 0.20's `_dequantize`;
- compressed-tensors pack-quantized: the packed fields unpacked as its unpack_from_int32 does (element i of a
  row at bit i * bits, minus 2 ** (bits - 1)), then (q - zero point) * scale per group in the scale's dtype
  (compressed-tensors 0.20's `_dequantize`);
- compressed-tensors NVFP4: e2m1 values (low nibble first) in bfloat16, times (scale / global scale) in float32,
  rounded to bfloat16 (its unpack_fp4_from_uint8 and `_dequantize` with a global scale);
- MXFP4: the e2m1 value of each nibble (low nibble first) looked up in the compute dtype, times 2 ** (scale -
  127) by ldexp in that dtype, transposed to (experts, in, out), as transformers 5.25's
  convert_moe_packed_tensors does.
Every function returns a new CPU tensor in the dtype dequantization gives; the caller casts it
to the merge's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..errors import InputError
from ..formats.quant import FOUR_BIT_CODES, QuantizedWeight, QuantScheme

Reader = Callable[[str], torch.Tensor]

_INT8_STEP = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it
_LUT_SIZE = 65536


@functools.cache
def code_4bit(method: str) -> torch.Tensor:
    """The 16 values of a 4-bit code (index = stored nibble), as bitsandbytes builds them: divided by the largest."""
    data = torch.tensor(FOUR_BIT_CODES[method], dtype=torch.float32)
    return data.div_(data.abs().max())


@functools.cache
def _sorted_4bit(method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, midpoints): bitsandbytes' quantize_4bit picks the code `order[bucketize(x, midpoints)]`."""
    code = code_4bit(method)
    order = torch.argsort(code)  # FP4 has two zeros: torch's own order of equal values decides, as in bitsandbytes
    return order, (code[order[:-1]] + code[order[1:]]) / 2


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (create_dynamic_map()), used for double quantization."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _lookup_table() -> torch.Tensor:
    """bitsandbytes' CPU quantize_blockwise table: for 65536 steps over [-1, 1], the index of the nearest code."""
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    steps = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, steps, side="left")


def _blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full blocks (rows of a view) and the remainder (None when the length divides evenly)."""
    full = flat.numel() - flat.numel() % blocksize
    rest = flat[full:] if full < flat.numel() else None
    return flat[:full].view(-1, blocksize), rest


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values * absmax of each block of `blocksize` (fp32; the last block may be short)."""
    body, rest = _blocks(values, blocksize)
    nblocks = body.shape[0]
    out = (body * absmax[:nblocks].view(-1, 1)).reshape(-1)
    if rest is not None:
        out = torch.cat([out, rest * absmax[nblocks]])
    return out


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """bitsandbytes' dequantize_blockwise: code[q] * absmax of the block, fp32."""
    return _scale_blocks(code[q.reshape(-1).long()], absmax, blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU quantize_blockwise with the dynamic code: (codes uint8, absmax per block).

    Per block: absmax = max |x|; a zero block gives code 0; else the code of x * (1 / absmax)
    through the lookup table, at index trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5).
    """
    flat = x.reshape(-1).float()
    nblocks = -(flat.numel() // -blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - flat.numel())).view(nblocks, blocksize)
    absmax = padded.abs().max(dim=1).values
    scaled = (padded * (1.0 / absmax).view(-1, 1)).reshape(-1)[: flat.numel()]
    index = ((scaled.clamp(-1.0, 1.0) + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _lookup_table()[index]
    zero = (absmax == 0).repeat_interleave(blocksize)[: flat.numel()]
    return torch.where(zero, 0, codes).to(torch.uint8), absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, method: str, blocksize: int, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit: two codes per byte (high nibble first), code * absmax in fp32, one rounding."""
    data = packed.reshape(-1).view(torch.uint8)
    n = 1
    for d in shape:
        n *= d
    nibbles = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n]
    values = code_4bit(method)[nibbles.long()]
    return _scale_blocks(values, absmax.float(), blocksize).to(dtype).reshape(shape)


def dequantize_stored(stored: QuantizedWeight, read: Reader) -> torch.Tensor:
    """A quantized weight of a checkpoint, dequantized as its library does (in `stored.dtype`)."""
    method = stored.scheme.method
    if method in ("nf4", "fp4"):
        return _dequantize_bnb4(stored, read)
    if method == "int8":
        return dequantize_int8(read(stored.parts["weight"]), read(stored.parts["SCB"]))
    if method == "gptq":
        return dequantize_gptq(stored, read)
    if method == "fp8":
        return dequantize_fp8(read(stored.parts["weight"]), read(stored.parts["scale_inv"]), stored.scheme.block)
    if method == "ct_fp8":
        scale = read(stored.parts["weight_scale"])
        q = read(stored.parts["weight"])
        return q.to(scale.dtype) * (scale.reshape(()) if scale.numel() == 1 else scale)
    if method == "mxfp4":
        return dequantize_mxfp4(read(stored.parts["blocks"]), read(stored.parts["scales"]), _TORCH[stored.dtype])
    if method == "ct_int":
        recorded = tuple(int(d) for d in read(stored.parts["weight_shape"]).tolist())
        if recorded != stored.shape:
            raise InputError(
                f"{stored.parts['weight_shape']} says {list(recorded)}, but the packed weight and its "
                f"scales are {list(stored.shape)}; the compressed-tensors checkpoint is corrupt (or, "
                "streamed, a per-channel weight whose inputs are not a multiple of 32 / bits: merge it "
                "without [[stream=StreamOptions()]])"
            )
        zero = read(stored.parts["weight_zero_point"]) if "weight_zero_point" in stored.parts else None
        return dequantize_ct_int(
            read(stored.parts["weight_packed"]),
            read(stored.parts["weight_scale"]),
            zero,
            stored.shape,
            stored.scheme.bits,
        )
    if method == "ct_nvfp4":
        return dequantize_nvfp4(
            read(stored.parts["weight_packed"]),
            read(stored.parts["weight_scale"]),
            read(stored.parts["weight_global_scale"]),
        )
    return dequantize_awq(stored, read)


def dequantize_expert(
    stored: QuantizedWeight, read_slice: Callable[[str, int], torch.Tensor], expert: int
) -> torch.Tensor:
    """Expert `expert` of a quantized fused expert tensor (MXFP4, or FP8 with a leading expert dimension), dequantized
    as the whole tensor would be: the same values, one expert's memory."""

    def one(name: str) -> torch.Tensor:
        return read_slice(name, expert).unsqueeze(0)

    if stored.scheme.method == "mxfp4":
        blocks, scales = one(stored.parts["blocks"]), one(stored.parts["scales"])
        fast = _mxfp4_by_kernel(blocks[0], scales[0], stored.dtype)
        return fast if fast is not None else dequantize_mxfp4(blocks, scales, _TORCH[stored.dtype])[0]
    return dequantize_fp8(one(stored.parts["weight"]), one(stored.parts["scale_inv"]), stored.scheme.block)[0]


def _mxfp4_by_kernel(blocks: torch.Tensor, scales: torch.Tensor, dtype: str) -> torch.Tensor | None:
    """One expert's MXFP4 (R, G, 16) -> (G * 32, R) through the C kernel: the same values as dequantize_mxfp4 (the
    tests check every scale), several times faster; None when the kernel cannot (then torch)."""
    from . import kernel

    if not kernel.available() or dtype not in kernel.DTYPE_CODES:
        return None
    rows, groups, _ = blocks.shape
    out = torch.empty(rows, groups * 32, dtype=_TORCH[dtype])
    if not kernel.dequant_mxfp4(_bytes(blocks), _bytes(scales), rows, groups, dtype, _bytes(out)):
        return None
    return out.T.contiguous()


def _bytes(t: torch.Tensor) -> memoryview:
    from ..formats.safetensors_file import tensor_bytes

    return tensor_bytes(t.contiguous())


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """Block-scaled FP8: each value times its block's scale, float32 (`block` None: one scale for the tensor)."""
    values = q.to(torch.float32)
    if scale_inv.dtype == torch.uint8:  # ue8m0 exponents stored as bytes
        scales = (scale_inv.to(torch.float32) - 127.0).exp2()
    else:
        scales = scale_inv.to(torch.float32)
    if block is None:
        return values.mul_(scales.reshape(()))
    cols = values.shape[-1]
    row_scales = scales.repeat_interleave(block[1], dim=-1)[..., :cols]  # (..., block rows, cols): small
    for i in range(row_scales.shape[-2]):  # in place, a band of rows at a time: no second weight-sized tensor
        values[..., i * block[0] : (i + 1) * block[0], :].mul_(row_scales[..., i : i + 1, :])
    return values


def unpack_ct_int(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' dense packing, undone: `count` signed values per row of int32 words, value i at bit
    i * bits of the row (straddling two words where it must), stored plus 2 ** (bits - 1). int32 result."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    start = torch.arange(count, dtype=torch.int64) * bits
    index, offset = start // 32, start % 32
    fields = w[:, index] >> offset
    straddles = offset + bits > 32
    if bool(straddles.any()):
        following = w[:, torch.clamp(index + 1, max=w.shape[1] - 1)] << (32 - offset)
        fields = torch.where(straddles, fields | following, fields)
    return ((fields & ((1 << bits) - 1)) - (1 << (bits - 1))).to(torch.int32)


def dequantize_ct_int(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, shape: tuple[int, ...], bits: int
) -> torch.Tensor:
    """compressed-tensors pack-quantized: (q - zero point) * scale per group (or row), in the scale's dtype."""
    rows, cols = shape
    q = unpack_ct_int(packed, bits, cols).to(scale.dtype)
    groups = scale.shape[-1]
    q = q.unflatten(-1, (groups, cols // groups))
    if zero is not None:  # packed along the rows: (ceil(rows * bits / 32), groups)
        zero = unpack_ct_int(zero.T.contiguous(), bits, rows).T
        q = q - zero.to(scale.dtype).unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).flatten(-2)


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors NVFP4: e2m1 value * (scale / global scale) per group of 16, in float32, to bfloat16."""
    rows = packed.shape[0]
    data = packed.to(torch.uint8).reshape(-1)
    nibbles = torch.stack((data & 0x0F, data >> 4), dim=1).reshape(-1)
    magnitude = torch.tensor(_E2M1[:8], dtype=torch.float32)[(nibbles & 0x07).long()]
    values = (magnitude * torch.where((nibbles & 0x08).bool(), -1.0, 1.0)).to(torch.bfloat16)
    step = scale.to(torch.bfloat16).unsqueeze(-1) / global_scale.to(torch.float32)
    grouped = values.reshape(rows, -1, 16).to(torch.float32) * step
    return grouped.reshape(rows, -1).to(torch.bfloat16)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MXFP4 blocks (E, R, G, 16) and e8m0 scales (E, R, G) -> the (E, G * 32, R) parameter in `dtype`."""
    experts, rows, groups, width = blocks.shape
    lut = torch.tensor(_E2M1, dtype=dtype)
    packed = blocks.to(torch.uint8).reshape(-1, width)
    out = torch.empty(packed.shape[0], width * 2, dtype=dtype)
    out[:, 0::2] = lut[(packed & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(packed >> 4).to(torch.int)]
    torch.ldexp(out, (scales.to(torch.int32) - 127).reshape(-1, 1), out=out)
    return out.reshape(experts, rows, groups * width * 2).transpose(1, 2).contiguous()


def _dequantize_bnb4(stored: QuantizedWeight, read: Reader) -> torch.Tensor:
    absmax = read(stored.parts["absmax"])
    if stored.scheme.double_quant:
        absmax = dequantize_blockwise_8bit(
            absmax,
            read(stored.parts["nested_absmax"]).float(),
            read(stored.parts["nested_quant_map"]).float(),
            stored.nested_blocksize,
        )
        absmax += torch.tensor(stored.nested_offset, dtype=torch.float32)
    dtype = _TORCH[stored.dtype]
    return dequantize_4bit(
        read(stored.parts["weight"]), absmax, stored.scheme.method, stored.scheme.blocksize, stored.shape, dtype
    )


def dequantize_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """LLM.int8: q * SCB * (1/127) per row, fp32 (bitsandbytes' int8_vectorwise_dequant)."""
    return weight * scb.view(-1, 1) * _INT8_STEP


def quantize_4bit(w: torch.Tensor, method: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' quantize_4bit (its torch path): (code index per element, absmax per block fp32)."""
    order, midpoints = _sorted_4bit(method)
    flat = w.reshape(-1).float()
    body, rest = _blocks(flat, blocksize)
    absmax = body.abs().max(dim=-1).values
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rest is not None:
        last = rest.abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(rest / last, -1, 1)])
    return order[torch.bucketize(scaled, midpoints, out_int32=True).long()], absmax


def simulate(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """What bitsandbytes makes of `w` when transformers quantizes it with `scheme`, dequantized again.

    4-bit: in w's dtype (the quant state's dtype); int8: fp32 (as int8_vectorwise_dequant gives it).
    """
    if scheme.method == "int8":
        q, scb = quantize_int8(w)
        return dequantize_int8(q, scb)
    codes, absmax = quantize_4bit(w, scheme.method, scheme.blocksize)
    if scheme.double_quant:
        absmax = double_quantized_absmax(absmax)
    values = code_4bit(scheme.method)[codes]
    return _scale_blocks(values, absmax, scheme.blocksize).to(w.dtype).reshape(w.shape)


def double_quantized_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax values as double quantization leaves them: (absmax - mean) through 8 bits, plus the mean, fp32."""
    offset = absmax.mean()
    q, absmax2 = quantize_blockwise_8bit(absmax - offset, 256)
    return dequantize_blockwise_8bit(q, absmax2, dynamic_map(), 256) + offset


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' Int8Params: the weight as fp16, row absmax (fp32), round(x * (127 / absmax)) as int8."""
    half = w.to(torch.float16)
    scb = half.abs().max(dim=1).values.float()
    return torch.round(half * (127.0 / scb.unsqueeze(-1))).to(torch.int8), scb


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their `32 // bits` fields, lowest bits first, laid out along `dim` (0: rows, 1: columns)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:  # words (R, C) -> (R * k, C)
        fields = torch.bitwise_right_shift(words.unsqueeze(1), shifts.view(1, -1, 1))
        return torch.bitwise_and(fields, (1 << bits) - 1).reshape(-1, words.shape[1])
    fields = torch.bitwise_right_shift(words.unsqueeze(2), shifts.view(1, 1, -1))  # (R, C) -> (R, C * k)
    return torch.bitwise_and(fields, (1 << bits) - 1).reshape(words.shape[0], -1)


def dequantize_gptq(stored: QuantizedWeight, read: Reader) -> torch.Tensor:
    """GPTQ: W^T = scales[g_idx] * (q - zeros[g_idx]), in the scales' dtype; returned as (out, in).

    A v1 checkpoint ("gptq") stores each zero point minus one; gptqmodel adds 0x11111111 (4-bit)
    or 0x01010101 (8-bit) to every packed word before unpacking, and so does this.
    """
    bits = stored.scheme.bits
    qzeros = read(stored.parts["qzeros"]).to(torch.int32)
    if stored.scheme.format == "gptq":
        qzeros = qzeros + (0x11111111 if bits == 4 else 0x01010101)
    scales = read(stored.parts["scales"])
    out_features, in_features = stored.shape
    zeros = _unpack(qzeros, bits, 1)[:, :out_features]
    weight = _unpack(read(stored.parts["qweight"]).to(torch.int32), bits, 0)[:in_features]
    g_idx = read(stored.parts["g_idx"]).long()  # checked against the scales by formats.quant._check_group_indices
    return (scales[g_idx] * (weight - zeros[g_idx])).T.contiguous()


_AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def dequantize_awq(stored: QuantizedWeight, read: Reader) -> torch.Tensor:
    """AWQ GEMM: fields in AWQ's order (0, 2, 4, 6, 1, 3, 5, 7 per word), (q - zeros) * scales; returned as (out,
    in)."""
    out_features, in_features = stored.shape
    scales = read(stored.parts["scales"])
    group = in_features if stored.scheme.blocksize == -1 else stored.scheme.blocksize
    weight = _awq_fields(read(stored.parts["qweight"]).to(torch.int32))[:, :out_features]
    zeros = _awq_fields(read(stored.parts["qzeros"]).to(torch.int32))[:, :out_features]
    zeros = zeros.repeat_interleave(group, dim=0)[:in_features]
    scales = scales.repeat_interleave(group, dim=0)[:in_features]
    return ((weight - zeros) * scales).T.contiguous()


def _awq_fields(words: torch.Tensor) -> torch.Tensor:
    fields = _unpack(words, 4, 1)
    order = torch.arange(fields.shape[1]).view(-1, 8)[:, _AWQ_REVERSE_ORDER].reshape(-1)
    return fields[:, order]


_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
