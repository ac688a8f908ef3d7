"""The steps torch computes (compute/torch_ops.py; torch is imported only then): TORCH and DEQUANT, REQUANT
(--keep-quantization), EXPERTS (a fused expert tensor one expert at a time), and the check that a computed
tensor is finite."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..compute import kernel
from ..errors import InputError
from ..formats.quant import REQUANTIZED_ROLES, QuantizedWeight
from ..formats.safetensors_file import (
    read_into,
    safetensors_to_torch_dtype,
    tensor_bytes,
    tensor_nbytes,
    torch_dtype,
    torch_to_safetensors_dtype,
    write_at,
)
from ..plan.tensors import TensorPlan
from .kernel_steps import FP8_MEASURE_EVERY
from .run import Run, Slot, Staging, Stopped, record

if TYPE_CHECKING:
    import torch


def with_torch(run: Run, t: TensorPlan, slot: Slot) -> None:
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
            quantized = (
                base.to(safetensors_to_torch_dtype(t.dtype), copy=True) if measure and base is not None else None
            )
            value = merged_tensor(
                t, run.base.read, run.adapter.tensor, safetensors_to_torch_dtype(t.dtype), device, base=base
            )
            if quantized is not None and t.source is not None:
                record(run, t.name, quantization_norms(run.base.read(t.source).to(device), quantized, value))
            if not run.allow_nonfinite:
                _check_finite(run, t, value)
            if value.device.type != "cpu":
                out = (
                    staging.buffer(buffers, "out", tensor_nbytes(t.dtype, t.shape)).view(value.dtype).view(value.shape)
                )
                out.copy_(value, non_blocking=True)
                buffers["stream"].synchronize()
                value = out
            slot.write(value)


def with_requant(run: Run, t: TensorPlan, slots: list[Slot]) -> None:
    """--keep-quantization: merge the dequantized weight in its compute dtype (on the run's device), quantize it back
    as the base's format does (on the CPU; an NVFP4 fused group with one global scale), write the codes into
    slots[0] and the rewritten scales after them."""
    from ..compute.requantize import kept_weight, requantization_norms

    if run.stop.is_set():
        raise Stopped
    q = t.quant
    assert q is not None and q.keep is not None and q.stored is not None
    with run.group_lock if q.keep.fused is not None else contextlib.nullcontext():  # a group's scale: once
        kept = kept_weight(
            t, run.checkpoint, run.base.read, run.adapter.tensor, run.global_scales, run.device.torch_device
        )
    if kept.merged is not None and not run.allow_nonfinite:
        _check_finite(run, t, kept.merged)
    slots[0].write(kept.parts[REQUANTIZED_ROLES[q.scheme.method][0]])
    for slot, (role, _) in zip(slots[1:], q.keep.rewritten):
        slot.write(kept.parts[role])
    if kept.merged is not None and kept.back is not None and kept.start is not None:  # the report's requantization
        record(run, t.name, requantization_norms(kept.merged, kept.back, kept.start))  # error, against the delta


def with_experts(run: Run, t: TensorPlan, slots: list[Slot]) -> None:
    """A fused expert tensor one expert at a time: its slice of the base read (MXFP4 or FP8 dequantized), merged with
    that expert's deltas in the merge dtype on the run's device, and written at the expert's offset in each output
    (--keep-quantization: quantized back, codes and scales each at their offset)."""
    import torch

    from ..compute.quantization import dequantize_expert
    from ..compute.torch_ops import adapter_weight, merged_expert

    q = t.quant
    keep = q.keep if q is not None else None
    experts = (keep.shape if keep is not None else t.shape)[0]
    dtype = safetensors_to_torch_dtype(keep.dtype if keep is not None else t.dtype)
    device = run.device.torch_device
    factors = {
        key: adapter_weight(run.adapter.tensor, key, torch.device(device))
        for op in t.all_lora
        for key in (op.module.a_key, op.module.b_key)
    }
    sums = [0.0, 0.0, 0.0]
    # an as-trained MXFP4 merge measures what quantizing back would lose, on every 8th expert (kernel.available())
    measure = (
        keep is None
        and q is not None
        and q.stored is not None
        and q.scheme.method == "mxfp4"
        and (t.lora is not None or bool(t.parts))
        and kernel.available()
    )
    for expert in range(experts):
        if run.stop.is_set():
            raise Stopped
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
            if measure and expert % FP8_MEASURE_EVERY == 0:  # the report's requantization measure, by the kernel
                assert q is not None and q.stored is not None
                fast = _requantize_mxfp4_by_kernel(q.stored, value, start, t.dtype)
                if fast is not None:
                    sums = [a + b for a, b in zip(sums, fast[1])]
            continue
        norms = _requantized_expert(run, t, slots, expert, experts, value, start)
        if norms is not None:
            sums = [a + b for a, b in zip(sums, norms)]
    if (keep is not None and (t.lora is not None or t.parts)) or measure:
        record(run, t.name, (sums[0], sums[1], sums[2]))


def _requantized_expert(
    run: Run, t: TensorPlan, slots: list[Slot], expert: int, experts: int, value: torch.Tensor, start: torch.Tensor
) -> tuple[float, float, float] | None:
    """One merged expert quantized back into the base's format (--keep-quantization), its codes and scales written at
    the expert's offsets in their outputs; the requantization's norms when the adapter changed the tensor."""
    from ..compute.requantize import requantization_norms, requantized

    q = t.quant
    assert q is not None and q.stored is not None and q.keep is not None
    measured = t.lora is not None or bool(t.parts)
    fast = _requantize_mxfp4_by_kernel(q.stored, value, start if measured else None, q.keep.dtype)
    if fast is not None:
        parts, norms = fast
    else:
        stored = q.stored
        layout = {
            role: (
                torch_dtype(run.checkpoint.headers[run.checkpoint.weight_map[name]], name),
                (1, *run.checkpoint.info(name).shape[1:]),
            )
            for role, name in stored.parts.items()
        }
        parts, back = requantized(
            stored, value.unsqueeze(0), layout, lambda name: run.base.read_slice(name, expert).unsqueeze(0)
        )
        norms = requantization_norms(value.unsqueeze(0), back, start.unsqueeze(0))
    roles = (REQUANTIZED_ROLES[q.scheme.method][0], *(role for role, _ in q.keep.rewritten))
    for slot, role in zip(slots, roles):
        _write_slice(slot, expert, experts, parts[role])
    return norms if measured else None


def _requantize_mxfp4_by_kernel(
    stored: QuantizedWeight, value: torch.Tensor, start: torch.Tensor | None, dtype: str
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
    sums = kernel.quantize_mxfp4_rows(
        tensor_bytes(rows),
        tensor_bytes(start_rows) if start_rows is not None else None,
        outputs,
        inputs,
        dtype,
        tensor_bytes(blocks),
        tensor_bytes(scales),
    )
    if sums is None:
        return None
    return {"blocks": blocks, "scales": scales}, sums


def _write_slice(slot: Slot, index: int, count: int, value: torch.Tensor) -> None:
    """Slice `index` of `count` along an output tensor's first dimension."""
    data = tensor_bytes(value.contiguous())
    write_at(slot.fd, slot.offset + index * len(data), data)


def _check_finite(run: Run, t: TensorPlan, value: torch.Tensor, start: torch.Tensor | None = None) -> None:
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
            "break the model. Pass [[allow_nonfinite=True]] to merge it anyway"
        )


