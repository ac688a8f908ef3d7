"""Lowering, the one place that decides how each planned tensor is produced.

The executor's entry. `--device` becomes a `Device` here, once; `lower` turns each `TensorPlan`
into a `Step` (copy the base's bytes, copy the adapter's bytes, the C merge kernel, or torch
on the device), and everything downstream reads that decision: the merge report, the dry-run
listing, the memory estimate and the workers. A new way to produce a tensor is one more
`StepKind`, chosen in `_step_kind` and run by one function in execute/executor.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import Enum

from ..adapter.adapter import Adapter
from ..compute import kernel
from ..errors import InputError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_file import tensor_nbytes
from ..plan.quantization import by_expert
from ..plan.tensors import LoraOp, Plan, TensorPlan

BLOCK_BYTES = 1 << 20  # rows the kernel merges per step: in and out stay in the CPU's cache
_RUNTIME_BYTES = 24 * 10**6  # Python and the CLI's modules (measured: ~24 MB for a tiny merge)
_TORCH_BYTES = 210 * 10**6  # torch itself once imported (measured: ~240 MB in all)
_DEQUANT_FP32_COPIES = 4  # dequantizing holds a few whole-weight fp32 temporaries (codes, scales, values)


class StepKind(str, Enum):
    """How one output tensor is produced; the value is what reports show (`by`), the description what a dry run
    prints."""

    description: str

    def __new__(cls, value: str, description: str) -> StepKind:
        kind = str.__new__(cls, value)
        kind._value_ = value
        kind.description = description
        return kind

    COPY_BASE = ("raw", "copied")  # untouched, same dtype: the base's bytes, copied inside the kernel
    COPY_ADAPTER = ("copy", "copied from the adapter")  # given whole by an adapter tensor in the output's dtype
    KERNEL = ("kernel", "merge kernel")  # W + s * (B @ A) by the C merge kernel, a block of rows at a time
    QUANT_KERNEL = ("quant-kernel", "quantized and merged by the kernel")  # --trained-on nf4/fp4, by the C kernel
    DEQUANT_KERNEL = ("dequant-kernel", "dequantized and merged by the kernel")  # FP8 bases, a block of rows at a time
    DEQUANT = ("dequant", "dequantized with torch")  # a quantized base weight dequantized (or quantized) with torch
    REQUANT_KERNEL = ("requant-kernel", "dequantized and merged by the kernel, quantized back with torch")  # FP8 bands
    EXPERTS = ("experts", "expert by expert with torch")  # a fused expert tensor, one expert's slice at a time
    REQUANT = ("requant", "dequantized, merged and quantized back with torch")  # --keep-quantization: codes and scales
    WITH_WEIGHT = ("with-weight", "rewritten with its weight")  # a scale the REQUANT step of its weight writes
    TORCH = ("torch", "torch")  # everything else, computed with torch (compute/torch_ops.py) on the device

    @classmethod
    def of(cls, value: str) -> StepKind:
        """The kind a report's `by` names."""
        return cls._value2member_map_[value]  # type: ignore[return-value]


class Device:
    """Where torch computes, and whether the merge kernel may: `--device`, decided once.

    cpu: the kernel where it applies, torch on the CPU for the rest. cuda[:N]: torch on that GPU
    for every computed tensor. auto: the kernel where it applies, CUDA (when present) for the
    rest; torch is imported only when a tensor needs it.
    """

    def __init__(self, spec: str = "cpu"):
        if spec not in ("cpu", "auto") and not spec.startswith("cuda"):
            raise InputError(f"unknown device {spec!r}; use cpu, cuda or auto")
        self.spec = spec
        self._torch: str | None = "cpu" if spec == "cpu" else None
        if spec.startswith("cuda"):
            if not _cuda_available():
                raise InputError("[[device]] cuda was requested but CUDA is not available; use [[device]] cpu or auto")
            self._torch = spec

    @property
    def kernel_allowed(self) -> bool:
        return self.spec in ("cpu", "auto")

    @property
    def torch_device(self) -> str:
        """The torch device name ("cpu", "cuda", "cuda:1"); for auto, CUDA when this machine has it."""
        if self._torch is None:
            self._torch = "cuda" if _cuda_available() else "cpu"
        return self._torch

    @property
    def is_cuda(self) -> bool:
        return self.torch_device != "cpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True, slots=True)
class Step:
    """One output tensor and how it is produced."""

    tensor: TensorPlan
    kind: StepKind
    by_expert: bool = False  # a fused expert tensor produced one expert at a time (EXPERTS, or a sliced REQUANT)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.tensor.dtype, self.tensor.shape)


