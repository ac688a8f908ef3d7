"""Several adapters merged into one base in one pass: their plans folded into one (`merge BASE A1 A2 ... OUT`).

PEFT's stacked merge (`merge_and_unload(adapter_names=[...])`) merges the adapters one after
another into each weight, rounding to the weight's dtype after each (docs/peft-rules.md,
"Several adapters"). Each adapter is planned alone, as for a single merge; the plans are then
folded tensor by tensor: the first adapter's plan is the tensor's plan, and every later
adapter's LoRA and lora_bias on the same tensor go to `TensorPlan.stacked`, in order. Adapter
keys are namespaced ("<i>/<key>", adapter.adapter.stacked.StackedAdapter) so that one adapter reads
every adapter's tensors.

Several adapters' trainable tokens on one embedding are written one after another (disjoint indices, as
PEFT merges them). Refused with a one-line reason, because PEFT's result would depend on which adapter
is active rather than on the order the user gave: two adapters that replace the same tensor or one that
replaces a tensor another adapter changes (modules_to_save, trained biases, grown vocabularies, trainable
tokens beside another change), overlapping trainable tokens, and plans whose output tensors or config
changes differ (a tie one adapter unties, a vocabulary one adapter grows).
"""

from __future__ import annotations

import dataclasses
import math

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.scaling import ModuleScale
from ..adapter.stacked import namespaced_key
from ..errors import UnsupportedAdapterError
from .tensors import LoraOp, Plan, TensorPlan


def fold_plans(stacked: Adapter, plans: list[Plan]) -> Plan:
    """One plan for the stacked merge, from each adapter's own plan (see the module)."""
    first = plans[0]
    names = [t.name for t in first.tensors]
    for i, plan in enumerate(plans[1:], start=1):
        if [t.name for t in plan.tensors] != names or plan.index_metadata != first.index_metadata:
            raise UnsupportedAdapterError(
                f"{stacked.parts[i].path}: this adapter changes which tensors the merged model has (it unties or "
                f"grows "
                "an embedding, or adds a tensor) differently from the first adapter; merge them one at a time"
            )
        conflicts = {
            k
            for k in plan.config_updates.keys() & first.config_updates.keys()
            if plan.config_updates[k] != first.config_updates[k]
        }
        if conflicts:
            raise UnsupportedAdapterError(
                f"{stacked.parts[i].path}: its merge changes config.json's "
                f"{sorted(conflicts)[0]} differently from the first adapter's"
            )
    folded: list[tuple[str, list[TensorPlan]]] = []
    per_adapter = [
        {t.name: _namespaced(t, i, stacked.weights[i]) for t in plan.tensors} for i, plan in enumerate(plans)
    ]
    for shard, tensors in first.shards:
        folded.append((shard, [_fold_tensor([p[t.name] for p in per_adapter], stacked) for t in tensors]))
    result = dataclasses.replace(first, shards=folded)
    later = sorted({t.name for plan in plans[1:] for t in plan.tensors if t.replacement is not None})
    if later:
        result.notes = result.notes + [
            f"tensors saved whole by a later adapter applied "
            f"({', '.join(later[:3])}{', ...' if len(later) > 3 else ''}); "
            "PEFT's stacked merge keeps modules_to_save of the active (first loaded) adapter only, and would drop them"
        ]
    for plan in plans[1:]:
        result.config_updates = {**result.config_updates, **plan.config_updates}
        result.notes = result.notes + [n for n in plan.notes if n not in result.notes]
        result.warnings = result.warnings + [w for w in plan.warnings if w not in result.warnings]
        result.unmatched = result.unmatched + plan.unmatched
    return result


