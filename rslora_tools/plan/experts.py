"""Expert LoRA across expert layouts: a fused (target_parameters) adapter on per-expert tensors, and the reverse.

transformers 5 fuses MoE experts in memory and PEFT merges them there (docs/peft-rules.md, "Layouts"):
- a target_parameters adapter on a fused parameter (`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj`,
  Nemotron-H's `up_proj`) holds every expert's factors (A: E*r rows, expert-major; B: E*r columns, expert-minor); on
  a checkpoint stored per expert, each stored tensor transformers stacks into it (plan/names.py, `stacked`: its
  expert and which part of the concatenated output features it is) gets those rows of `einsum(B_e, A_e)`;
- a per-expert adapter (`experts.3.w1`, made with transformers 4) is what PEFT converts to fused factors on
  loading; on a fused checkpoint, each module changes its expert's part of the fused parameter;
- either way PEFT's ParamWrapper merges: the delta is cast to the weight's dtype, then added (one rounding
  more than a Linear's merge), so a per-expert module of a family transformers 5 fuses merges that way too.
Which stored tensor is which expert's which part comes from transformers' conversion rules (plan/layouts.py);
gpt-oss, which stores its experts fused with gate and up interleaved, from `HAND_EXPERTS`. Anything whose place
cannot be decided from names and shapes is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.module_scales import pattern_name
from ..errors import MismatchError, UnsupportedAdapterError
from .layouts import Layouts
from .names import NameResolver, StackedPart
from .placement import make_op
from .tensors import ExpertPart, LoraOp

ShapeOf = Callable[[str], tuple[int, ...]]
_HAND_PER_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<expert>\d+)\.(?P<name>\w+)$")


@dataclass(frozen=True)
class ExpertSlot:
    """Where one per-expert module's weight sits in a fused expert parameter (in-memory naming)."""

    fused: str  # the fused parameter: `<...>.experts.gate_up_proj`
    expert: int
    part: int  # which of the parameter's concatenated per-expert tensors (0: gate, 1: up; 0 for down_proj)
    parts: int
    interleaved: bool = False  # the parts alternate along the output features (gpt-oss)
    in_out: bool = False  # the fused parameter is (E, in, out)

    @property
    def module(self) -> str:
        """The module holding the fused parameter (what a target_parameters adapter names)."""
        return self.fused.rpartition(".")[0]

    def rows(self, fused_out: int) -> tuple[int, int, int] | None:
        """The output features of the fused parameter that are this part's (None: all of them)."""
        if self.parts == 1:
            return None
        if self.interleaved:
            return (self.part, fused_out, self.parts)
        size = fused_out // self.parts
        return (self.part * size, (self.part + 1) * size, 1)


def expert_slot(name: str, layouts: Layouts) -> ExpertSlot | None:
    """The slot of a per-expert module's weight `name` (`...experts.3.w1.weight`), by the family's rules."""
    loaded = layouts.loaded(name)
    if loaded.expert_part and loaded.converter is not None and loaded.expert is not None:
        return ExpertSlot(loaded.memory, loaded.expert, loaded.source, len(loaded.converter.sources))
    m = _HAND_PER_EXPERT.match(name.removesuffix(".weight"))
    if layouts.hand is None or m is None:
        return None
    for fused, names in layouts.hand.per_expert:
        if m["name"] in names:
            return ExpertSlot(
                f"{m['experts']}.{fused}",
                int(m["expert"]),
                names.index(m["name"]),
                len(names),
                layouts.hand.interleaved,
                layouts.hand.in_out,
            )
    return None


def per_expert_names(fused: str, experts: int, resolver: NameResolver) -> list[list[str]] | None:
    """Each expert's per-expert module paths (one per part) for fused parameter `fused`: as the checkpoint stores
    them, or, for a checkpoint that stores them fused, as the family's rules name them. None: the family has none."""
    stacked = resolver.stacked(fused)
    if stacked:
        by_expert: dict[int, list[str]] = {}
        for p in stacked:
            by_expert.setdefault(p.expert, []).append(p.stored.removesuffix(".weight"))
        return [by_expert[e] for e in sorted(by_expert)]
    module, _, param = fused.rpartition(".")
    hand = resolver.layouts.hand
    if hand is not None:
        names = dict(hand.per_expert).get(param)
        return [[f"{module}.{e}.{n}" for n in names] for e in range(experts)] if names else None
    for t in resolver.layouts.converters:
        target = t.targets[0].replace("\\.", ".")
        if t.stacks_experts and fused.endswith(target.lstrip(".")):
            stem = fused[: len(fused) - len(target.lstrip("."))]
            sources = [s.replace("\\.", ".").lstrip(".").removesuffix(".weight") for s in t.sources]
            return [[stem + s.replace("*", str(e)) for s in sources] for e in range(experts)]
    return None


def place_across_layouts(
    module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf, layouts: Layouts
) -> list[tuple[str, LoraOp]] | None:
    """The tensors a module that matches nothing as named changes in the checkpoint's other expert layout, with
    the op for each; None when it is not an expert module of a known family (the caller reports it unmatched)."""
    if not layouts.has_experts:
        return None
    slot = expert_slot(module.name + ".weight", layouts)
    if slot is not None:
        placed = _per_expert_on_fused(module, adapter, resolver, shape_of, slot)
        return [placed] if placed is not None else None
    if adapter.config.target_parameters:
        return _fused_on_per_expert(module, adapter, resolver, shape_of, layouts)
    return None


