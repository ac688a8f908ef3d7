"""Run a lowered plan, writing every output shard from worker threads.

The output shards are created with their headers first (formats.safetensors_file.SafetensorsWriter);
then one worker thread per core takes the steps in order and writes each tensor at its own
offset, with the function for its `StepKind`:
- COPY_BASE / COPY_ADAPTER: raw bytes, copied inside the kernel (copy_file_range);
- KERNEL: the C merge kernel a block of rows at a time: read (pread), merge, write (pwrite),
  about a megabyte per worker in memory;
- QUANT_KERNEL (--trained-on 4-bit): the kernel reads the weight twice, once for the absmax of
  every block, then quantizes, dequantizes and merges a block of rows at a time;
- TORCH: compute/torch_ops.py with torch, one tensor per staging buffer set (page-locked, with a CUDA
  stream each, on a GPU); torch is imported only then;
- DEQUANT: the same, with the base value dequantized on the CPU first (compute.torch_ops.quantized_base);
- DEQUANT_KERNEL (a float8 base weight): a band of rows at a time, the codes dequantized into the merge
  dtype by the kernel (kernel.dequant_rows), then merged as KERNEL does;
- EXPERTS (a fused expert tensor): one expert at a time, its slice read (and dequantized), merged with its
  share of the deltas (compute.torch_ops.merged_expert) and written at its offset: memory holds one expert;
- REQUANT (--keep-quantization): DEQUANT in the weight's compute dtype, then quantized back
  (compute/requantize.py); the step writes the codes and, in the rows right after them, the scales
  (the WITH_WEIGHT steps, which do nothing by themselves).
Progress is reported through a callback; the executor never draws anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..compute import kernel
from ..adapter.adapter import Adapter
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.quant import REQUANTIZED_ROLES, QuantizedWeight
from ..errors import InputError
from .lowering import BLOCK_BYTES, Device, Lowered, Step, StepKind, staging_sets, worker_count
from ..plan.tensors import LoraOp, TensorPlan
from ..formats.safetensors_file import (
    DTYPE_BITS,
    SafetensorsWriter,
    copy_range,
    read_bytes,
    read_into,
    safetensors_to_torch_dtype,
    tensor_bytes,
    tensor_nbytes,
    torch_dtype,
    torch_to_safetensors_dtype,
    write_at,
)

if TYPE_CHECKING:
    import torch

ProgressCallback = Callable[[int, int], None]  # (bytes just finished, total bytes)


class _Stopped(Exception):
    """Another worker failed or the merge was interrupted: stop at the next block."""


@dataclass
class _Run:
    """What the workers share: inputs, open files, torch's staging buffers, the stop flag and progress."""

    checkpoint: Checkpoint
    adapter: Adapter
    base: CheckpointFiles
    device: Device
    staging: _Staging
    total: int
    progress: ProgressCallback | None
    allow_nonfinite: bool = False
    measures: dict[str, tuple[float, float, float]] | None = None  # --trained-on: quantization_norms per weight
    adapter_fd: int = -1
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    global_scales: dict[int, torch.Tensor] = field(default_factory=dict)  # NVFP4 fused groups' (compute/requantize)
    group_lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, nbytes: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(nbytes, self.total)


