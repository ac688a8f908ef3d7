"""How far quantization moves the weights, against the adapter's own delta (`--trained-on`, a quantized base).

Measured on the weights a merge quantizes and changes with LoRA:
- `--trained-on`: the base weight against its quantized value (compute.torch_ops.quantization_norms, or the
  kernel's), recorded by the executor as it merges; a dry run measures a sample with torch;
- a quantized base with a quantizer rslora-tools has (formats.quant.REQUANTIZED_ROLES): the merged weight against
  its value quantized back (compute.requantize.requantization_norms): what `--keep-quantization` loses of the
  delta. With --keep-quantization the executor records it for every changed weight; otherwise a sample is
  measured (dry run and merge alike).
The report gives medians, and with --keep-quantization each weight's error.
"""

from __future__ import annotations

import math
from typing import Any

from ..adapter.adapter import Adapter
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.quant import REQUANTIZED_ROLES
from ..plan.tensors import Plan, TensorPlan

_MEASURED_TENSORS = 8  # how many LoRA-targeted weights --trained-on measures the quantization error on


def _measurable(plan: Plan) -> list[TensorPlan]:
    """The LoRA-targeted weights whose quantization can be measured: quantized as trained, or stored quantized in a
    format rslora-tools can quantize back."""
    return [
        t
        for t in plan.tensors
        if t.quant is not None
        and t.lora is not None
        and t.replacement is None
        and (t.quant.simulated or t.quant.scheme.method in REQUANTIZED_ROLES)
    ]


def measurable_weights(plan: Plan) -> int:
    return len(_measurable(plan))


def sample_quantization(plan: Plan, checkpoint: Checkpoint, adapter: Adapter) -> dict[str, tuple[float, float, float]]:
    """A sample's measure: quantization (or requantization) norms of a few LoRA-targeted weights spread over the
    model (torch)."""
    targets = _measurable(plan)
    if not targets:  # (no LoRA on a quantized weight)
        return {}
    from .requantize import requantization_error
    from .torch_ops import quantization_error

    step = max(1, len(targets) // _MEASURED_TENSORS)
    files = CheckpointFiles(checkpoint)
    try:
        return {
            t.name: quantization_error(t, files.read, adapter.tensor)
            if t.quant is not None and t.quant.simulated
            else requantization_error(t, checkpoint, files, adapter.tensor)
            for t in targets[::step][:_MEASURED_TENSORS]
        }
    finally:
        files.close()


def measured_quantization(norms: dict[str, tuple[float, float, float]], targeted: int) -> dict[str, Any] | None:
    """The report's summary of quantization_norms: relative norms, medians over the measured weights."""
    if not norms:
        return None
    roots = [tuple(math.sqrt(x) for x in n) for n in norms.values()]
    error_over_weight = sorted(e / w for w, e, _ in roots if w > 0)
    error_over_delta = sorted(e / d for _, e, d in roots if d > 0)
    delta_over_weight = sorted(d / w for w, _, d in roots if w > 0)
    return {
        "tensors": len(norms),
        "of": targeted,
        "quant_error_over_weight": _median(error_over_weight),
        "delta_over_weight": _median(delta_over_weight),
        "quant_error_over_delta": _median(error_over_delta),
        "quant_error_over_delta_max": error_over_delta[-1] if error_over_delta else None,
    }


def each_requantization(norms: dict[str, tuple[float, float, float]]) -> dict[str, dict[str, float | None]]:
    """--keep-quantization: each weight's requantization error relative to the weight and to the delta."""
    out = {}
    for name, (w, e, d) in sorted(norms.items()):
        w, e, d = math.sqrt(w), math.sqrt(e), math.sqrt(d)
        out[name] = {"error_over_weight": e / w if w > 0 else None, "error_over_delta": e / d if d > 0 else None}
    return out


def _median(values: list[float]) -> float | None:
    return values[len(values) // 2] if values else None
