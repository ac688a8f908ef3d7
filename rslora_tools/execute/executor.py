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
The steps the kernel computes are in execute/kernel_steps.py, those torch computes in execute/torch_steps.py, and
what the workers share (the run, each tensor's slot, the buffers, the workers) in execute/run.py; this module
creates the shards and dispatches each step. Progress is reported through a callback; the executor never draws
anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapter.adapter import Adapter
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.safetensors_file import SafetensorsWriter, copy_range
from .kernel_steps import (
    with_dequant_kernel,
    with_kernel,
    with_quant_kernel,
    with_requant_kernel,
)
from .lowering import Lowered, Step, StepKind
from .run import NonFinite, ProgressCallback, Run, Slot, Staging, Stopped, Workers
from .torch_steps import with_experts, with_requant, with_torch


def execute(
    lowered: Lowered,
    checkpoint: Checkpoint,
    adapter: Adapter,
    folder: Path,
    progress: ProgressCallback | None = None,
    *,
    allow_nonfinite: bool = False,
    measures: dict[str, tuple[float, float, float]] | None = None,
) -> None:
    """Write every shard of `lowered` into `folder`; on failure or interrupt the workers stop at their next block.

    A computed tensor with more NaN/Inf values than its starting value is an error (an adapter that
    overflows the weights), unless `allow_nonfinite`. `measures`, when given, receives for each
    weight quantized as in training (with a delta) the squared norms of compute.torch_ops.quantization_norms.
    """
    steps = lowered.steps
    run = Run(
        checkpoint,
        adapter,
        CheckpointFiles(checkpoint),
        lowered.device,
        Staging(lowered.device),
        sum(step.nbytes for step in steps),
        progress,
        allow_nonfinite,
        measures,
    )
    if adapter.is_safetensors and any(s.kind in (StepKind.COPY_ADAPTER, StepKind.KERNEL) for s in steps):
        run.adapter_fd = os.open(adapter.weights_path, os.O_RDONLY)
    workers = Workers(run.stop)
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


def _produce_group(run: Run, steps: list[Step], writer: SafetensorsWriter, row: int) -> None:
    """One job: a single step, or a run of untouched tensors copied in one go (`row`: the first one's in the shard)."""
    if len(steps) == 1:
        _produce(run, steps[0], Slot(writer, row))
        return
    if steps[0].kind in (StepKind.REQUANT, StepKind.REQUANT_KERNEL):
        slots = [Slot(writer, row + i) for i in range(len(steps))]
        if steps[0].by_expert:
            with_experts(run, steps[0].tensor, slots)
        elif steps[0].kind is StepKind.REQUANT_KERNEL:
            try:
                with_requant_kernel(run, steps[0].tensor, slots)
            except NonFinite:
                with_requant(run, steps[0].tensor, slots)
        else:
            with_requant(run, steps[0].tensor, slots)
        run.advance(sum(step.nbytes for step in steps))
        return
    if run.stop.is_set():
        raise Stopped
    first = steps[0].tensor
    assert first.source is not None
    fd, offset = run.base.locate(first.source)
    nbytes = sum(step.nbytes for step in steps)
    copy_range(fd, offset, writer.fd, writer.offset_at(row), nbytes)
    run.advance(nbytes)


def _produce(run: Run, step: Step, slot: Slot) -> None:
    """Produce one output tensor at its place in its shard, the way its step says."""
    if run.stop.is_set():
        raise Stopped
    t = step.tensor
    if step.kind is StepKind.COPY_BASE:
        assert t.source is not None
        slot.copy_raw(*run.base.locate(t.source))
    elif step.kind is StepKind.COPY_ADAPTER:
        assert t.replacement is not None
        slot.copy_raw(run.adapter_fd, run.adapter.tensor_offset(t.replacement))
    elif step.kind is StepKind.KERNEL:
        if not with_kernel(run, t, slot):
            with_torch(run, t, slot)  # the kernel met a non-finite sum: torch's NaN encoding
    elif step.kind is StepKind.QUANT_KERNEL:
        if not with_quant_kernel(run, t, slot):
            with_torch(run, t, slot)  # NaN/Inf in the weight or the sum: torch's encodings
    elif step.kind is StepKind.DEQUANT_KERNEL:
        try:
            with_dequant_kernel(run, t, slot)
        except NonFinite:
            with_torch(run, t, slot)  # NaN/Inf in the weight or the sum: torch's encodings
    elif step.kind is StepKind.EXPERTS:
        with_experts(run, t, [slot])
    else:  # TORCH, DEQUANT
        with_torch(run, t, slot)
    run.advance(step.nbytes)