@dataclass(frozen=True)
class Lowered:
    """A plan lowered for one device: the steps of each output shard."""

    shards: list[tuple[str, list[Step]]]
    device: Device

    @property
    def steps(self) -> list[Step]:
        return [step for _, steps in self.shards for step in steps]

    @property
    def uses_torch(self) -> bool:
        return any(
            step.kind
            in (StepKind.TORCH, StepKind.DEQUANT, StepKind.REQUANT, StepKind.REQUANT_KERNEL, StepKind.EXPERTS)
            for step in self.steps
        )

    @property
    def imports_torch(self) -> bool:
        """torch computes a tensor, or double quantization's nested step (the kernel's 4-bit path) needs it."""
        return self.uses_torch or any(
            step.kind is StepKind.QUANT_KERNEL
            and step.tensor.quant is not None
            and step.tensor.quant.scheme.double_quant
            for step in self.steps
        )

    @property
    def device_name(self) -> str:
        """Where computed tensors go: the torch device when torch computes any, else the CPU (the kernel)."""
        return self.device.torch_device if self.uses_torch else "cpu"


def lower(plan: Plan, checkpoint: Checkpoint, adapter: Adapter, device: Device) -> Lowered:
    """Decide, for every planned tensor, the step that produces it."""
    shards = [(name, [_step(t, checkpoint, adapter, device) for t in tensors]) for name, tensors in plan.shards]
    return Lowered(shards, device)


def _step(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter, device: Device) -> Step:
    kind = _step_kind(t, checkpoint, adapter, device)
    return Step(t, kind, kind in (StepKind.EXPERTS, StepKind.REQUANT) and by_expert(t, checkpoint))


def _step_kind(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter, device: Device) -> StepKind:
    if t.written_with is not None:
        return StepKind.WITH_WEIGHT
    if t.quant is not None and t.quant.keep is not None:
        if device.kernel_allowed and _requant_kernel_fits(t, checkpoint, adapter):
            return StepKind.REQUANT_KERNEL
        return StepKind.REQUANT
    if by_expert(t, checkpoint):
        return StepKind.EXPERTS
    if t.quant is not None and t.replacement is None:
        if device.kernel_allowed and _quant_kernel_fits(t, checkpoint, adapter):
            return StepKind.QUANT_KERNEL
        if device.kernel_allowed and _dequant_kernel_fits(t, checkpoint, adapter):
            return StepKind.DEQUANT_KERNEL
        return StepKind.DEQUANT
    if t.untouched and t.source is not None and checkpoint.info(t.source).dtype == t.dtype:
        return StepKind.COPY_BASE
    if (
        t.replaced_whole
        and t.replacement is not None
        and adapter.is_safetensors
        and adapter.single_file
        and adapter.dtypes[t.replacement] == t.dtype
    ):
        return StepKind.COPY_ADAPTER
    if device.kernel_allowed and _kernel_fits(t, checkpoint, adapter):
        return StepKind.KERNEL
    return StepKind.TORCH


def _kernel_fits(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter) -> bool:
    op = t.lora
    if op is None or t.bias_of is not None or t.tokens is not None or not adapter.is_safetensors:
        return False
    if any(p.lora is None or p.bias_of is not None for p in t.stacked):
        return False
    if t.replacement is not None and not adapter.single_file:
        return False
    if t.replacement is not None:  # e.g. an embedding whose base layer the adapter saved (save_embedding_layers)
        if tuple(adapter.shapes[t.replacement]) != t.shape:
            return False
        start_dtype = adapter.dtypes[t.replacement]
    elif t.source is not None:
        start_dtype = checkpoint.info(t.source).dtype
    else:
        return False
    return all(_op_fits(o, t, start_dtype if o is op else t.dtype, adapter) for o in t.all_lora)


def _op_fits(
    op: LoraOp, t: TensorPlan, start_dtype: str, adapter: Adapter, shape: tuple[int, ...] | None = None
) -> bool:
    """One op of a tensor in the kernel: plain LoRA on one weight (a stacked op starts from the previous result).
    `shape` and `start_dtype` are the merged weight's when they are not the output tensor's (--keep-quantization)."""
    if (
        not op.module.is_lora
        or op.dora
        or op.experts != 1
        or op.part is not None
        or op.rows is not None
        or op.reorder is not None
        or op.delta_rows is not None
    ):
        return False
    a, b = op.module.a_key, op.module.b_key
    dtype = start_dtype if shape is not None else t.dtype
    return kernel.supports(
        layer=op.kind,
        transposed=op.transpose,
        dtype=dtype,
        start_dtype=start_dtype,
        shape=shape or t.shape,
        a_dtype=adapter.dtypes[a],
        b_dtype=adapter.dtypes[b],
        a_shape=adapter.shapes[a],
        b_shape=adapter.shapes[b],
    )


def _quant_kernel_fits(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter) -> bool:
    """--trained-on 4-bit on a (out, in) weight merged in its own dtype, with no LoRA or one the kernel merges."""
    q = t.quant
    assert q is not None and t.source is not None
    if not q.simulated or q.transposed or checkpoint.info(t.source).dtype != t.dtype:
        return False
    if not kernel.quantizes(method=q.scheme.method, blocksize=q.scheme.blocksize, dtype=t.dtype, shape=t.shape):
        return False
    if t.bias_of is not None or t.tokens is not None or t.stacked:
        return False
    return t.lora is None or _kernel_fits(t, checkpoint, adapter)


FP8_KERNEL_METHODS = ("fp8", "ct_fp8")


