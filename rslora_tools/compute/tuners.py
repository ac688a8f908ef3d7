"""The delta of each LoRA-family tuner besides LoRA, computed with torch exactly as PEFT 0.21.2 computes it.

One function per tuner, each a transcription of that tuner's `get_delta_weight` op for op (docs/peft-rules.md,
"Other tuners"), because equal bits need the same torch ops in the same order and dtypes. The factors are held as
PEFT holds them after loading (half precision upcast to float32, compute/torch_ops.adapter_weight), and every
tuner merges by `weight += delta`: a float32 delta added in place, rounded once to the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapter.tuners import ADALORA, LOHA, LOKR, VERA
from ..plan.tensors import LoraOp

Factor = Callable[[str], torch.Tensor]


def apply_tuner(w: torch.Tensor, op: LoraOp, factor: Factor) -> torch.Tensor:
    """Merge one module of another tuner into its (writable) weight; `factor(role)` reads its factors."""
    w += tuner_delta(op, factor, w.shape)
    return w


def tuner_delta(op: LoraOp, factor: Factor, w_shape: torch.Size) -> torch.Tensor:
    """PEFT's get_delta_weight for the module's tuner, in the base weight's shape (and layout)."""
    method = op.module.method
    if method == LOHA.peft_type:
        return _loha(op, factor).reshape(w_shape)
    if method == LOKR.peft_type:
        return _lokr(op, factor).reshape(w_shape)
    if method == ADALORA.peft_type:
        return _adalora(op, factor, w_shape)
    if method == VERA.peft_type:
        return _vera(op, factor, w_shape)
    raise AssertionError(method)


def _loha(op: LoraOp, factor: Factor) -> torch.Tensor:
    """peft/tuners/loha/layer.py: HadaWeight.forward, or HadaWeightCP.forward with hada_t1 (effective conv2d); the
    scale a float32 tensor, as `torch.tensor(self.scaling[adapter])` makes it."""
    scale = torch.tensor(op.scale.scale)
    w1a, w1b, w2a, w2b = (factor(r) for r in ("w1_a", "w1_b", "w2_a", "w2_b"))
    if "t1" in op.module.factors:
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", factor("t1"), w1b, w1a)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", factor("t2"), w2b, w2a)
        return rebuild1 * rebuild2 * scale
    return ((w1a @ w1b) * (w2a @ w2b)) * scale


def _lokr(op: LoraOp, factor: Factor) -> torch.Tensor:
    """peft/tuners/lokr/layer.py: get_delta_weight and make_kron (a 4-D w2 takes w1 unsqueezed twice)."""
    f = op.module.factors
    w1 = factor("w1") if "w1" in f else factor("w1_a") @ factor("w1_b")
    if "w2" in f:
        w2 = factor("w2")
    elif "t2" in f:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", factor("t2"), factor("w2_a"), factor("w2_b"))
    else:
        w2 = factor("w2_a") @ factor("w2_b")
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    # PEFT's `w2.contiguous()`, in fresh row-major strides: a Conv1d's (c, d, k, 1) einsum result is already
    # "contiguous" with an odd stride on its size-1 dimension, on which torch.kron fails (PEFT 0.21.2 crashes there;
    # the values are the same either way)
    w2 = torch.empty(w2.shape, dtype=w2.dtype, device=w2.device).copy_(w2)
    return torch.kron(w1, w2) * op.scale.scale


def _adalora(op: LoraOp, factor: Factor, w_shape: torch.Size) -> torch.Tensor:
    """peft/tuners/adalora/layer.py: SVDLinear / SVDConv2d.get_delta_weight. `scaling` is lora_alpha (the module's
    rank when lora_alpha <= 0); `ranknum` a one-element float32 tensor holding init_r."""
    a, b, e = factor("A"), factor("B"), factor("E")
    alpha = op.scale.alpha
    scaling = alpha if alpha > 0 else float(a.shape[0])
    ranknum = torch.full((1,), float(op.scale.r), dtype=torch.float32, device=a.device)
    delta = b @ (a * e)
    if op.kind == "conv":
        return (delta * scaling / (ranknum + 1e-5)).reshape(w_shape)
    return (delta.T if op.transpose else delta) * scaling / (ranknum + 1e-5)


def _vera(op: LoraOp, factor: Factor, w_shape: torch.Size) -> torch.Tensor:
    """peft/tuners/vera/layer.py: Linear.get_delta_weight, the shared projections sliced to the layer's size."""
    out_features, in_features = (w_shape[1], w_shape[0]) if op.transpose else (w_shape[0], w_shape[1])
    sliced_a = factor("vera_A")[:, :in_features]
    sliced_b = factor("vera_B")[:out_features, :]
    lambda_b = factor("lambda_b").unsqueeze(-1)
    lambda_d = factor("lambda_d").unsqueeze(-1)
    delta = (lambda_b * sliced_b) @ (lambda_d * sliced_a)
    return delta.T if op.transpose else delta
