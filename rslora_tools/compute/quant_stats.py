"""How far quantization moved the weights, against the adapter's own delta (`--trained-on`, a quantized base).

Measured on the weights a merge quantizes as in training and changes with LoRA: the executor
records each one's squared norms as it merges (compute.torch_ops.torch_ops.quantization_norms, or the
kernel's); a dry run measures a sample of them with torch. The report gives medians.
"""

from __future__ import annotations

import math
from typing import Any

from ..adapter.adapter import Adapter
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..plan.tensors import Plan

_MEASURED_TENSORS = 8  # how many LoRA-targeted weights --trained-on measures the quantization error on


def measurable_weights(plan: Plan) -> int:
    return sum(t.quant is not None and t.quant.simulated and t.lora is not None for t in plan.tensors)


def sample_quantization(plan: Plan, checkpoint: Checkpoint, adapter: Adapter) -> dict[str, tuple[float, float, float]]:
    """A dry run's measure: quantization_norms of a few LoRA-targeted weights spread over the model (torch)."""
    targets = [t for t in plan.tensors if t.quant is not None and t.quant.simulated and t.lora is not None]
    if not targets:  # (no LoRA on a quantized weight)
        return {}
    from .torch_ops import quantization_error

    step = max(1, len(targets) // _MEASURED_TENSORS)
    files = CheckpointFiles(checkpoint)
    try:
        return {t.name: quantization_error(t, files.read, adapter.tensor) for t in targets[::step][:_MEASURED_TENSORS]}
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
        "tensors": len(norms), "of": targeted,
        "quant_error_over_weight": _median(error_over_weight), "delta_over_weight": _median(delta_over_weight),
        "quant_error_over_delta": _median(error_over_delta),
        "quant_error_over_delta_max": error_over_delta[-1] if error_over_delta else None,
    }


def _median(values: list[float]) -> float | None:
    return values[len(values) // 2] if values else None