def _nonfinite(value: torch.Tensor) -> int:
    """NaN/Inf values of a floating tensor (the kernel counts a CPU tensor's bytes, torch the rest)."""
    import torch

    if value.device.type == "cpu" and value.is_contiguous():
        count = kernel.count_nonfinite(tensor_bytes(value), torch_to_safetensors_dtype(value.dtype))
        if count is not None:
            return count
    return int(value.numel() - torch.isfinite(value).sum().item())


def _start_value(run: Run, t: TensorPlan) -> torch.Tensor:
    """The value a tensor's merge starts from: the adapter's replacement, the dequantized weight, or the base's."""
    if t.replacement is not None:
        return run.adapter.tensor(t.replacement)
    if t.quant is not None:
        from ..compute.torch_ops import quantized_base

        return quantized_base(t, run.base.read)
    return run.base.read(t.source or t.name)


def _read_staged(run: Run, staging: Staging, buffers: dict[str, Any], name: str) -> torch.Tensor:
    """A base tensor read into the set's reused input buffer (a view of it, in the tensor's dtype and shape)."""
    checkpoint = run.checkpoint
    header = checkpoint.headers[checkpoint.weight_map[name]]
    info = header.tensors[name]
    host = staging.buffer(buffers, "in", info.nbytes).view(torch_dtype(header, name)).view(info.shape)
    fd, offset = run.base.locate(name)
    read_into(fd, offset, tensor_bytes(host), f"{header.path}: tensor {name!r}")
    return host