def execute(lowered: Lowered, checkpoint: Checkpoint, adapter: Adapter, folder: Path,
            progress: ProgressCallback | None = None, *, allow_nonfinite: bool = False,
            measures: dict[str, tuple[float, float, float]] | None = None) -> None:
    """Write every shard of `lowered` into `folder`; on failure or interrupt the workers stop at their next block.

    A computed tensor with more NaN/Inf values than its starting value is an error (an adapter that
    overflows the weights), unless `allow_nonfinite`. `measures`, when given, receives for each
    weight quantized as in training (with a delta) the squared norms of compute.torch_ops.quantization_norms.
    """
    steps = lowered.steps
    run = _Run(checkpoint, adapter, CheckpointFiles(checkpoint), lowered.device, _Staging(lowered.device),
               sum(step.nbytes for step in steps), progress, allow_nonfinite, measures)
    if adapter.is_safetensors and any(s.kind in (StepKind.COPY_ADAPTER, StepKind.KERNEL) for s in steps):
        run.adapter_fd = os.open(adapter.weights_path, os.O_RDONLY)
    workers = _Workers(run.stop)
    writers: list[SafetensorsWriter] = []
    jobs: list[tuple[list[Step], SafetensorsWriter, int]] = []
    try:
        for shard_name, shard_steps in lowered.shards:
            entries = ((s.tensor.name, s.tensor.dtype, s.tensor.shape) for s in shard_steps)
            writer = SafetensorsWriter(folder / shard_name, entries, {"format": "pt"})
            writers.append(writer)
            row = 0
            for group in _copy_runs(checkpoint, shard_steps):
                jobs.append((group, writer, row))
                row += len(group)
        workers.run(jobs, lambda job: _produce_group(run, *job))
    finally:
        if workers.stopped:  # else a worker may still write: closing would free its descriptor numbers
            for writer in writers:
                writer.close()
            run.base.close()
            if run.adapter_fd >= 0:
                os.close(run.adapter_fd)


STOP_WAIT_SECONDS = 10.0  # after a failure or Ctrl-C, how long the workers get to reach their next block
_RUN_BYTES = 16 << 20  # small untouched tensors stored one after the other are copied together, up to this much


def _copy_runs(checkpoint: Checkpoint, steps: list[Step]) -> list[list[Step]]:
    """The steps of one output shard as jobs: runs of small COPY_BASE steps whose bytes follow each other
    in one base shard (and so in the output) become one job, every other step is a job of its own."""
    groups: list[list[Step]] = []
    end: tuple[str, int] | None = None  # (base shard, offset) where the last run ends
    size = 0
    for step in steps:
        t = step.tensor
        if step.kind is StepKind.WITH_WEIGHT:  # written by its weight's REQUANT step, the job before
            groups[-1].append(step)
            end = None
            continue
        if step.kind is not StepKind.COPY_BASE or t.source is None or step.nbytes > _RUN_BYTES:
            groups.append([step])
            end = None
            continue
        shard = checkpoint.weight_map[t.source]
        info = checkpoint.headers[shard].tensors[t.source]
        if end == (shard, info.begin) and size + step.nbytes <= _RUN_BYTES:
            groups[-1].append(step)
            size += step.nbytes
        else:
            groups.append([step])
            size = step.nbytes
        end = (shard, info.end)
    return groups


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one output tensor goes: its shard's writer and its row there (the writer keeps no index by name)."""

    writer: SafetensorsWriter
    row: int

    @property
    def fd(self) -> int:
        return self.writer.fd

    @property
    def offset(self) -> int:
        return self.writer.offset_at(self.row)

    def write(self, tensor: torch.Tensor) -> None:
        self.writer.write_row(self.row, tensor)

    def copy_raw(self, source_fd: int, source_offset: int) -> None:
        self.writer.copy_row(self.row, source_fd, source_offset)


def _produce_group(run: _Run, steps: list[Step], writer: SafetensorsWriter, row: int) -> None:
    """One job: a single step, or a run of untouched tensors copied in one go (`row`: the first one's in the shard)."""
    if len(steps) == 1:
        _produce(run, steps[0], _Slot(writer, row))
        return
    if steps[0].kind in (StepKind.REQUANT, StepKind.REQUANT_KERNEL):
        slots = [_Slot(writer, row + i) for i in range(len(steps))]
        if steps[0].by_expert:
            _with_experts(run, steps[0].tensor, slots)
        elif steps[0].kind is StepKind.REQUANT_KERNEL:
            try:
                _with_requant_kernel(run, steps[0].tensor, slots)
            except _NonFinite:
                _with_requant(run, steps[0].tensor, slots)
        else:
            _with_requant(run, steps[0].tensor, slots)
        run.advance(sum(step.nbytes for step in steps))
        return
    if run.stop.is_set():
        raise _Stopped
    first = steps[0].tensor
    assert first.source is not None
    fd, offset = run.base.locate(first.source)
    nbytes = sum(step.nbytes for step in steps)
    copy_range(fd, offset, writer.fd, writer.offset_at(row), nbytes)
    run.advance(nbytes)


