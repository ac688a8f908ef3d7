"""Which base tensor each LoRA module changes, with which kind of delta, checked against shapes.

Adapter module paths are matched to checkpoint names by plan/names.py (as named, up to a leading prefix, or by
transformers' loading rules); the layer kind
(linear, GPT-2 Conv1D, embedding, convolution, MultiheadAttention, target parameters and MoE
experts) is read from the saved shapes and the base weight (docs/peft-rules.md, "Deltas").
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..adapter.adapter import Adapter, LoraModule
from ..formats.checkpoint import Checkpoint
from ..errors import MismatchError, UnsupportedAdapterError
from ..adapter.module_scales import ModuleEntry, pattern_name, rank_mismatch, target_parameters_of, wraps_parameters
from .names import NameResolver
from .tensors import LayerKind, LoraOp

# Architectures whose linear layers are transformers' Conv1D ((in, out) weights; PEFT's fan_in_fan_out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "gpt_bigcode_conv1d"}

# Architectures whose fused expert parameters are (experts, in, out): transformers 5.25.0's
# `@use_experts_implementation(is_transposed=True)`, which PEFT's ParamWrapper reads to orient the delta; every other
# architecture's are (experts, out, in). tests/plan/test_expert_orientation.py checks it against the installed one.
TRANSPOSED_EXPERTS = {"aria", "aria_text", "ergo", "gpt_oss", "openai_privacy_filter"}

ShapeOf = Callable[[str], tuple[int, ...]]


def place_module(
    module: LoraModule, adapter: Adapter, shape_of: ShapeOf, resolver: NameResolver, model_type: str | None
) -> tuple[str | None, LoraOp]:
    """Find the base tensor a LoRA module changes, and the kind of delta (target None: nothing matches)."""
    cfg = adapter.config
    own = resolver.own_parameters(module.name) if cfg.target_parameters else None
    target = resolver.find(module.name + ".weight")
    if wraps_parameters(cfg, module, own) or (cfg.target_parameters and target is None):
        return _place_parameter(module, adapter, shape_of, resolver, model_type, own)
    name = pattern_name(adapter, module, own=own)
    if target is None:
        in_proj = resolver.find(module.name + ".in_proj_weight")
        if in_proj is not None:
            return in_proj, make_op(module, adapter, "mha", shape_of(in_proj), False, scale_name=name)
        return None, make_op(module, adapter, "linear", (), False, scale_name=name)
    w_shape = shape_of(target)
    if module.mha_parent is not None:
        return target, make_op(module, adapter, "mha_out", w_shape, False, scale_name=name)
    if module.embedding:
        return target, make_op(module, adapter, "embedding", w_shape, False, scale_name=name)
    if len(adapter.shapes[module.a_key]) > 2:
        return target, make_op(module, adapter, "conv", w_shape, False, scale_name=name)
    transpose = _linear_layout(module, adapter, w_shape, model_type)
    return target, make_op(module, adapter, "linear", w_shape, transpose, scale_name=name)


def _linear_layout(module: LoraModule, adapter: Adapter, w_shape: tuple[int, ...], model_type: str | None) -> bool:
    """Whether W is stored (in, out) (transformers Conv1D), decided per tensor by shape."""
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    plain = w_shape == (b[0], a[1])
    transposed = w_shape == (a[1], b[0])
    if plain and transposed:  # square: shapes cannot tell; the architecture or the config can
        return model_type in CONV1D_MODEL_TYPES or adapter.config.fan_in_fan_out
    if not plain and not transposed:
        raise MismatchError(
            f"{adapter.weights_path}: module {module.name!r}: LoRA A{list(a)} and B{list(b)} give a "
            f"({b[0]}, {a[1]}) delta, but the base weight is {list(w_shape)}"
        )
    return transposed


def _parameter_op(module: LoraModule, adapter: Adapter, target: str, w: tuple[int, ...], name: str,
                  model_type: str | None) -> LoraOp | None:
    """The op for a target_parameters wrapper on base tensor `target` of shape `w`, or None when it does not fit.

    A square expert parameter (gpt-oss's down_proj) is oriented as PEFT orients it: by the architecture's experts
    layout (TRANSPOSED_EXPERTS); without a model_type it is refused."""
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if len(w) == 2 and w == (b[0], a[1]):
        return make_op(module, adapter, "param", w, False, scale_name=name)
    if len(w) == 3 and a[0] % w[0] == 0 and b[1] == a[0]:
        experts, d1, d2 = w
        straight = a[1] == d2 and b[0] == d1
        swapped = a[1] == d1 and b[0] == d2
        if straight and swapped and model_type is None:
            raise UnsupportedAdapterError(
                f"{adapter.weights_path}: module {module.name!r}: expert parameter {target!r} is square "
                f"{list(w)} and the base has no config.json model_type, so the orientation of the LoRA delta is "
                "ambiguous; merge it with PEFT"
            )
        if straight and swapped:
            swapped = model_type in TRANSPOSED_EXPERTS
        if straight or swapped:
            return make_op(module, adapter, "experts", w, swapped, experts=experts, scale_name=name)
    return None


def _place_parameter(
    module: LoraModule, adapter: Adapter, shape_of: ShapeOf, resolver: NameResolver, model_type: str | None,
    own: set[str] | None,
) -> tuple[str | None, LoraOp]:
    """target_parameters (ParamWrapper): the parameter this wrapper holds (adapter.module_scales.pattern_name decides,
    among the module's own parameters in the base, `own`)."""
    def fits(name: str) -> bool:
        target = resolver.find(name)
        return target is not None and _fitting_shape(module, adapter, shape_of(target))

    if not any(fits(p) for p in target_parameters_of(adapter.config, module.name, own)):
        return None, make_op(module, adapter, "param", (), False, scale_name=module.name)
    name = pattern_name(adapter, module, fits, own)
    target = resolver.find(name)
    op = _parameter_op(module, adapter, target, shape_of(target), name, model_type) if target is not None else None
    if target is None or op is None:
        return None, make_op(module, adapter, "param", (), False, scale_name=name)
    return target, op


def _fitting_shape(module: LoraModule, adapter: Adapter, w: tuple[int, ...]) -> bool:
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if len(w) == 2:
        return w == (b[0], a[1])
    return len(w) == 3 and a[0] % w[0] == 0 and b[1] == a[0] and {a[1], b[0]} == {w[1], w[2]}


def make_op(
    module: LoraModule,
    adapter: Adapter,
    kind: LayerKind,
    w_shape: tuple[int, ...],
    transpose: bool,
    *,
    experts: int = 1,
    scale_name: str | None = None,
) -> LoraOp:
    """The op for a module at its scale; the saved rank must be the rank the config gives (once a base tensor fits)."""
    name = scale_name or pattern_name(adapter, module)
    scale = adapter.config.scale_for(name)
    shape_rank = adapter.shapes[module.a_key][0] // experts
    if w_shape and shape_rank != scale.r:
        raise MismatchError(f"{adapter.weights_path}: {rank_mismatch(ModuleEntry(module, name, shape_rank, scale))}")
    return LoraOp(module, kind, scale, transpose, experts, dora=module.magnitude_key is not None)


def check_shapes(op: LoraOp, adapter: Adapter, w: tuple[int, ...], target: str) -> None:
    """Cross-check A/B (and DoRA magnitude) shapes against the base weight; refuse what PEFT cannot merge."""
    module, where = op.module, adapter.weights_path
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    r = a[0]

    def bad(expected: str) -> MismatchError:
        return MismatchError(
            f"{where}: module {module.name!r}: LoRA A{list(a)} / B{list(b)} do not fit base tensor {target!r} "
            f"{list(w)} ({expected})"
        )

    if op.kind == "embedding":
        if len(a) != 2 or w != (a[1], b[0]) or b[1] != r:
            raise bad(f"expected A [r, {w[0] if w else '?'}] and B [{w[1] if len(w) > 1 else '?'}, r]")
        out = w[1]
    elif op.kind == "conv":
        if len(w) != len(a):
            raise bad("a convolution LoRA needs a convolution weight")
        if b[1] != r or (w[1] != a[1] and a[1] % w[1] == 0):
            raise UnsupportedAdapterError(
                f"{where}: module {module.name!r}: convolution with groups > 1; PEFT cannot merge LoRA into grouped convolutions"
            )
        if w[0] != b[0] or w[1] != a[1] or tuple(w[2:]) != tuple(a[2:]) or any(d != 1 for d in b[2:]):
            raise bad(f"expected A [r, {w[1]}, {', '.join(map(str, w[2:]))}] and B [{w[0]}, r, 1...]")
        out = w[0]
    elif op.kind in ("linear", "param", "mha", "mha_out"):
        if b[1] != r:
            raise bad("B's second dimension must equal the rank")
        out = w[1] if op.transpose else w[0]
    else:  # experts: checked when placed
        out = w[1]
    if op.dora:
        assert module.magnitude_key is not None
        m = adapter.shapes[module.magnitude_key]
        if math.prod(m) != out or max(m, default=1) != out:
            raise MismatchError(
                f"{where}: module {module.name!r}: DoRA magnitude vector has shape {list(m)}, expected {out} values"
            )
        if op.kind not in ("linear", "embedding", "conv"):
            raise UnsupportedAdapterError(f"{where}: module {module.name!r}: DoRA is not supported on {op.kind} layers")