def _fold_tensor(versions: list[TensorPlan], stacked: Adapter) -> TensorPlan:
    """One tensor's plan: the first adapter that changes it starts it, the later ones' ops are stacked on it."""
    changing = [(i, t) for i, t in enumerate(versions) if _changes(t)]
    if len(changing) <= 1:
        return changing[0][1] if changing else versions[0]
    if all(
        t.tokens is not None and t.replacement is None and t.lora is None and t.bias_of is None for _, t in changing
    ):
        return _folded_tokens(changing, stacked)
    for i, t in changing:
        if t.replacement is not None or t.tokens is not None:
            raise UnsupportedAdapterError(
                f"{stacked.parts[i].path}: {t.name!r} is replaced by this adapter (modules_to_save, a saved tensor or "
                "trainable tokens) and changed by another one; PEFT's result would depend on which adapter is active, "
                "not on their order; merge them one at a time in the order you want"
            )
    start = dataclasses.replace(changing[0][1], stacked=())
    for i, t in changing[1:]:  # every later adapter comes after a change: DoRA is replayed for Linear only
        if t.lora is not None and t.lora.dora and t.lora.kind != "linear":
            raise UnsupportedAdapterError(
                f"{stacked.parts[i].path}: DoRA on {t.name!r} ({t.lora.kind}) after "
                "another adapter's change to it is not supported"
            )
        start.stacked = (
            *start.stacked,
            TensorPlan(t.name, t.source, lora=t.lora, bias_of=t.bias_of, dtype=t.dtype, shape=t.shape, parts=t.parts),
        )
    return start


def _folded_tokens(changing: list[tuple[int, TensorPlan]], stacked: Adapter) -> TensorPlan:
    """Several adapters' trainable tokens on one embedding: each one's rows written in order, as PEFT's
    TrainableTokensLayer.merge does for adapters with disjoint token indices (it refuses overlapping ones)."""
    seen: set[int] = set()
    for i, t in changing:
        assert t.tokens is not None
        overlap = seen & set(t.tokens[1])
        if overlap:
            raise UnsupportedAdapterError(
                f"{stacked.parts[i].path}: trainable tokens {sorted(overlap)[:5]} of {t.name!r} are trained by an "
                "earlier adapter too; PEFT merges only disjoint token indices (its result would be undefined)"
            )
        seen |= set(t.tokens[1])
    start = dataclasses.replace(changing[0][1], stacked=())
    start.stacked = tuple(
        TensorPlan(t.name, t.source, tokens=t.tokens, dtype=t.dtype, shape=t.shape) for _, t in changing[1:]
    )
    return start


def _changes(t: TensorPlan) -> bool:
    return t.replacement is not None or t.lora is not None or t.bias_of is not None or t.tokens is not None


def _namespaced(t: TensorPlan, index: int, weight: float) -> TensorPlan:
    """A copy of adapter `index`'s tensor plan whose adapter keys read through the StackedAdapter."""
    ops: dict[int, LoraOp] = {}

    def op(o: LoraOp | None) -> LoraOp | None:
        if o is None:
            return None
        if id(o) not in ops:
            module = o.module
            renamed = LoraModule(
                **{
                    **dataclasses.asdict(module),
                    **{f: namespaced_key(index, getattr(module, f)) for f in _KEY_FIELDS if getattr(module, f)},
                }
            )
            ops[id(o)] = dataclasses.replace(o, module=renamed, scale=_weighted(o, weight))
        return ops[id(o)]

    tokens = (namespaced_key(index, t.tokens[0]), t.tokens[1]) if t.tokens is not None else None
    replacement = namespaced_key(index, t.replacement) if t.replacement is not None else None
    parts = tuple(p for p in map(op, t.parts) if p is not None)
    return dataclasses.replace(
        t, lora=op(t.lora), bias_of=op(t.bias_of), tokens=tokens, replacement=replacement, parts=parts
    )


_KEY_FIELDS = tuple(f.name for f in dataclasses.fields(LoraModule) if f.name.endswith("_key"))


def _weighted(op: LoraOp, weight: float) -> ModuleScale:
    """The op's scale times `weight` in PEFT's set_scale order: weight * alpha / sqrt(r) (or / r)."""
    if weight == 1.0:
        return op.scale
    s = op.scale
    value = weight * s.alpha / math.sqrt(s.r) if s.use_rslora else weight * s.alpha / s.r
    return dataclasses.replace(s, scale=value)
