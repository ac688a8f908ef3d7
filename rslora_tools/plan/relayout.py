"""An adapter rewritten into another layout (`convert --expert-layout`, `--key-layout base`): new keys, the factors
rearranged, every module's scale kept.

- `--expert-layout per-expert`: each fused expert module (a target_parameters ParamWrapper on `gate_up_proj` or
  `down_proj`) becomes one LoRA per expert and role: expert e's A rows and B columns, B's gate (up) rows for the
  gate (up) projection. Where B is block-diagonal over gate and up (an adapter fused from per-expert ones), each
  role keeps its own half of the rank, so per-expert -> fused -> per-expert gives back the same tensors.
- `--expert-layout fused`: the reverse, as PEFT converts per-expert adapters for transformers 5: A of gate and up
  concatenated along the rank, B block-diagonal (gpt-oss: rows interleaved), experts stacked (A expert-major,
  B expert-minor). gate_up gets rank 2r and the alpha that keeps the scale (PEFT's conversion doubles alpha, which is
  right for classic LoRA only; docs/peft-rules.md, "Layouts").
- `--key-layout base`: module paths renamed to the base checkpoint's naming (plan/layouts.py): what transformers 4
  (and a runtime that loads the checkpoint's names) applies; `--key-layout transformers-5`: the names transformers 5
  holds the model under, which PEFT on transformers 5 needs (PEFT 0.21.2 does not rename a Qwen2-VL adapter saved
  in the checkpoint's naming: it warns of missing keys and runs without them; measured).
The arithmetic is compute/relayout.py's; this module decides, from names, shapes and the config.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from ..adapter.adapter import Adapter, LoraModule, strip_peft_prefix
from ..adapter.config_rewrite import alpha_for_scale, keeping_scales
from ..adapter.module_scales import ModuleEntry
from ..adapter.scaling import ModuleScale, matching_keys
from ..errors import UnsupportedAdapterError
from .experts import ExpertSlot, expert_slot, per_expert_names
from .layouts import FUSED
from .names import NameResolver

PEFT_PREFIX = "base_model.model."
RecipeOp = Literal["copy", "expert_a", "expert_b", "fuse_a", "fuse_b"]


@dataclass(frozen=True)
class Recipe:
    """How one tensor of the new adapter is made from the old one's (compute/relayout.py)."""

    key: str
    op: RecipeOp
    sources: tuple[str, ...]
    expert: int = 0
    experts: int = 1
    rows: tuple[int, int, int] | None = None  # output features kept (gate or up of gate_up)
    ranks: tuple[int, int] | None = None  # rank range kept (one role's half of a block-diagonal B)
    interleaved: bool = False  # fuse_b: gate and up rows alternate (gpt-oss)
    shared: bool = False  # fuse_b: gate and up share A (stacked rows), not block-diagonal


@dataclass
class Relayout:
    recipes: list[Recipe]
    config: dict[str, Any]
    message: str
    notes: list[str] = field(default_factory=list)