def _requant_kernel_fits(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter) -> bool:
    """--keep-quantization of a float8 weight whose bands quantize on their own (block-scaled: block rows;
    compressed-tensors: one scale per row), merged by the kernel in its compute dtype."""
    q = t.quant
    assert q is not None and q.keep is not None
    stored = q.stored
    if stored is None or t.replacement is not None:
        return False
    if stored.scheme.method == "fp8" and stored.scheme.block is None:
        return False
    if stored.scheme.method == "ct_fp8" and checkpoint.info(stored.parts["weight_scale"]).numel == 1:
        return False
    return _dequant_kernel_fits(t, checkpoint, adapter, q.keep.dtype)


def _dequant_kernel_fits(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter, dtype: str | None = None) -> bool:
    """A float8 base weight (block-scaled or compressed-tensors) dequantized straight into the merge dtype, with no
    LoRA or one the kernel merges: the dequantized value rounds once, as torch's float32(q) * scale then .to(dtype)
    (a compressed-tensors scale in another half dtype rounds twice, so that goes to torch)."""
    q = t.quant
    assert q is not None
    stored = q.stored
    if stored is None or q.transposed or stored.scheme.method not in FP8_KERNEL_METHODS or len(stored.shape) != 2:
        return False
    dtype = dtype or t.dtype  # the merge dtype (--keep-quantization: the compute dtype; t.dtype is the codes')
    if checkpoint.info(stored.parts["weight"]).dtype not in kernel.FLOAT8_DTYPES or stored.dtype not in ("F32", dtype):
        return False
    if dtype not in kernel.DTYPE_CODES or t.bias_of is not None or t.tokens is not None or t.stacked or t.parts:
        return False
    return kernel.available() and all(_op_fits(op, t, dtype, adapter, shape=stored.shape) for op in t.all_lora)


def worker_count() -> int:
    """Worker threads: one per core (copies wait on I/O, the kernel computes), 2 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def staging_sets(device: Device) -> int:
    """Buffer sets for tensors computed with torch: one on the CPU (torch uses every core), a few on a GPU."""
    return min(4, worker_count()) if device.is_cuda else 1


def estimate_memory(lowered: Lowered, adapter: Adapter) -> int:
    """Peak memory of a merge: the runtime, the kernel workers' blocks, and the largest torch working set.

    Kernel and copy steps hold a block of rows (plus the module's fp32 A and B) per worker. A
    torch step (one at a time on the CPU, a few on a GPU) holds the base tensor and its merged
    value; linear and embedding deltas are added in small fp32 blocks, other kinds (DoRA, conv,
    experts, ...) also hold two whole fp32 copies.
    """
    kernel_peak = torch_peak = 0
    for step in lowered.steps:
        t = step.tensor
        if step.kind in (StepKind.KERNEL, StepKind.QUANT_KERNEL, StepKind.DEQUANT_KERNEL, StepKind.REQUANT_KERNEL):
            ab = sum(
                4 * (math.prod(adapter.shapes[op.module.a_key]) + math.prod(adapter.shapes[op.module.b_key]))
                for op in t.all_lora
            )
            absmax = 0
            if step.kind is StepKind.DEQUANT_KERNEL:  # the codes of a band and its scales
                absmax = 2 * math.prod(t.shape) * 4 // max(1, t.shape[0])
            elif step.kind is StepKind.REQUANT_KERNEL:  # a band quantized back with torch: a few fp32 copies
                absmax = 6 * BLOCK_BYTES * 2
            elif t.quant is not None:  # absmax and scale per block, fp32
                absmax = 2 * 4 * math.prod(t.shape) // t.quant.scheme.blocksize
            kernel_peak = max(kernel_peak, 2 * BLOCK_BYTES + 2 * ab + absmax)
        elif step.by_expert:
            shape = t.quant.keep.shape if t.quant is not None and t.quant.keep is not None else t.shape
            one = math.prod(shape[1:]) * 4  # an expert's slice in fp32
            torch_peak = max(torch_peak, one * (3 + _DEQUANT_FP32_COPIES))
        elif step.kind in (StepKind.TORCH, StepKind.DEQUANT, StepKind.REQUANT):
            blocked = all(
                op.kind in ("linear", "embedding") and op.module.is_lora and not op.dora for op in t.all_lora
            )
            shape, nbytes = t.shape, step.nbytes
            if t.quant is not None and t.quant.keep is not None:  # the merged weight, then its codes
                shape, nbytes = t.quant.keep.shape, tensor_nbytes(t.quant.keep.dtype, t.quant.keep.shape)
            peak = nbytes * 3 if blocked else math.prod(shape) * 4 * 2 + nbytes * 3
            if step.kind is not StepKind.TORCH:  # fp32 codes, scales and values of the whole weight
                peak += math.prod(shape) * 4 * _DEQUANT_FP32_COPIES
            torch_peak = max(torch_peak, peak)
    runtime = _RUNTIME_BYTES + (_TORCH_BYTES if lowered.imports_torch else 0)
    if lowered.uses_torch:  # on a GPU each staging set may hold a tensor on the host
        torch_peak *= staging_sets(lowered.device)
    return runtime + worker_count() * kernel_peak + torch_peak
