"""Expert LoRA across expert layouts: a fused (target_parameters) adapter on per-expert tensors, and the reverse.

transformers 5 fuses MoE experts in memory and PEFT merges them there (docs/peft-rules.md, "Layouts"):
- a target_parameters adapter on `mlp.experts.gate_up_proj` (E, 2I, H) holds every expert's factors (A: E*r rows,
  expert-major; B: E*r columns, expert-minor); on a checkpoint stored per expert, expert e's gate (up) tensor gets
  the gate (up) rows of `einsum(B_e, A_e)`;
- a per-expert adapter (`experts.3.w1`, made with transformers 4) is what PEFT converts to fused factors on
  loading; on a fused checkpoint, each module changes its expert's gate, up or down slice;
- either way PEFT's ParamWrapper merges: the delta is cast to the weight's dtype, then added (one rounding
  more than a Linear's merge), so a per-expert module of a family transformers 5 fuses merges that way too.
Anything whose place cannot be decided from names and shapes is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.module_scales import pattern_name
from ..errors import MismatchError, UnsupportedAdapterError
from .layouts import FUSED, Layouts
from .placement import NameResolver, make_op
from .tensors import ExpertPart, LoraOp

ShapeOf = Callable[[str], tuple[int, ...]]
_FUSED_MODULE = re.compile(r"^(?P<layer>.*)\.mlp\.experts$")


def place_across_layouts(module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf,
                         layouts: Layouts) -> list[tuple[str, LoraOp]] | None:
    """The tensors a module that matches nothing as named changes in the checkpoint's other expert layout, with
    the op for each; None when it is not an expert module of a known family (the caller reports it unmatched)."""
    if layouts.experts is None:
        return None
    per_expert = layouts.per_expert_module(module.name)
    if per_expert is not None:
        placed = _per_expert_on_fused(module, adapter, resolver, shape_of, layouts, *per_expert)
        return [placed] if placed is not None else None
    if adapter.config.target_parameters and _FUSED_MODULE.match(module.name):
        return _fused_on_per_expert(module, adapter, resolver, shape_of, layouts)
    return None


def as_expert_op(op: LoraOp, module: LoraModule, layouts: Layouts) -> LoraOp:
    """A per-expert module placed on its own tensor, in a family transformers 5 fuses: merged as PEFT's ParamWrapper
    merges the fused parameter it becomes (the delta cast to the weight's dtype first)."""
    if (layouts.per_expert_module(module.name) is None or op.kind != "linear" or op.transpose or op.dora
            or module.bias_key is not None):
        return op
    return dataclasses.replace(op, kind="param")


def _fused_on_per_expert(module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf,
                         layouts: Layouts) -> list[tuple[str, LoraOp]] | None:
    layer = _FUSED_MODULE.match(module.name)["layer"]  # type: ignore[index]
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    name = fused_parameter(module, adapter, resolver, shape_of, layouts)
    param = name.rpartition(".")[2]
    if param not in FUSED:
        return None
    scale = adapter.config.scale_for(name)
    where = f"{adapter.weights_path}: module {module.name!r} ({param})"
    if len(a) != 2 or len(b) != 2 or a[0] % scale.r or b[1] != a[0]:
        raise MismatchError(f"{where}: LoRA A{list(a)} and B{list(b)} are not rank {scale.r} factors of fused experts")
    experts = a[0] // scale.r
    roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
    placed: list[tuple[str, LoraOp]] = []
    for expert in range(experts):
        for role in roles:
            target = resolver.find(layouts.per_expert_name(layer, expert, role), record=False)
            if target is None:
                return None if not placed else _missing(where, layouts.per_expert_name(layer, expert, role))
            rows = layouts.rows(role, b[0])
            out = len(range(*rows)) if rows else b[0]
            if shape_of(target) != (out, a[1]):
                raise MismatchError(f"{where}: expert {expert}'s {role} is {list(shape_of(target))} in the checkpoint "
                                    f"({target!r}), the adapter's factors give ({out}, {a[1]})")
            part = ExpertPart(expert, experts, True, rows, in_out=False)
            placed.append((target, LoraOp(module, "param", scale, part=part)))
    if resolver.find(layouts.per_expert_name(layer, experts, roles[0]), record=False) is not None:
        raise MismatchError(f"{where}: the adapter's factors hold {experts} experts, the checkpoint has more")
    return placed


def fused_parameter(module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf,
                    layouts: Layouts) -> str:
    """The `<module>.<param>` name of the fused expert parameter a target_parameters module wraps, told apart by the
    checkpoint's shapes (expert 0's per-expert tensor, or the fused tensor) where nested wrappers leave it open."""
    m = _FUSED_MODULE.match(module.name)
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]

    def fits(param_name: str) -> bool:
        param = param_name.rpartition(".")[2]
        if m is None or param not in FUSED or len(a) != 2 or len(b) != 2 or layouts.experts is None:
            return False
        fused = resolver.find(f"{m['layer']}.mlp.experts.{param}", record=False)
        if fused is not None:
            w = shape_of(fused)
            out, in_ = (w[2], w[1]) if layouts.experts.in_out else (w[1], w[2])
            return len(w) == 3 and (out, in_) == (b[0], a[1])
        role = "gate" if param == "gate_up_proj" else "down"
        target = resolver.find(layouts.per_expert_name(m["layer"], 0, role), record=False)
        rows = layouts.rows(role, b[0])
        out = len(range(*rows)) if rows else b[0]
        return target is not None and shape_of(target) == (out, a[1])

    return pattern_name(adapter, module, fits)


def _per_expert_on_fused(module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf,
                         layouts: Layouts, layer: str, expert: int, role: str) -> tuple[str, LoraOp] | None:
    assert layouts.experts is not None
    target = resolver.find(layouts.fused_name(layer, role), record=False)
    if target is None:
        return None
    where = f"{adapter.weights_path}: module {module.name!r}"
    if module.magnitude_key is not None or module.bias_key is not None:
        raise UnsupportedAdapterError(f"{where}: DoRA or lora_bias on a per-expert module cannot be merged into the "
                                      f"fused expert parameter {target!r} (PEFT cannot either)")
    w = shape_of(target)
    in_out = layouts.experts.in_out
    if len(w) != 3:
        raise MismatchError(f"{where}: {target!r} is {list(w)}, not a fused expert parameter")
    experts, fused_out, fused_in = (w[0], w[2], w[1]) if in_out else w
    rows = layouts.rows(role, fused_out)
    out = len(range(*rows)) if rows else fused_out
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if expert >= experts or len(a) != 2 or len(b) != 2 or (b[0], a[1]) != (out, fused_in):
        raise MismatchError(f"{where}: LoRA A{list(a)} and B{list(b)} do not fit expert {expert}'s {role} of "
                            f"{target!r} {list(w)} ({experts} experts of ({out}, {fused_in}))")
    op = make_op(module, adapter, "param", (out, fused_in), False)
    return target, dataclasses.replace(op, part=ExpertPart(expert, experts, False, rows, in_out))


def _missing(where: str, name: str) -> list[tuple[str, LoraOp]]:
    raise MismatchError(f"{where}: the checkpoint stores its experts per expert but has no {name!r}")
