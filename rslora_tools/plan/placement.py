"""Which base tensor each LoRA module changes, with which kind of delta, checked against shapes.

Adapter module paths are matched to checkpoint names by plan/names.py (as named, up to a leading prefix, or by
transformers' loading rules); the layer kind
(linear, GPT-2 Conv1D, embedding, convolution, MultiheadAttention, target parameters and MoE
experts) is read from the saved shapes and the base weight (docs/peft-rules.md, "Deltas").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.module_scales import ModuleEntry, pattern_name, rank_mismatch, target_parameters_of, wraps_parameters
from ..adapter.tuners import ADALORA, TUNERS, delta_size, saved_rank
from ..errors import MismatchError, UnsupportedAdapterError
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
    if not module.is_lora:
        return _place_tuner_module(module, adapter, shape_of, resolver, model_type)
    cfg = adapter.config
    own = resolver.own_parameters(module.name) if cfg.target_parameters else None
    target = resolver.find(module.name + ".weight")
    transposed = resolver.transposed(module.name + ".weight") if target is None else None
    reordered = resolver.reordered(module.name + ".weight") if target is None else None
    if wraps_parameters(cfg, module, own) or (
        cfg.target_parameters and target is None and transposed is None and reordered is None
    ):
        return _place_parameter(module, adapter, shape_of, resolver, model_type, own)
    name = pattern_name(adapter, module, own=own)
    if reordered is not None and len(adapter.shapes[module.a_key]) == 2 and not module.embedding:
        stored, how = reordered
        shape = shape_of(stored)
        op = make_op(
            module, adapter, "linear", shape, _linear_layout(module, adapter, shape, model_type), scale_name=name
        )
        op.reorder = reorder_of(how, resolver, stored)
        return stored, op
    if transposed is not None and len(adapter.shapes[module.a_key]) == 2 and not module.embedding:
        # transformers transposes the stored (in, out) weight on loading: the stored tensor gets the delta transposed
        shape = shape_of(transposed)
        return transposed, make_op(
            module, adapter, "linear", shape, _transposed_fits(module, adapter, shape), scale_name=name
        )
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
    # MiCA's merge casts the delta to W's dtype before adding it (peft 0.21.2 MiCALinearVariant.merge_unsafe: two
    # roundings, as a ParamWrapper's); a Linear's adds it in float32 (one)
    kind: LayerKind = "param" if cfg.delta_cast_first and not transpose and module.magnitude_key is None else "linear"
    return target, make_op(module, adapter, kind, w_shape, transpose, scale_name=name)


def _place_tuner_module(
    module: LoraModule, adapter: Adapter, shape_of: ShapeOf, resolver: NameResolver, model_type: str | None
) -> tuple[str | None, LoraOp]:
    """A module of another tuner (adapter/tuners.py) on its layer's weight: a Linear, a convolution (LoHa, LoKr,
    AdaLoRA) or transformers' Conv1D (AdaLoRA, VeRA: fan_in_fan_out), the layers PEFT 0.21.2 wraps with it. Its
    delta's (out, in * kernel) size must be the weight's, as PEFT reshapes it; its saved rank the config's."""
    tuner = TUNERS[module.method]
    scale = adapter.config.scale_for(module.name)
    target = resolver.find(module.name + ".weight")
    if target is None:
        return None, LoraOp(module, "linear", scale)
    w = shape_of(target)
    out, inner = delta_size(module.method, module.factors, adapter.shapes)
    where = f"{adapter.weights_path}: {tuner.name} module {module.name!r}"
    _check_tuner_rank(module, adapter, scale.r, where)
    if len(w) > 2:
        if not tuner.conv or len(w) > 4:
            raise UnsupportedAdapterError(f"{where}: PEFT's {tuner.name} does not wrap a {len(w) - 2}-D convolution")
        if (out, inner) != (w[0], math.prod(w[1:])):
            raise MismatchError(f"{where}: its delta is ({out}, {inner}), which does not reshape to {list(w)}")
        return target, LoraOp(module, "conv", scale)
    if len(w) != 2:
        raise MismatchError(f"{where}: base tensor {target!r} {list(w)} is not a layer's weight")
    plain = out == w[0] and inner in (w[1], -1)
    transposed = tuner.conv1d and out == w[1] and inner in (w[0], -1)
    if plain and transposed:  # square: the architecture or the config decides, as for LoRA
        plain = not (model_type in CONV1D_MODEL_TYPES or adapter.config.fan_in_fan_out)
    if not plain and not transposed:
        size = f"({out}, {'in' if inner < 0 else inner})"
        raise MismatchError(f"{where}: its delta is {size}, but the base weight {target!r} is {list(w)}")
    if "vera_A" in adapter.shared:
        _check_vera_projections(adapter, w if plain else w[::-1], scale.r, where)
    return target, LoraOp(module, "linear", scale, transpose=not plain)


