"""The steps the C merge kernel computes (compute/kernel.py): KERNEL a block of rows at a time, QUANT_KERNEL
(--trained-on 4-bit), DEQUANT_KERNEL (a float8 base weight, a band of rows at a time) and REQUANT_KERNEL (a
float8 weight quantized back band by band)."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator

from ..compute import kernel
from ..formats.safetensors_file import (
    DTYPE_BITS,
    read_bytes,
    read_into,
    safetensors_to_torch_dtype,
    tensor_bytes,
    write_at,
)
from ..plan.tensors import LoraOp, TensorPlan
from .lowering import BLOCK_BYTES
from .run import NonFinite, Run, Slot, Stopped, block_buffers, read_block, record

_MEASURE_EVERY = 4  # the 4-bit kernel path measures quantization_norms on every 4th block of rows


FP8_MEASURE_EVERY = 8  # an as-trained FP8 (MXFP4) merge measures requantization on every 8th block row (expert)


def _operands(run: Run, t: TensorPlan, op: LoraOp | None = None) -> kernel.Operands:
    """The LoRA factors of a tensor's op (or of `op`, one of its stacked ones), widened to fp32 and packed as the
    kernel reads them."""
    op = op or t.lora
    assert op is not None
    adapter = run.adapter
    a = kernel.widen(adapter.tensor_bytes(op.module.a_key), adapter.dtypes[op.module.a_key])
    b = kernel.widen(adapter.tensor_bytes(op.module.b_key), adapter.dtypes[op.module.b_key])
    rows, cols = t.shape
    return kernel.Operands(op.kind, a, b, adapter.shapes[op.module.a_key][0], rows, cols, op.transpose)


def with_kernel(run: Run, t: TensorPlan, slot: Slot) -> bool:
    """W + s * delta through the C kernel, a block of rows at a time; False if a sum is not finite. Stacked ops (a
    stacked merge) are applied one after another, each rounded to W's dtype, as PEFT merges them."""
    ops = t.all_lora
    adapter = run.adapter
    chain = [(_operands(run, t, op), op.scale.scale) for op in ops]
    rows, cols = t.shape
    row_bytes = cols * DTYPE_BITS[t.dtype] // 8
    step = max(1, BLOCK_BYTES // row_bytes)
    if t.replacement is not None:  # the delta goes onto the adapter's saved copy of the weight
        source_fd, source_offset = run.adapter_fd, adapter.tensor_offset(t.replacement)
        source, source_file = t.replacement, adapter.weights_path
    else:
        assert t.source is not None
        source_fd, source_offset = run.base.locate(t.source)
        source, source_file = t.source, run.base.path(t.source)
    target_offset = slot.offset
    block_in, block_out, spare = block_buffers(step * row_bytes)
    for start in range(0, rows, step):
        if run.stop.is_set():
            raise Stopped
        n = min(step, rows - start)
        size = n * row_bytes
        read_into(source_fd, source_offset + start * row_bytes, block_in[:size], f"{source!r} from {source_file}")
        now, free = block_in, block_out
        for operands, scale in chain:
            if not kernel.merge_rows(now[:size], t.dtype, operands, start, n, scale, free[:size]):
                return False
            now, free = free, (spare if free is block_out else block_out)
        write_at(slot.fd, target_offset + start * row_bytes, now[:size])
    return True


def with_quant_kernel(run: Run, t: TensorPlan, slot: Slot) -> bool:
    """--trained-on 4-bit through the kernel, a block of rows at a time: absmax of each block, quantize and
    dequantize, merge the delta (if any), write. Double quantization needs every absmax value first (their mean):
    then a first pass computes them, and torch quantizes them. False when the weight or a sum is not finite."""
    q = t.quant
    assert q is not None and t.source is not None
    blocksize = q.scheme.blocksize
    rows, cols = t.shape
    row_bytes, row_blocks = cols * DTYPE_BITS[t.dtype] // 8, cols // blocksize
    step = max(1, BLOCK_BYTES // row_bytes)
    fd, offset = run.base.locate(t.source)
    what = f"{t.source!r} from {run.base.path(t.source)}"
    block_in, block_out, merged = block_buffers(step * row_bytes)
    absmax = memoryview(bytearray(rows * row_blocks * 4))
    scale = absmax
    if q.scheme.double_quant:
        for start in range(0, rows, step):
            size = min(step, rows - start) * row_bytes
            read_block(run, fd, offset + start * row_bytes, block_in[:size], what)
            if kernel.block_absmax(block_in[:size], t.dtype, blocksize, absmax[start * row_blocks * 4 :]):
                return False
        scale = _double_quantized(absmax)
    operands = _operands(run, t) if t.lora is not None else None
    sums = [0.0, 0.0, 0.0]
    for start in range(0, rows, step):
        size = min(step, rows - start) * row_bytes
        read_block(run, fd, offset + start * row_bytes, block_in[:size], what)
        if not q.scheme.double_quant and kernel.block_absmax(
            block_in[:size], t.dtype, blocksize, absmax[start * row_blocks * 4 :]
        ):
            return False
        kernel.simulate_4bit(
            block_in[:size], t.dtype, q.scheme.method, blocksize, start * row_blocks, absmax, scale, block_out[:size]
        )
        result = block_out
        if operands is not None and t.lora is not None:
            if not kernel.merge_rows(
                block_out[:size], t.dtype, operands, start, size // row_bytes, t.lora.scale.scale, merged[:size]
            ):
                return False
            if (start // step) % _MEASURE_EVERY == 0:  # a statistic for the report: a quarter of the rows is plenty
                norms = kernel.quant_norms(block_in[:size], block_out[:size], merged[:size], t.dtype)
                sums = [a + b for a, b in zip(sums, norms)]
            result = merged
        write_at(slot.fd, slot.offset + start * row_bytes, result[:size])
    if operands is not None:
        record(run, t.name, (sums[0], sums[1], sums[2]))
    return True


def with_dequant_kernel(run: Run, t: TensorPlan, slot: Slot) -> None:
    """A float8 base weight through the kernel, a band of rows at a time (a block row of a block-scaled weight):
    codes dequantized into the merge dtype, the LoRA delta (if any) merged, written. A block-scaled weight with a
    delta also gets the report's measure, on every 8th band: how far quantizing it back would move it."""
    row_bytes = t.shape[1] * DTYPE_BITS[t.dtype] // 8
    measure = _fp8_measure(run, t)
    for index, (start, n, dequantized, merged) in enumerate(_fp8_bands(run, t, t.dtype)):
        if measure is not None and index % FP8_MEASURE_EVERY == 0:
            measure.add(n, dequantized, merged)
        write_at(slot.fd, slot.offset + start * row_bytes, merged)
    if measure is not None:
        record(run, t.name, measure.sums)


class _Fp8Requant:
    """The kernel's quantizer for a block-scaled e4m3 weight (transformers' Fp8Quantize), band by band: the codes and
    inverse scales of the last band, and the requantization sums so far."""

    def __init__(self, t: TensorPlan, dtype: str, scale_dtype: str):
        q = t.quant
        assert q is not None and q.stored is not None and q.stored.scheme.block is not None
        self.block, self.dtype, self.scale_dtype = q.stored.scheme.block, dtype, scale_dtype
        self.cols = q.stored.shape[1]
        self.codes = memoryview(bytearray(self.block[0] * self.cols))
        self.inv = memoryview(bytearray(4 * -(-self.cols // self.block[1])))
        self.sums = (0.0, 0.0, 0.0)

    def add(self, rows: int, dequantized: memoryview | None, merged: memoryview) -> None:
        sums = kernel.quantize_fp8_band(
            merged,
            dequantized,
            rows,
            self.cols,
            self.block[1],
            self.dtype,
            self.scale_dtype,
            self.codes[: rows * self.cols],
            self.inv,
        )
        if sums is None:
            raise NonFinite
        self.sums = (self.sums[0] + sums[0], self.sums[1] + sums[1], self.sums[2] + sums[2])

    def stored_scales(self) -> bytes:
        """The last band's inverse scales in the stored dtype (already rounded to it: exact)."""
        raw = bytes(self.inv)
        if self.scale_dtype == "F32":
            return raw
        words = struct.unpack(f"{len(raw) // 4}I", raw)
        if self.scale_dtype == "BF16":
            return struct.pack(f"{len(words)}H", *(w >> 16 for w in words))
        return bytes((w >> 23) & 0xFF for w in words)  # ue8m0: the biased exponent


def _fp8_measure(run: Run, t: TensorPlan) -> _Fp8Requant | None:
    """The kernel's requantization measure for an as-trained merge of a block-scaled e4m3 weight with a delta."""
    q = t.quant
    if t.lora is None or q is None or q.stored is None or not _kernel_requantizes(run, t):
        return None
    assert q.stored is not None
    return _Fp8Requant(t, t.dtype, run.checkpoint.info(q.stored.parts["scale_inv"]).dtype)


def _kernel_requantizes(run: Run, t: TensorPlan) -> bool:
    """Block-scaled e4m3 with float32, bf16 or ue8m0 scales: what kernel.quantize_fp8_band computes."""
    q = t.quant
    assert q is not None and q.stored is not None
    stored = q.stored
    return (
        stored.scheme.method == "fp8"
        and stored.scheme.block is not None
        and run.checkpoint.info(stored.parts["weight"]).dtype == "F8_E4M3"
        and run.checkpoint.info(stored.parts["scale_inv"]).dtype in kernel.FP8_SCALE_MODES
    )


def _fp8_bands(run: Run, t: TensorPlan, dtype: str) -> Iterator[tuple[int, int, memoryview, memoryview]]:
    """(first row, rows, dequantized, merged) of each band of a float8 weight, in `dtype` (the views are reused by the
    next band): a block row of a block-scaled weight, about BLOCK_BYTES of rows otherwise. Stops with
    NonFinite when a value or a sum is not finite."""
    q = t.quant
    assert q is not None and q.stored is not None
    stored = q.stored
    rows, cols = stored.shape
    row_bytes = cols * DTYPE_BITS[dtype] // 8
    scales = _float32_values(run, stored.parts["scale_inv" if stored.scheme.method == "fp8" else "weight_scale"])
    block = stored.scheme.block if stored.scheme.method == "fp8" else None
    if block is not None:  # one scale per block: a band is a block row, its scales one per column
        step, per_row = block[0], False
        grid_cols = -(-cols // block[1])
        band_scales = [
            b"".join(
                scales[4 * (i * grid_cols + j) : 4 * (i * grid_cols + j + 1)] * block[1] for j in range(grid_cols)
            )[: 4 * cols]
            for i in range(-(-rows // block[0]))
        ]
    else:  # one scale for the tensor, or one per row
        step, per_row = max(32, BLOCK_BYTES // row_bytes // 32 * 32), True
        row_scales = scales * rows if len(scales) == 4 else scales
    fp8 = run.checkpoint.info(stored.parts["weight"]).dtype
    fd, offset = run.base.locate(stored.parts["weight"])
    what = f"{stored.parts['weight']!r} from {run.base.path(stored.parts['weight'])}"
    chain = [(_operands(run, t, op), op.scale.scale) for op in t.all_lora]
    block_in, block_out, spare = block_buffers(step * row_bytes)
    codes = memoryview(bytearray(step * cols))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        size = n * row_bytes
        read_block(run, fd, offset + start * cols, codes[: n * cols], what)
        band = band_scales[start // step] if block is not None else row_scales[4 * start : 4 * (start + n)]
        if not kernel.dequant_rows(codes[: n * cols], fp8, band, per_row, n, cols, dtype, block_in[:size]):
            raise NonFinite
        now, free = block_in, block_out
        for operands, scale in chain:
            if not kernel.merge_rows(now[:size], dtype, operands, start, n, scale, free[:size]):
                raise NonFinite
            now, free = free, (spare if free is block_out else block_out)
        yield start, n, block_in[:size], now[:size]


def _fp8_requant_bands(run: Run, t: TensorPlan, slots: list[Slot]) -> None:
    """--keep-quantization of a block-scaled e4m3 weight entirely in the kernel: each block row dequantized, merged
    and quantized back (transformers' Fp8Quantize), codes and scales written at their offsets."""
    q = t.quant
    assert q is not None and q.stored is not None and q.keep is not None
    scale_name = q.stored.parts["scale_inv"]
    requant = _Fp8Requant(t, q.keep.dtype, run.checkpoint.info(scale_name).dtype)
    scale_row = run.checkpoint.info(scale_name).nbytes // run.checkpoint.info(scale_name).shape[0]
    cols = requant.cols
    for start, n, dequantized, merged in _fp8_bands(run, t, q.keep.dtype):
        requant.add(n, dequantized if t.lora is not None else None, merged)
        write_at(slots[0].fd, slots[0].offset + start * cols, requant.codes[: n * cols])
        write_at(slots[1].fd, slots[1].offset + start // requant.block[0] * scale_row, requant.stored_scales())
    if t.lora is not None:
        record(run, t.name, requant.sums)


def with_requant_kernel(run: Run, t: TensorPlan, slots: list[Slot]) -> None:
    """--keep-quantization of a float8 weight whose bands quantize independently (block-scaled FP8: a block row;
    compressed-tensors FP8 per channel: rows): each band dequantized and merged by the kernel, quantized back with
    torch, its codes and scales written at their offsets."""
    q = t.quant
    assert q is not None and q.stored is not None and q.keep is not None
    if _kernel_requantizes(run, t):
        _fp8_requant_bands(run, t, slots)
        return
    import torch

    from ..compute.requantize import requantization_norms, requantized, stored_layout

    stored, dtype = q.stored, q.keep.dtype
    compute = safetensors_to_torch_dtype(dtype)
    cols = stored.shape[1]
    layout = stored_layout(stored, run.checkpoint)
    scale_role = q.keep.rewritten[0][0]
    scale_dtype, scale_shape = layout[scale_role]
    scale_row = math.prod(scale_shape[1:]) * torch.empty((), dtype=scale_dtype).element_size()  # bytes per band row
    block_rows = stored.scheme.block[0] if stored.scheme.block is not None else 1  # rows a scale row covers
    sums = [0.0, 0.0, 0.0]
    for start, n, dequantized, merged in _fp8_bands(run, t, dtype):
        value = torch.frombuffer(merged, dtype=compute).view(n, cols)
        band_layout = {
            "weight": (layout["weight"][0], (n, cols)),
            scale_role: (scale_dtype, (-(-n // block_rows), *scale_shape[1:])),
        }
        parts, back = requantized(stored, value, band_layout, run.base.read)
        write_at(slots[0].fd, slots[0].offset + start * cols, tensor_bytes(parts["weight"].contiguous()))
        write_at(
            slots[1].fd,
            slots[1].offset + start // block_rows * scale_row,
            tensor_bytes(parts[scale_role].contiguous()),
        )
        if t.lora is not None:
            start_value = torch.frombuffer(dequantized, dtype=compute).view(n, cols)
            sums = [a + b for a, b in zip(sums, requantization_norms(value, back, start_value))]
    if t.lora is not None:
        record(run, t.name, (sums[0], sums[1], sums[2]))


def _float32_values(run: Run, name: str) -> bytes:
    """A small float tensor of the base (a scale) as float32 bytes: f32 as stored, bf16/f16 widened, ue8m0 bytes
    as 2 ** (byte - 127)."""
    info = run.checkpoint.info(name)
    fd, offset = run.base.locate(name)
    raw = bytes(read_bytes(fd, offset, info.nbytes))
    if info.dtype == "F32":
        return raw
    if info.dtype in kernel.DTYPE_CODES:
        return bytes(kernel.widen(raw, info.dtype))
    return struct.pack(f"{len(raw)}f", *(2.0 ** (b - 127) if b < 255 else math.inf for b in raw))  # ue8m0


def _double_quantized(absmax: memoryview) -> memoryview:
    """bitsandbytes' double quantization of the absmax values (compute.quantization.double_quantized_absmax, torch)."""
    import torch

    from ..compute.quantization import double_quantized_absmax

    scale = double_quantized_absmax(torch.frombuffer(absmax, dtype=torch.float32)).contiguous()
    return memoryview(bytearray(tensor_bytes(scale)))