def _produce(run: _Run, step: Step, slot: _Slot) -> None:
    """Produce one output tensor at its place in its shard, the way its step says."""
    if run.stop.is_set():
        raise _Stopped
    t = step.tensor
    if step.kind is StepKind.COPY_BASE:
        assert t.source is not None
        slot.copy_raw(*run.base.locate(t.source))
    elif step.kind is StepKind.COPY_ADAPTER:
        assert t.replacement is not None
        slot.copy_raw(run.adapter_fd, run.adapter.tensor_offset(t.replacement))
    elif step.kind is StepKind.KERNEL:
        if not _with_kernel(run, t, slot):
            _with_torch(run, t, slot)  # the kernel met a non-finite sum: torch's NaN encoding
    elif step.kind is StepKind.QUANT_KERNEL:
        if not _with_quant_kernel(run, t, slot):
            _with_torch(run, t, slot)  # NaN/Inf in the weight or the sum: torch's encodings
    elif step.kind is StepKind.DEQUANT_KERNEL:
        try:
            _with_dequant_kernel(run, t, slot)
        except _NonFinite:
            _with_torch(run, t, slot)  # NaN/Inf in the weight or the sum: torch's encodings
    elif step.kind is StepKind.EXPERTS:
        _with_experts(run, t, [slot])
    else:  # TORCH, DEQUANT
        _with_torch(run, t, slot)
    run.advance(step.nbytes)


_thread_blocks = threading.local()


def _block_buffers(nbytes: int) -> tuple[memoryview, memoryview, memoryview]:
    """The calling worker's block buffers (in, out, one more for the 4-bit path), reused from tensor to tensor."""
    if getattr(_thread_blocks, "size", 0) < nbytes:
        _thread_blocks.size = max(nbytes, BLOCK_BYTES)
        _thread_blocks.views = tuple(memoryview(bytearray(_thread_blocks.size)) for _ in range(3))
    views: tuple[memoryview, memoryview, memoryview] = _thread_blocks.views
    return views


def _operands(run: _Run, t: TensorPlan, op: LoraOp | None = None) -> kernel.Operands:
    """The LoRA factors of a tensor's op (or of `op`, one of its stacked ones), widened to fp32 and packed as the
    kernel reads them."""
    op = op or t.lora
    assert op is not None
    adapter = run.adapter
    a = kernel.widen(adapter.tensor_bytes(op.module.a_key), adapter.dtypes[op.module.a_key])
    b = kernel.widen(adapter.tensor_bytes(op.module.b_key), adapter.dtypes[op.module.b_key])
    rows, cols = t.shape
    return kernel.Operands(op.kind, a, b, adapter.shapes[op.module.a_key][0], rows, cols, op.transpose)


def _with_kernel(run: _Run, t: TensorPlan, slot: _Slot) -> bool:
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
    block_in, block_out, spare = _block_buffers(step * row_bytes)
    for start in range(0, rows, step):
        if run.stop.is_set():
            raise _Stopped
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