def plan_relayout(
    adapter: Adapter,
    entries: list[ModuleEntry],
    base: NameResolver,
    *,
    expert_layout: str | None,
    key_layout: str | None,
    zero_blocks: dict[str, tuple[bool, bool]],
    shared_a: frozenset[str] = frozenset(),
) -> Relayout:
    """The new adapter's tensors and config. `entries` name each fused module's parameter as the base's shapes tell
    (plan.experts.fused_parameter). `zero_blocks`: for each fused gate_up module (by its a_key), whether B's gate
    rows are zero in the up half of the rank and B's up rows in the gate half (a block-diagonal B). `shared_a`: the
    fused parameters whose per-expert gate and up LoRAs have the same A in every expert (fused back at rank r, as
    trained). Every module of the new adapter keeps its scale, checked by PEFT's matching (full module names where
    the old pattern keys would give another)."""
    config = adapter.config.normalized()
    recipes: list[Recipe] = []
    done: set[str] = set()
    messages = []
    scales: dict[str, ModuleScale] = {}  # new module name -> the scale it must keep
    if expert_layout == "per-expert":
        recipes += _to_per_expert(adapter, entries, base, config, zero_blocks, done, scales)
        messages.append("fused experts rewritten as one LoRA per expert")
    elif expert_layout == "fused":
        recipes += _to_fused(adapter, entries, base, config, done, shared_a, scales)
        messages.append("per-expert LoRA rewritten as fused expert parameters (target_parameters)")
    for entry in entries:
        module = entry.module
        if any(key not in done for key in _keys(module)):
            scales[entry.name] = entry.scale
        for key in _keys(module):
            if key not in done:
                recipes.append(Recipe(key, "copy", (key,)))
    for path, key in {**adapter.replacements, **adapter.token_deltas}.items():
        recipes.append(Recipe(key, "copy", (key,)))
    if key_layout is not None:
        renamed, scales = _rename_keys(recipes, base, key_layout == "transformers-5", scales)
        naming = (
            "transformers 5's naming of the base" if key_layout == "transformers-5" else "the base checkpoint's naming"
        )
        messages.append(
            f"{renamed} module paths renamed to {naming}" if renamed else f"module paths already follow {naming}"
        )
    if not expert_layout and key_layout is None:
        raise AssertionError("nothing to relayout")
    if expert_layout is not None and not any(r.op != "copy" for r in recipes):
        raise UnsupportedAdapterError(
            f"{adapter.path}: no expert module to rewrite "
            f"({'fused' if expert_layout == 'per-expert' else 'per-expert'} modules of a "
            f"{base.layouts.family or 'known MoE'} model); the adapter is already {expert_layout}"
        )
    config = _unused_patterns_removed(config, [e.name for e in entries], list(scales))
    config = keeping_scales(config, [ModuleEntry(LoraModule(n), n, s.r, s) for n, s in scales.items()])
    return Relayout(recipes, config, "; ".join(messages))


def _keys(module: LoraModule) -> list[str]:
    return [k for k in (module.a_key, module.b_key, module.bias_key, module.magnitude_key) if k]


def _at(scale: ModuleScale, r: int) -> ModuleScale:
    """The same scale at another rank (alpha as the config would need it)."""
    return dataclasses.replace(
        scale, r=r, alpha=alpha_for_scale(scale.scale, r, scale.use_rslora), rank_key=None, alpha_key=None
    )


def _to_per_expert(
    adapter: Adapter,
    entries: list[ModuleEntry],
    base: NameResolver,
    config: dict[str, Any],
    zero_blocks: dict[str, tuple[bool, bool]],
    done: set[str],
    scales: dict[str, ModuleScale],
) -> list[Recipe]:
    recipes = []
    names: set[str] = set()
    hand = base.layouts.hand
    for entry in entries:
        module, param = entry.module, entry.name.rpartition(".")[2]
        if entry.wrapping != "param" or param not in FUSED:
            continue
        a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
        r, experts = entry.scale.r, a[0] // entry.scale.r
        paths = per_expert_names(entry.name, experts, base)
        if paths is None:
            raise UnsupportedAdapterError(
                f"{adapter.path}: module {module.name!r}: {base.layouts.model_class or 'this'} "
                "models store their experts fused, and no per-expert naming of them exists "
                "in transformers' rules; keep the adapter fused"
            )
        parts = len(paths[0])
        halves = zero_blocks.get(module.a_key, (False, False)) if parts == 2 else (False, False)
        split = all(halves) and r % 2 == 0
        rank = r // 2 if split else r
        for part in range(parts):
            slot = ExpertSlot(entry.name, 0, part, parts, hand is not None and hand.interleaved)
            rows = slot.rows(b[0])
            ranks = ((0, rank) if part == 0 else (rank, r)) if split else None
            leaf = paths[0][part].rpartition(".")[2]
            _pattern(config, leaf, _at(entry.scale, rank))
            for e in range(experts):
                path = paths[e][part]
                names.add(path.rpartition(".")[2])
                scales[path] = _at(entry.scale, rank)
                recipes.append(
                    Recipe(f"{PEFT_PREFIX}{path}.lora_A.weight", "expert_a", (module.a_key,), e, experts, None, ranks)
                )
                recipes.append(
                    Recipe(f"{PEFT_PREFIX}{path}.lora_B.weight", "expert_b", (module.b_key,), e, experts, rows, ranks)
                )
        done.update(_keys(module))
    config["target_modules"] = sorted({*(config.get("target_modules") or []), *names})
    remaining = [t for t in config.get("target_parameters") or [] if t.rpartition(".")[2] not in FUSED]
    config["target_parameters"] = remaining or None
    return recipes