def as_expert_op(op: LoraOp, module: LoraModule, layouts: Layouts) -> LoraOp:
    """A per-expert module placed on its own tensor, in a family transformers 5 fuses: merged as PEFT's ParamWrapper
    merges the fused parameter it becomes (the delta cast to the weight's dtype first)."""
    if (
        op.kind != "linear"
        or op.transpose
        or op.dora
        or module.bias_key is not None
        or expert_slot(module.name + ".weight", layouts) is None
    ):
        return op
    return dataclasses.replace(op, kind="param")


def _fused_on_per_expert(
    module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf, layouts: Layouts
) -> list[tuple[str, LoraOp]] | None:
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    name = fused_parameter(module, adapter, resolver, shape_of)
    stacked = resolver.stacked(name)
    if not stacked:
        return None
    scale = adapter.config.scale_for(name)
    where = f"{adapter.weights_path}: module {module.name!r} ({name.rpartition('.')[2]})"
    if len(a) != 2 or len(b) != 2 or a[0] % scale.r or b[1] != a[0]:
        raise MismatchError(f"{where}: LoRA A{list(a)} and B{list(b)} are not rank {scale.r} factors of fused experts")
    experts = a[0] // scale.r
    found = sorted({p.expert for p in stacked})
    if found and found[-1] >= experts:
        raise MismatchError(f"{where}: the adapter's factors hold {experts} experts, the checkpoint has more")
    missing = sorted(set(range(experts)) - set(found))
    if missing:
        raise MismatchError(
            f"{where}: the checkpoint stores its experts per expert but has no expert {missing[0]} "
            f"of {name!r} (it stores {_expert_range(found)})"
        )
    placed: list[tuple[str, LoraOp]] = []
    outs = _part_outs(stacked, shape_of)
    for p in stacked:
        start = sum(outs[: p.part])
        out, in_ = shape_of(p.stored)[0], a[1]
        if sum(outs) != b[0] or shape_of(p.stored) != (outs[p.part], in_):
            raise MismatchError(
                f"{where}: expert {p.expert}'s part {p.part} is {list(shape_of(p.stored))} in the "
                f"checkpoint ({p.stored!r}); the adapter's factors give ({b[0]} split as {outs}, {in_})"
            )
        rows = (start, start + out, 1) if p.parts > 1 else None
        placed.append(
            (p.stored, LoraOp(module, "param", scale, part=ExpertPart(p.expert, experts, True, rows, False)))
        )
    return placed


def _part_outs(stacked: list[StackedPart], shape_of: ShapeOf) -> list[int]:
    """Each part's output features, from expert 0's stored tensors."""
    first = {p.part: shape_of(p.stored) for p in stacked if p.expert == stacked[0].expert}
    return [first[i][0] if i in first and first[i] else 0 for i in range(stacked[0].parts)]


def _expert_range(found: list[int]) -> str:
    return f"experts {found[0]} to {found[-1]}" if found else "none"


def fused_parameter(module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf) -> str:
    """The `<module>.<param>` name of the fused expert parameter a target_parameters module wraps, told apart by the
    checkpoint's shapes (the fused tensor, or the per-expert tensors it is stacked from) where nested wrappers leave
    it open, among the module's own parameters in the base."""
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    hand = resolver.layouts.hand

    def fits(param_name: str) -> bool:
        if len(a) != 2 or len(b) != 2:
            return False
        fused = resolver.find(param_name, record=False)
        if fused is not None:
            w = shape_of(fused)
            in_out = hand is not None and hand.in_out
            return len(w) == 3 and ((w[2], w[1]) if in_out else (w[1], w[2])) == (b[0], a[1])
        stacked = resolver.stacked(param_name)
        if not stacked:
            return False
        outs = _part_outs(stacked, shape_of)
        return sum(outs) == b[0] and all(shape_of(p.stored)[1:] == (a[1],) for p in stacked if p.expert == 0)

    return pattern_name(
        adapter, module, fits, resolver.own_parameters(module.name), resolver.parameter_order(module.name)
    )


def _per_expert_on_fused(
    module: LoraModule, adapter: Adapter, resolver: NameResolver, shape_of: ShapeOf, slot: ExpertSlot
) -> tuple[str, LoraOp] | None:
    target = resolver.find(slot.fused, record=False)
    if target is None:
        return None
    where = f"{adapter.weights_path}: module {module.name!r}"
    if module.magnitude_key is not None or module.bias_key is not None:
        raise UnsupportedAdapterError(
            f"{where}: DoRA or lora_bias on a per-expert module cannot be merged into the "
            f"fused expert parameter {target!r} (PEFT cannot either)"
        )
    w = shape_of(target)
    if len(w) != 3:
        raise MismatchError(f"{where}: {target!r} is {list(w)}, not a fused expert parameter")
    experts, fused_out, fused_in = (w[0], w[2], w[1]) if slot.in_out else w
    rows = slot.rows(fused_out)
    out = len(range(*rows)) if rows else fused_out
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    if slot.expert >= experts or len(a) != 2 or len(b) != 2 or (b[0], a[1]) != (out, fused_in):
        raise MismatchError(
            f"{where}: LoRA A{list(a)} and B{list(b)} do not fit expert {slot.expert}'s part "
            f"{slot.part} of {target!r} {list(w)} ({experts} experts of ({out}, {fused_in}))"
        )
    op = make_op(module, adapter, "param", (out, fused_in), False)
    return target, dataclasses.replace(op, part=ExpertPart(slot.expert, experts, False, rows, slot.in_out))