def _check_tuner_rank(module: LoraModule, adapter: Adapter, r: int, where: str) -> None:
    """The saved rank is the config's (AdaLoRA: at most its init_r, which pruning lowers), else PEFT cannot load it."""
    rank = saved_rank(module.method, module.factors, adapter.shapes)
    pruned = module.method == ADALORA.peft_type
    if rank is not None and (rank > r if pruned else rank != r):
        field = "init_r" if pruned else "r (or rank_pattern)"
        raise MismatchError(f"{where}: the saved factors have rank {rank}, but the config's {field} gives {r}")


def _check_vera_projections(adapter: Adapter, w: tuple[int, ...], r: int, where: str) -> None:
    """VeRA's shared vera_A (r, in) and vera_B (out, r) cover this (out, in) weight (PEFT slices them to it)."""
    a, b = adapter.shapes[adapter.shared["vera_A"]], adapter.shapes[adapter.shared["vera_B"]]
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or a[1] < w[1] or b[0] < w[0]:
        raise MismatchError(
            f"{where}: the shared vera_A {list(a)} and vera_B {list(b)} do not cover a rank-{r} delta of {list(w)}"
        )


def place_piece(
    module: LoraModule, adapter: Adapter, shape_of: ShapeOf, resolver: NameResolver
) -> tuple[str, LoraOp] | None:
    """A Linear LoRA whose weight transformers cuts out of a stored tensor's rows (a fused q/k/v or gate/up stored as
    one tensor, a Chunk or Split converter): the stored tensor, and the op on its rows. None: not such a module."""
    piece = resolver.piece(module.name + ".weight")
    if piece is None or len(adapter.shapes[module.a_key]) != 2:
        return None
    w = shape_of(piece.stored)
    if piece.equal:  # torch.chunk: pieces of ceil(rows / n) rows, the last one what is left
        size = -(-w[0] // len(piece.names))
        sizes = [max(0, min(size, w[0] - i * size)) for i in range(len(piece.names))]
    else:  # torch.split by the model's parameter sizes: the adapter's LoRA on each piece gives them
        modules = {m.name + ".weight": m for m in adapter.lora_modules if m.depth == 0}
        found = [
            modules.get(n) or next((m for k, m in modules.items() if k.endswith("." + n) or n.endswith("." + k)), None)
            for n in piece.names
        ]
        if any(m is None for m in found):
            raise UnsupportedAdapterError(
                f"{adapter.weights_path}: module {module.name!r}: the checkpoint stores it inside {piece.stored!r}, "
                f"which transformers splits into {', '.join(piece.names)} by the model's parameter sizes; the adapter "
                "gives those sizes only when it has a LoRA on every piece"
            )
        sizes = [adapter.shapes[m.b_key][0] for m in found if m is not None]
    start = sum(sizes[: piece.index])
    shape = (sizes[piece.index], *w[1:])
    if sum(sizes) != w[0]:
        raise MismatchError(
            f"{adapter.weights_path}: module {module.name!r}: the pieces of {piece.stored!r} "
            f"{list(w)} would have {sizes} rows"
        )
    op = make_op(
        module,
        adapter,
        "linear",
        shape,
        _linear_layout(module, adapter, shape, None),
        scale_name=pattern_name(adapter, module, own=resolver.own_parameters(module.name)),
    )
    op.rows = (start, start + shape[0])
    if piece.reorder is not None:
        op.reorder = reorder_of(piece.reorder, resolver, piece.stored, shape[0])
    return piece.stored, op


def reorder_of(
    how: tuple[str, Any, bool], resolver: NameResolver, stored: str, rows: int | None = None
) -> tuple[str, int, bool]:
    """A converter's reordering with what it reads from the config: Interleave's dim, or the attention heads
    PermuteForRope splits the rows (`rows`: of a piece; else the stored tensor's) into (the config's, or its
    sub-config's, `num_attention_heads`)."""
    kind, arg, inverse = how
    if kind == "interleave":
        return kind, int(arg), inverse
    config = resolver.checkpoint.config or {}
    sub = config.get(arg) if isinstance(arg, str) and isinstance(config.get(arg), dict) else config
    heads = sub.get("num_attention_heads", 1) if isinstance(sub, dict) else 1
    if not isinstance(heads, int) or heads < 1 or (rows or resolver.shape(stored)[0]) % (2 * heads):
        raise UnsupportedAdapterError(
            f"{stored!r}: transformers permutes it for RoPE by {heads!r} attention heads, "
            "which do not divide its rows; rslora-tools cannot place a LoRA on it"
        )
    return kind, heads, inverse


def place_concatenated(
    module: LoraModule, adapter: Adapter, shape_of: ShapeOf, resolver: NameResolver
) -> list[tuple[str, LoraOp]] | None:
    """A Linear LoRA on a weight that transformers concatenates from stored tensors along their rows (a
    `gate_up_proj` stored as `gate_proj` and `up_proj`): each stored tensor and the op that gives it its rows of the
    delta. None: not such a module."""
    parts = resolver.concatenated(module.name + ".weight")
    if not parts or len(adapter.shapes[module.a_key]) != 2:
        return None
    where = f"{adapter.weights_path}: module {module.name!r}"
    if module.magnitude_key is not None or module.bias_key is not None:
        raise UnsupportedAdapterError(
            f"{where}: DoRA or lora_bias on a weight the checkpoint stores in "
            f"{len(parts)} tensors ({', '.join(parts)}) cannot be split onto them"
        )
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    shapes = [shape_of(p) for p in parts]
    if sum(s[0] for s in shapes) != b[0] or any(len(s) != 2 or s[1] != a[1] for s in shapes):
        raise MismatchError(
            f"{where}: LoRA A{list(a)} and B{list(b)} do not fit {', '.join(parts)} "
            f"({', '.join(str(list(s)) for s in shapes)}), which transformers concatenates"
        )
    placed, start = [], 0
    name = pattern_name(adapter, module, own=resolver.own_parameters(module.name))
    for stored, shape in zip(parts, shapes):
        op = make_op(module, adapter, "linear", (b[0], a[1]), False, scale_name=name)
        op.delta_rows = (start, start + shape[0])
        placed.append((stored, op))
        start += shape[0]
    return placed


def _transposed_fits(module: LoraModule, adapter: Adapter, w: tuple[int, ...]) -> bool:
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if w != (a[1], b[0]):
        raise MismatchError(
            f"{adapter.weights_path}: module {module.name!r}: LoRA A{list(a)} and B{list(b)} give a "
            f"({b[0]}, {a[1]}) delta, but the base stores the weight transposed as {list(w)}"
        )
    return True


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


def _parameter_op(
    module: LoraModule, adapter: Adapter, target: str, w: tuple[int, ...], name: str, model_type: str | None
) -> LoraOp | None:
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
    module: LoraModule,
    adapter: Adapter,
    shape_of: ShapeOf,
    resolver: NameResolver,
    model_type: str | None,
    own: set[str] | None,
) -> tuple[str | None, LoraOp]:
    """target_parameters (ParamWrapper): the parameter this wrapper holds (adapter.module_scales.pattern_name decides,
    among the module's own parameters in the base, `own`)."""

    def stored(name: str) -> tuple[str | None, tuple[str, Any, bool] | None]:
        target = resolver.find(name)
        reordered = resolver.reordered(name) if target is None else None
        return (reordered[0], reordered[1]) if reordered is not None else (target, None)

    def fits(name: str) -> bool:
        target, _ = stored(name)
        return target is not None and _fitting_shape(module, adapter, shape_of(target), model_type)

    if not any(fits(p) for p in target_parameters_of(adapter.config, module.name, own)):
        return None, make_op(module, adapter, "param", (), False, scale_name=module.name)
    name = pattern_name(adapter, module, fits, own, resolver.parameter_order(module.name))
    target, how = stored(name)
    op = _parameter_op(module, adapter, target, shape_of(target), name, model_type) if target is not None else None
    if target is None or op is None:
        return None, make_op(module, adapter, "param", (), False, scale_name=name)
    if how is not None:
        op.reorder = reorder_of(how, resolver, target)
    return target, op


def _fitting_shape(module: LoraModule, adapter: Adapter, w: tuple[int, ...], model_type: str | None) -> bool:
    """Whether the wrapper's factors fit a parameter of shape `w`: (out, in), or experts of (out, in) or (in, out).
    Where two parameters of one module both fit (swapped shapes), the order the module registers them decides
    (module_scales.pattern_name); `model_type` orients a square one (_parameter_op)."""
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
                f"{where}: module {module.name!r}: convolution with groups > 1; PEFT cannot merge LoRA into grouped "
                f"convolutions"
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
            raise UnsupportedAdapterError(
                f"{where}: module {module.name!r}: DoRA is not supported on {op.kind} layers"
            )