def _to_fused(
    adapter: Adapter,
    entries: list[ModuleEntry],
    base: NameResolver,
    config: dict[str, Any],
    done: set[str],
    shared_a: frozenset[str],
    scales: dict[str, ModuleScale],
) -> list[Recipe]:
    by_fused, parts_of = _fused_groups(adapter, entries, base)
    recipes = []
    produced: set[str] = set()
    names: set[str] = set()
    by_module: dict[str, list[str]] = defaultdict(list)
    for fused in by_fused:
        by_module[fused.rpartition(".")[0]].append(fused)
    for module_name, params in by_module.items():
        registered = base.parameter_order(module_name) or FUSED  # PEFT nests them in this order
        params.sort(
            key=lambda f: (
                registered.index(f.rpartition(".")[2]) if f.rpartition(".")[2] in registered else len(registered)
            )
        )
        for i, fused in enumerate(params):
            slot = parts_of[fused]
            experts, present = _fused_members(adapter, base, fused, slot, by_fused[fused])
            produced.add(fused.rpartition(".")[2])
            names.update(c.module.name.rpartition(".")[2] for c in present)
            shared = slot.parts == 2 and fused in shared_a
            rank = present[0].scale.r * (1 if shared else slot.parts)
            wrapper = f"{PEFT_PREFIX}{module_name}" + ".base_layer" * (len(params) - 1 - i)
            a_keys = tuple(c.module.a_key for c in present)[
                :: 2 if shared else 1
            ]  # shared: the gate's A stands for both
            b_keys = tuple(c.module.b_key for c in present)
            recipes.append(Recipe(f"{wrapper}.lora_A.weight", "fuse_a", a_keys, experts=experts))
            recipes.append(
                Recipe(
                    f"{wrapper}.lora_B.weight",
                    "fuse_b",
                    b_keys,
                    experts=experts,
                    interleaved=slot.interleaved and slot.parts == 2,
                    shared=shared,
                )
            )
            scales[fused] = _at(present[0].scale, rank)
            _pattern(config, rf".*\.{re.escape(fused.rpartition('.')[2])}", scales[fused])
            done.update(k for c in present for k in _keys(c.module))
    config["target_modules"] = sorted(set(config.get("target_modules") or []) - names) or None
    existing = [t for t in config.get("target_parameters") or [] if t.rpartition(".")[2] not in FUSED]
    # PEFT nests the wrappers in the order the module registers them: gate_up_proj first (under base_layer)
    config["target_parameters"] = existing + [f"experts.{p}" for p in FUSED if p in produced]  # sorted by PEFT
    return recipes


def _fused_groups(
    adapter: Adapter, entries: list[ModuleEntry], base: NameResolver
) -> tuple[dict[str, dict[tuple[int, int], ModuleEntry]], dict[str, ExpertSlot]]:
    """The adapter's per-expert modules grouped by the fused base parameter each is a slice of, keyed by (expert,
    part); and each fused parameter's slot (how it splits)."""
    by_fused: dict[str, dict[tuple[int, int], ModuleEntry]] = defaultdict(dict)
    parts_of: dict[str, ExpertSlot] = {}
    for entry in entries:
        slot = expert_slot(entry.module.name + ".weight", base.layouts)
        if slot is not None:
            if entry.module.magnitude_key or entry.module.bias_key:
                raise UnsupportedAdapterError(
                    f"{adapter.path}: module {entry.module.name!r} has DoRA or lora_bias, "
                    "which fused expert parameters (PEFT's ParamWrapper) cannot hold"
                )
            by_fused[slot.fused][(slot.expert, slot.part)] = entry
            parts_of[slot.fused] = slot
    return by_fused, parts_of