def _with_quant_kernel(run: _Run, t: TensorPlan, slot: _Slot) -> bool:
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
    block_in, block_out, merged = _block_buffers(step * row_bytes)
    absmax = memoryview(bytearray(rows * row_blocks * 4))
    scale = absmax
    if q.scheme.double_quant:
        for start in range(0, rows, step):
            size = min(step, rows - start) * row_bytes
            _read_block(run, fd, offset + start * row_bytes, block_in[:size], what)
            if kernel.block_absmax(block_in[:size], t.dtype, blocksize, absmax[start * row_blocks * 4:]):
                return False
        scale = _double_quantized(absmax)
    operands = _operands(run, t) if t.lora is not None else None
    sums = [0.0, 0.0, 0.0]
    for start in range(0, rows, step):
        size = min(step, rows - start) * row_bytes
        _read_block(run, fd, offset + start * row_bytes, block_in[:size], what)
        if not q.scheme.double_quant and kernel.block_absmax(block_in[:size], t.dtype, blocksize,
                                                             absmax[start * row_blocks * 4:]):
            return False
        kernel.simulate_4bit(block_in[:size], t.dtype, q.scheme.method, blocksize, start * row_blocks, absmax, scale,
                             block_out[:size])
        result = block_out
        if operands is not None and t.lora is not None:
            if not kernel.merge_rows(block_out[:size], t.dtype, operands, start, size // row_bytes, t.lora.scale.scale,
                                     merged[:size]):
                return False
            if (start // step) % _MEASURE_EVERY == 0:  # a statistic for the report: a quarter of the rows is plenty
                norms = kernel.quant_norms(block_in[:size], block_out[:size], merged[:size], t.dtype)
                sums = [a + b for a, b in zip(sums, norms)]
            result = merged
        write_at(slot.fd, slot.offset + start * row_bytes, result[:size])
    if operands is not None:
        _record(run, t.name, (sums[0], sums[1], sums[2]))
    return True


def _with_dequant_kernel(run: _Run, t: TensorPlan, slot: _Slot) -> None:
    """A float8 base weight through the kernel, a band of rows at a time (a block row of a block-scaled weight):
    codes dequantized into the merge dtype, the LoRA delta (if any) merged, written. A block-scaled weight with a
    delta also gets the report's measure, on every 8th band: how far quantizing it back would move it."""
    row_bytes = t.shape[1] * DTYPE_BITS[t.dtype] // 8
    measure = _fp8_measure(run, t)
    for index, (start, n, dequantized, merged) in enumerate(_fp8_bands(run, t, t.dtype)):
        if measure is not None and index % _FP8_MEASURE_EVERY == 0:
            measure.add(n, dequantized, merged)
        write_at(slot.fd, slot.offset + start * row_bytes, merged)
    if measure is not None:
        _record(run, t.name, measure.sums)


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
        sums = kernel.quantize_fp8_band(merged, dequantized, rows, self.cols, self.block[1], self.dtype,
                                        self.scale_dtype, self.codes[:rows * self.cols], self.inv)
        if sums is None:
            raise _NonFinite
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


def _fp8_measure(run: _Run, t: TensorPlan) -> _Fp8Requant | None:
    """The kernel's requantization measure for an as-trained merge of a block-scaled e4m3 weight with a delta."""
    q = t.quant
    if t.lora is None or q is None or q.stored is None or not _kernel_requantizes(run, t):
        return None
    assert q.stored is not None
    return _Fp8Requant(t, t.dtype, run.checkpoint.info(q.stored.parts["scale_inv"]).dtype)


def _kernel_requantizes(run: _Run, t: TensorPlan) -> bool:
    """Block-scaled e4m3 with float32, bf16 or ue8m0 scales: what kernel.quantize_fp8_band computes."""
    q = t.quant
    assert q is not None and q.stored is not None
    stored = q.stored
    return (stored.scheme.method == "fp8" and stored.scheme.block is not None
            and run.checkpoint.info(stored.parts["weight"]).dtype == "F8_E4M3"
            and run.checkpoint.info(stored.parts["scale_inv"]).dtype in kernel.FP8_SCALE_MODES)


def _fp8_bands(run: _Run, t: TensorPlan, dtype: str) -> Iterator[tuple[int, int, memoryview, memoryview]]:
    """(first row, rows, dequantized, merged) of each band of a float8 weight, in `dtype` (the views are reused by the
    next band): a block row of a block-scaled weight, about BLOCK_BYTES of rows otherwise. Stops with
    _NonFinite when a value or a sum is not finite."""
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
        band_scales = [b"".join(scales[4 * (i * grid_cols + j):4 * (i * grid_cols + j + 1)] * block[1]
                                for j in range(grid_cols))[:4 * cols] for i in range(-(-rows // block[0]))]
    else:  # one scale for the tensor, or one per row
        step, per_row = max(32, BLOCK_BYTES // row_bytes // 32 * 32), True
        row_scales = scales * rows if len(scales) == 4 else scales
    fp8 = run.checkpoint.info(stored.parts["weight"]).dtype
    fd, offset = run.base.locate(stored.parts["weight"])
    what = f"{stored.parts['weight']!r} from {run.base.path(stored.parts['weight'])}"
    chain = [(_operands(run, t, op), op.scale.scale) for op in t.all_lora]
    block_in, block_out, spare = _block_buffers(step * row_bytes)
    codes = memoryview(bytearray(step * cols))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        size = n * row_bytes
        _read_block(run, fd, offset + start * cols, codes[:n * cols], what)
        band = band_scales[start // step] if block is not None else row_scales[4 * start:4 * (start + n)]
        if not kernel.dequant_rows(codes[:n * cols], fp8, band, per_row, n, cols, dtype, block_in[:size]):
            raise _NonFinite
        now, free = block_in, block_out
        for operands, scale in chain:
            if not kernel.merge_rows(now[:size], dtype, operands, start, n, scale, free[:size]):
                raise _NonFinite
            now, free = free, (spare if free is block_out else block_out)
        yield start, n, block_in[:size], now[:size]


class _NonFinite(Exception):
    """A value or a sum the kernel computed is not finite: compute the tensor with torch (its NaN encodings)."""


def _fp8_requant_bands(run: _Run, t: TensorPlan, slots: list[_Slot]) -> None:
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
        write_at(slots[0].fd, slots[0].offset + start * cols, requant.codes[:n * cols])
        write_at(slots[1].fd, slots[1].offset + start // requant.block[0] * scale_row, requant.stored_scales())
    if t.lora is not None:
        _record(run, t.name, requant.sums)


def _with_requant_kernel(run: _Run, t: TensorPlan, slots: list[_Slot]) -> None:
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
        band_layout = {"weight": (layout["weight"][0], (n, cols)),
                       scale_role: (scale_dtype, (-(-n // block_rows), *scale_shape[1:]))}
        parts, back = requantized(stored, value, band_layout, run.base.read)
        write_at(slots[0].fd, slots[0].offset + start * cols, tensor_bytes(parts["weight"].contiguous()))
        write_at(slots[1].fd, slots[1].offset + start // block_rows * scale_row,
                 tensor_bytes(parts[scale_role].contiguous()))
        if t.lora is not None:
            start_value = torch.frombuffer(dequantized, dtype=compute).view(n, cols)
            sums = [a + b for a, b in zip(sums, requantization_norms(value, back, start_value))]
    if t.lora is not None:
        _record(run, t.name, (sums[0], sums[1], sums[2]))


def _float32_values(run: _Run, name: str) -> bytes:
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


def _record(run: _Run, name: str, norms: tuple[float, float, float]) -> None:
    if run.measures is not None:
        with run.lock:
            run.measures[name] = norms


_MEASURE_EVERY = 4  # the 4-bit kernel path measures quantization_norms on every 4th block of rows
_FP8_MEASURE_EVERY = 8  # an as-trained FP8 (MXFP4) merge measures requantization on every 8th block row (expert)


def _read_block(run: _Run, fd: int, offset: int, view: memoryview, what: str) -> None:
    if run.stop.is_set():
        raise _Stopped
    read_into(fd, offset, view, what)


def _double_quantized(absmax: memoryview) -> memoryview:
    """bitsandbytes' double quantization of the absmax values (compute.quantization.double_quantized_absmax, torch)."""
    import torch

    from ..compute.quantization import double_quantized_absmax

    scale = double_quantized_absmax(torch.frombuffer(absmax, dtype=torch.float32)).contiguous()
    return memoryview(bytearray(tensor_bytes(scale)))


class _Staging:
    """Host buffers (page-locked on a GPU) and a CUDA stream per set, for tensors computed with torch.

    A worker takes a set for one tensor, so the number of sets bounds the memory: one on the CPU
    (torch uses every core for one tensor anyway), a few on a GPU, where reads, transfers and
    writes of different tensors then overlap. Reused buffers cost no page faults, and pinned
    ones let the copies to and from the GPU run asynchronously on the set's stream.
    """

    def __init__(self, device: Device):
        self.device = device
        self._lock = threading.Lock()
        self._sets: queue.Queue[dict[str, Any]] | None = None  # made on first use: only torch steps need the device

    @contextlib.contextmanager
    def take(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            if self._sets is None:
                self._sets = queue.Queue()
                for _ in range(staging_sets(self.device)):
                    self._sets.put({})
            sets = self._sets
        buffers = sets.get()
        try:
            yield buffers
        finally:
            sets.put(buffers)

    def buffer(self, buffers: dict[str, Any], key: str, nbytes: int) -> torch.Tensor:
        import torch

        if key not in buffers or buffers[key].numel() < nbytes:
            buffers.pop(key, None)  # free the smaller one first
            buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.device.is_cuda)
        tensor: torch.Tensor = buffers[key][:nbytes]
        return tensor


def _with_torch(run: _Run, t: TensorPlan, slot: _Slot) -> None:
    """Compute one tensor with torch (compute/torch_ops.py) on the run's device, staged through reused host buffers."""
    import torch

    from ..compute.torch_ops import merged_tensor, quantization_norms, quantized_base

    staging, device = run.staging, run.device.torch_device
    with staging.take() as buffers:
        cuda = run.device.is_cuda
        if cuda and "stream" not in buffers:
            buffers["stream"] = torch.cuda.Stream(device=device)
        with torch.cuda.stream(buffers["stream"]) if cuda else contextlib.nullcontext():
            base = None
            if t.quant is not None and t.replacement is None:
                base = quantized_base(t, run.base.read).to(device, non_blocking=True)
            elif t.source is not None:
                base = _read_staged(run, staging, buffers, t.source).to(device, non_blocking=True)
            measure = t.quant is not None and t.quant.simulated and t.lora is not None and base is not None
            quantized = base.to(safetensors_to_torch_dtype(t.dtype), copy=True) if measure and base is not None else None
            value = merged_tensor(t, run.base.read, run.adapter.tensor, safetensors_to_torch_dtype(t.dtype), device,
                                  base=base)
            if quantized is not None and t.source is not None:
                _record(run, t.name, quantization_norms(run.base.read(t.source).to(device), quantized, value))
            if not run.allow_nonfinite:
                _check_finite(run, t, value)
            if value.device.type != "cpu":
                out = staging.buffer(buffers, "out", tensor_nbytes(t.dtype, t.shape)).view(value.dtype).view(value.shape)
                out.copy_(value, non_blocking=True)
                buffers["stream"].synchronize()
                value = out
            slot.write(value)


def _with_requant(run: _Run, t: TensorPlan, slots: list[_Slot]) -> None:
    """--keep-quantization: merge the dequantized weight in its compute dtype (on the run's device), quantize it back
    as the base's format does (on the CPU; an NVFP4 fused group with one global scale), write the codes into
    slots[0] and the rewritten scales after them."""
    from ..compute.requantize import kept_weight, requantization_norms

    if run.stop.is_set():
        raise _Stopped
    q = t.quant
    assert q is not None and q.keep is not None and q.stored is not None
    with run.group_lock if q.keep.fused is not None else contextlib.nullcontext():  # a group's scale: once
        kept = kept_weight(t, run.checkpoint, run.base.read, run.adapter.tensor, run.global_scales,
                           run.device.torch_device)
    if kept.merged is not None and not run.allow_nonfinite:
        _check_finite(run, t, kept.merged)
    slots[0].write(kept.parts[REQUANTIZED_ROLES[q.scheme.method][0]])
    for slot, (role, _) in zip(slots[1:], q.keep.rewritten):
        slot.write(kept.parts[role])
    if kept.merged is not None and kept.back is not None and kept.start is not None:  # the report's requantization
        _record(run, t.name, requantization_norms(kept.merged, kept.back, kept.start))  # error, against the delta


def _with_experts(run: _Run, t: TensorPlan, slots: list[_Slot]) -> None:
    """A fused expert tensor one expert at a time: its slice of the base read (MXFP4 or FP8 dequantized), merged with
    that expert's deltas in the merge dtype on the run's device, and written at the expert's offset in each output
    (--keep-quantization: quantized back, codes and scales each at their offset)."""
    import torch

    from ..compute.quantization import dequantize_expert
    from ..compute.requantize import requantization_norms, requantized
    from ..compute.torch_ops import adapter_weight, merged_expert

    q = t.quant
    keep = q.keep if q is not None else None
    experts = (keep.shape if keep is not None else t.shape)[0]
    dtype = safetensors_to_torch_dtype(keep.dtype if keep is not None else t.dtype)
    device = run.device.torch_device
    factors = {key: adapter_weight(run.adapter.tensor, key, torch.device(device))
               for op in t.all_lora for key in (op.module.a_key, op.module.b_key)}
    sums = [0.0, 0.0, 0.0]
    # an as-trained MXFP4 merge measures what quantizing back would lose, on every 8th expert (kernel.available())
    measure = (keep is None and q is not None and q.stored is not None and q.scheme.method == "mxfp4"
               and (t.lora is not None or bool(t.parts)) and kernel.available())
    for expert in range(experts):
        if run.stop.is_set():
            raise _Stopped
        if q is not None and q.stored is not None:
            start = dequantize_expert(q.stored, run.base.read_slice, expert).to(dtype)
        else:
            assert t.source is not None
            start = run.base.read_slice(t.source, expert).to(dtype)
        value = merged_expert(t, expert, start.to(device, copy=True), factors).cpu()
        if not run.allow_nonfinite:
            _check_finite(run, t, value, start)
        if keep is None:
            _write_slice(slots[0], expert, experts, value)
            if measure and expert % _FP8_MEASURE_EVERY == 0:  # the report's requantization measure, by the kernel
                assert q is not None and q.stored is not None
                fast = _requantize_mxfp4_by_kernel(q.stored, value, start, t.dtype)
                if fast is not None:
                    sums = [a + b for a, b in zip(sums, fast[1])]
            continue
        assert q is not None and q.stored is not None
        measured = t.lora is not None or bool(t.parts)
        fast = _requantize_mxfp4_by_kernel(q.stored, value, start if measured else None, keep.dtype)
        if fast is not None:
            parts, norms = fast
        else:
            layout = {role: (torch_dtype(run.checkpoint.headers[run.checkpoint.weight_map[name]], name),
                             (1, *run.checkpoint.info(name).shape[1:])) for role, name in q.stored.parts.items()}
            parts, back = requantized(q.stored, value.unsqueeze(0), layout,
                                      lambda name: run.base.read_slice(name, expert).unsqueeze(0))
            norms = requantization_norms(value.unsqueeze(0), back, start.unsqueeze(0))
        roles = (REQUANTIZED_ROLES[q.scheme.method][0], *(role for role, _ in keep.rewritten))
        for slot, role in zip(slots, roles):
            _write_slice(slot, expert, experts, parts[role])
        if measured:
            sums = [a + b for a, b in zip(sums, norms)]
    if (keep is not None and (t.lora is not None or t.parts)) or measure:
        _record(run, t.name, (sums[0], sums[1], sums[2]))


def _requantize_mxfp4_by_kernel(stored: QuantizedWeight, value: torch.Tensor, start: torch.Tensor | None, dtype: str
                     ) -> tuple[dict[str, torch.Tensor], tuple[float, float, float]] | None:
    """One merged MXFP4 expert (in, out) quantized back by the kernel (the same codes as compute.requantize's
    quantize_mxfp4): its blocks and scales, and the requantization sums; None where the kernel cannot."""
    import torch

    if stored.scheme.method != "mxfp4" or not kernel.available() or dtype not in kernel.DTYPE_CODES:
        return None
    inputs, outputs = value.shape
    rows = value.T.contiguous()
    start_rows = start.T.contiguous() if start is not None else None  # kept alive while the kernel reads its bytes
    blocks = torch.empty(outputs, inputs // 32, 16, dtype=torch.uint8)
    scales = torch.empty(outputs, inputs // 32, dtype=torch.uint8)
    sums = kernel.quantize_mxfp4_rows(tensor_bytes(rows), tensor_bytes(start_rows) if start_rows is not None else None,
                                      outputs, inputs, dtype, tensor_bytes(blocks), tensor_bytes(scales))
    if sums is None:
        return None
    return {"blocks": blocks, "scales": scales}, sums


def _write_slice(slot: _Slot, index: int, count: int, value: torch.Tensor) -> None:
    """Slice `index` of `count` along an output tensor's first dimension."""
    data = tensor_bytes(value.contiguous())
    write_at(slot.fd, slot.offset + index * len(data), data)


def _check_finite(run: _Run, t: TensorPlan, value: torch.Tensor, start: torch.Tensor | None = None) -> None:
    """Refuse a merged tensor with more NaN/Inf values than the value it started from (the delta overflowed)."""

    if not value.is_floating_point():
        return
    bad = _nonfinite(value)
    if not bad:
        return
    if start is None:
        start = _start_value(run, t)
    before = _nonfinite(start) if start.is_floating_point() else 0
    if bad > before:
        op = t.lora or t.bias_of
        cause = f" (module {op.module.name!r}, scale {op.scale.scale:g})" if op is not None else ""
        raise InputError(
            f"{t.name}: the merge gives {bad} NaN or Inf values where the base has {before}{cause}; the adapter would "
            "break the model. Pass --allow-nonfinite to merge it anyway"
        )


def _nonfinite(value: torch.Tensor) -> int:
    """NaN/Inf values of a floating tensor (the kernel counts a CPU tensor's bytes, torch the rest)."""
    import torch

    if value.device.type == "cpu" and value.is_contiguous():
        count = kernel.count_nonfinite(tensor_bytes(value), torch_to_safetensors_dtype(value.dtype))
        if count is not None:
            return count
    return int(value.numel() - torch.isfinite(value).sum().item())


def _start_value(run: _Run, t: TensorPlan) -> torch.Tensor:
    """The value a tensor's merge starts from: the adapter's replacement, the dequantized weight, or the base's."""
    if t.replacement is not None:
        return run.adapter.tensor(t.replacement)
    if t.quant is not None:
        from ..compute.torch_ops import quantized_base

        return quantized_base(t, run.base.read)
    return run.base.read(t.source or t.name)


def _read_staged(run: _Run, staging: _Staging, buffers: dict[str, Any], name: str) -> torch.Tensor:
    """A base tensor read into the set's reused input buffer (a view of it, in the tensor's dtype and shape)."""
    checkpoint = run.checkpoint
    header = checkpoint.headers[checkpoint.weight_map[name]]
    info = header.tensors[name]
    host = staging.buffer(buffers, "in", info.nbytes).view(torch_dtype(header, name)).view(info.shape)
    fd, offset = run.base.locate(name)
    read_into(fd, offset, tensor_bytes(host), f"{header.path}: tensor {name!r}")
    return host


class _Workers:
    """Runs `work(job)` for every job on worker threads, in order; re-raises the failure of the earliest job.

    After a failure no later job starts, and the jobs already running finish, so the error raised is
    the same whatever the threads' timing (the first failing tensor in plan order). The main thread
    only waits, so Ctrl-C (KeyboardInterrupt) arrives at once; the workers then stop at their next
    block (`stop`), and are given a few seconds to do so.
    """

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.threads: list[threading.Thread] = []

    @property
    def stopped(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def run(self, jobs: list[Any], work: Callable[[Any], None]) -> None:
        todo = iter(enumerate(jobs))
        lock = threading.Lock()
        errors: list[tuple[int, BaseException]] = []

        def loop() -> None:
            while not self.stop.is_set():
                with lock:
                    item = next(todo, None)
                    if item is None or errors:
                        return
                index, job = item
                try:
                    work(job)
                except _Stopped:
                    return
                except BaseException as e:  # re-raised on the main thread
                    with lock:
                        errors.append((index, e))
                    return

        self.threads = [threading.Thread(target=loop, name=f"rslora-tools-worker-{i}", daemon=True)
                        for i in range(worker_count())]
        for thread in self.threads:
            thread.start()
        try:
            for thread in self.threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:
            self.stop.set()
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        if errors:
            raise min(errors, key=lambda error: error[0])[1]