def _fused_members(
    adapter: Adapter, base: NameResolver, fused: str, slot: ExpertSlot, chosen: dict[tuple[int, int], ModuleEntry]
) -> tuple[int, list[ModuleEntry]]:
    """The number of experts of `fused` and its members in (expert, part) order; refused unless every expert's part
    has a LoRA and all of them have one rank and scale."""
    experts = _base_experts(base, fused, slot) or 1 + max(e for e, _ in chosen)
    missing = [(e, p) for e in range(experts) for p in range(slot.parts) if (e, p) not in chosen]
    if missing:
        raise UnsupportedAdapterError(
            f"{adapter.path}: fused {fused} needs a LoRA on every expert's part ({experts} experts x "
            f"{slot.parts}); {len(missing)} are missing (expert {missing[0][0]} first): a fused adapter with "
            "experts left out would not load"
        )
    present = [chosen[(e, p)] for e in range(experts) for p in range(slot.parts)]
    found = {(c.scale.scale, c.scale.r, c.scale.use_rslora) for c in present}
    if len(found) != 1:
        raise UnsupportedAdapterError(
            f"{adapter.path}: fused {fused}: its per-expert LoRAs have different "
            "ranks or scales; a fused parameter has one (convert each to the same "
            "scale first)"
        )
    return experts, present


def _pattern(config: dict[str, Any], key: str, scale: ModuleScale) -> None:
    """Pattern entries that give the modules `key` matches this rank and scale (when the global ones do not)."""
    if scale.r != config["r"]:
        config["rank_pattern"] = {key: scale.r, **config["rank_pattern"]}
    if scale.alpha != config["lora_alpha"] or scale.r != config["r"]:
        config["alpha_pattern"] = {key: scale.alpha, **config["alpha_pattern"]}


def _unused_patterns_removed(config: dict[str, Any], old: list[str], new: list[str]) -> dict[str, Any]:
    """The rank and alpha pattern keys that matched modules of the old adapter and match none of the new one's
    (the modules they were for were rewritten), left out."""
    fields = dict(config)
    for field_name in ("rank_pattern", "alpha_pattern"):
        keys = list(config[field_name])
        before = {k for name in old for k in matching_keys(keys, name)}
        after = {k for name in new for k in matching_keys(keys, name)}
        fields[field_name] = {k: v for k, v in config[field_name].items() if k in after or k not in before}
    return fields


def _base_experts(base: NameResolver, fused: str, slot: ExpertSlot) -> int | None:
    """How many experts the base has in fused parameter `fused`: stored per expert, or the fused tensor's first dim."""
    stacked = base.stacked(fused)
    if stacked:
        return 1 + max(p.expert for p in stacked)
    target = base.find(fused, record=False)
    return None if target is None else base.shape(target)[0]


def _rename_keys(
    recipes: list[Recipe], base: NameResolver, in_memory: bool, scales: dict[str, ModuleScale]
) -> tuple[int, dict[str, ModuleScale]]:
    """Each recipe's key with its module path in the base checkpoint's naming (or, `in_memory`, in transformers 5's
    in-memory naming of it), when that differs: how many modules, and the scales under the new names."""
    renamed: dict[str, str] = {}
    for i, recipe in enumerate(recipes):
        m = re.match(
            r"^(?P<path>.*?)\.(?P<tail>(?:base_layer\.)*(?:lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|"
            r"modules_to_save|token_adapter|original_module)\b.*)$",
            strip_peft_prefix(recipe.key),
        )
        if m is None:
            continue
        path = m["path"]
        target = base.find(path + ".weight", record=False) or base.find(path, record=False)
        if target is None:
            continue
        new_path = (base.in_memory(target) if in_memory else target).removesuffix(".weight")
        if new_path != path:
            recipes[i] = dataclasses.replace(recipe, key=f"{PEFT_PREFIX}{new_path}.{m['tail']}")
            renamed[path] = new_path

    def new_name(name: str) -> str:
        if name in renamed:
            return renamed[name]
        module, _, param = name.rpartition(".")
        return f"{renamed[module]}.{param}" if module in renamed else name

    return len(renamed), {new_name(n): s for n, s in scales.items()}
