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

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from ..adapter.adapter import Adapter, LoraModule, strip_peft_prefix
from ..adapter.config_rewrite import alpha_for_scale
from ..adapter.module_scales import ModuleEntry
from ..errors import UnsupportedAdapterError
from .layouts import FUSED, Layouts
from .placement import NameResolver

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


@dataclass(frozen=True)
class _Expert:
    entry: ModuleEntry
    layer: str
    expert: int
    role: str


def plan_relayout(adapter: Adapter, entries: list[ModuleEntry], layouts: Layouts, *, expert_layout: str | None,
                  key_base: NameResolver | None, zero_blocks: dict[str, tuple[bool, bool]], in_memory: bool = False,
                  shared_a: frozenset[str] = frozenset()) -> Relayout:
    """The new adapter's tensors and config. `entries` name each fused module's parameter as the base's shapes tell
    (plan.experts.fused_parameter). `zero_blocks`: for each fused gate_up module (by its a_key), whether B's gate
    rows are zero in the up half of the rank and B's up rows in the gate half (a block-diagonal B). `shared_a`: the
    layers whose per-expert gate and up LoRAs have the same A in every expert (fused back at rank r, as trained)."""
    config = adapter.config.normalized()
    recipes: list[Recipe] = []
    done: set[str] = set()
    messages = []
    if expert_layout == "per-expert":
        recipes += _to_per_expert(adapter, entries, layouts, config, zero_blocks, done)
        messages.append("fused experts rewritten as one LoRA per expert")
    elif expert_layout == "fused":
        recipes += _to_fused(adapter, entries, layouts, config, done, shared_a)
        messages.append("per-expert LoRA rewritten as fused expert parameters (target_parameters)")
    for entry in entries:
        module = entry.module
        for key in _keys(module):
            if key not in done:
                recipes.append(Recipe(key, "copy", (key,)))
    for path, key in {**adapter.replacements, **adapter.token_deltas}.items():
        recipes.append(Recipe(key, "copy", (key,)))
    if key_base is not None:
        renamed = _rename_keys(recipes, key_base, layouts if in_memory else None)
        naming = "transformers 5's naming of the base" if in_memory else "the base checkpoint's naming"
        messages.append(f"{renamed} module paths renamed to {naming}" if renamed
                        else f"module paths already follow {naming}")
    if not expert_layout and key_base is None:
        raise AssertionError("nothing to relayout")
    if expert_layout is not None and not any(r.op != "copy" for r in recipes):
        raise UnsupportedAdapterError(f"{adapter.path}: no expert module to rewrite "
                                      f"({'fused' if expert_layout == 'per-expert' else 'per-expert'} modules of a "
                                      f"{layouts.family or 'known MoE'} model); the adapter is already {expert_layout}")
    return Relayout(recipes, config, "; ".join(messages))


def _keys(module: LoraModule) -> list[str]:
    return [k for k in (module.a_key, module.b_key, module.bias_key, module.magnitude_key) if k]


def _to_per_expert(adapter: Adapter, entries: list[ModuleEntry], layouts: Layouts, config: dict[str, Any],
                   zero_blocks: dict[str, tuple[bool, bool]], done: set[str]) -> list[Recipe]:
    experts_layout = layouts.experts
    assert experts_layout is not None
    recipes = []
    names: set[str] = set()
    rank_pattern, alpha_pattern = dict(config["rank_pattern"]), dict(config["alpha_pattern"])
    for entry in entries:
        module, param = entry.module, entry.name.rpartition(".")[2]
        m = re.match(r"^(?P<layer>.*)\.mlp\.experts$", module.name)
        if entry.wrapping != "param" or param not in FUSED or m is None:
            continue
        a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
        r, experts = entry.scale.r, a[0] // entry.scale.r
        roles = ("gate", "up") if param == "gate_up_proj" else ("down",)
        halves = zero_blocks.get(module.a_key, (False, False)) if param == "gate_up_proj" else (False, False)
        split = all(halves) and r % 2 == 0
        rank = r // 2 if split else r
        for role in roles:
            rows = layouts.rows(role, b[0])
            ranks = ((0, rank) if role == "gate" else (rank, r)) if split else None
            name = experts_layout.per_expert[role]
            names.add(name)
            alpha = alpha_for_scale(entry.scale.scale, rank, entry.scale.use_rslora)
            if rank != config["r"]:
                rank_pattern[name] = rank
            if alpha != config["lora_alpha"]:
                alpha_pattern[name] = alpha
            for e in range(experts):
                path = f"{PEFT_PREFIX}{m['layer']}.{experts_layout.container}.experts.{e}.{name}"
                recipes.append(Recipe(f"{path}.lora_A.weight", "expert_a", (module.a_key,), e, experts, None, ranks))
                recipes.append(Recipe(f"{path}.lora_B.weight", "expert_b", (module.b_key,), e, experts, rows, ranks))
        done.update(_keys(module))
    for key in [k for k in list(rank_pattern) + list(alpha_pattern) if k.rpartition(".")[2] in FUSED
                or k.endswith(tuple(FUSED))]:
        rank_pattern.pop(key, None)
        alpha_pattern.pop(key, None)
    config["target_modules"] = sorted({*(config.get("target_modules") or []), *names})
    remaining = [t for t in config.get("target_parameters") or [] if t.rpartition(".")[2] not in FUSED]
    config["target_parameters"] = remaining or None
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    return recipes


def _to_fused(adapter: Adapter, entries: list[ModuleEntry], layouts: Layouts, config: dict[str, Any],
              done: set[str], shared_a: frozenset[str]) -> list[Recipe]:
    experts_layout = layouts.experts
    assert experts_layout is not None
    by_layer: dict[str, dict[str, dict[int, ModuleEntry]]] = defaultdict(lambda: defaultdict(dict))
    for entry in entries:
        found = layouts.per_expert_module(entry.module.name)
        if found is not None:
            layer, expert, role = found
            if entry.module.magnitude_key or entry.module.bias_key:
                raise UnsupportedAdapterError(f"{adapter.path}: module {entry.module.name!r} has DoRA or lora_bias, "
                                              "which fused expert parameters (PEFT's ParamWrapper) cannot hold")
            by_layer[layer][role][expert] = entry
    recipes = []
    produced: set[str] = set()
    rank_pattern, alpha_pattern = dict(config["rank_pattern"]), dict(config["alpha_pattern"])
    for layer, roles in by_layer.items():
        experts = 1 + max(e for by_expert in roles.values() for e in by_expert)
        params: list[tuple[str, tuple[str, ...]]] = []
        if "gate" in roles or "up" in roles:
            params.append(("gate_up_proj", ("gate", "up")))
        if "down" in roles:
            params.append(("down_proj", ("down",)))
        for depth, (param, role_names) in enumerate(params):
            chosen = [roles[role].get(e) for e in range(experts) for role in role_names]
            if any(c is None for c in chosen):
                raise UnsupportedAdapterError(f"{adapter.path}: layer {layer!r}: fused {param} needs every expert's "
                                              f"{' and '.join(role_names)} LoRA; some are missing")
            present = [c for c in chosen if c is not None]
            scales = {(c.scale.scale, c.scale.r, c.scale.use_rslora) for c in present}
            if len(scales) != 1:
                raise UnsupportedAdapterError(f"{adapter.path}: layer {layer!r}: the {'/'.join(role_names)} LoRAs have "
                                              "different ranks or scales; a fused parameter has one (convert each "
                                              "to the same scale first)")
            scale, r, rslora = scales.pop()
            produced.add(param)
            shared = len(role_names) == 2 and layer in shared_a
            rank = r if shared else r * len(role_names)
            wrapper = f"{PEFT_PREFIX}{layer}.mlp.experts" + (".base_layer" if depth == 0 and len(params) == 2 else "")
            a_keys = tuple(c.module.a_key for c in present)[::2 if shared else 1]  # shared: the gate's A stands for both
            b_keys = tuple(c.module.b_key for c in present)
            recipes.append(Recipe(f"{wrapper}.lora_A.weight", "fuse_a", a_keys, experts=experts))
            recipes.append(Recipe(f"{wrapper}.lora_B.weight", "fuse_b", b_keys, experts=experts,
                                  interleaved=experts_layout.interleaved and param == "gate_up_proj", shared=shared))
            key = rf".*\.{param}"
            alpha = alpha_for_scale(scale, rank, rslora)
            if rank != config["r"]:
                rank_pattern[key] = rank
            if alpha != config["lora_alpha"]:
                alpha_pattern[key] = alpha
            done.update(k for c in present for k in _keys(c.module))
    names = set(experts_layout.per_expert.values())
    for key in [k for k in list(rank_pattern) + list(alpha_pattern) if k in names]:
        rank_pattern.pop(key, None)
        alpha_pattern.pop(key, None)
    config["target_modules"] = sorted(set(config.get("target_modules") or []) - names) or None
    existing = [t for t in config.get("target_parameters") or [] if t.rpartition(".")[2] not in FUSED]
    # PEFT nests the wrappers in this order: gate_up_proj first (its tensors under base_layer), then down_proj
    config["target_parameters"] = existing + [f"experts.{p}" for p in FUSED if p in produced]
    config["rank_pattern"], config["alpha_pattern"] = rank_pattern, alpha_pattern
    return recipes


def _rename_keys(recipes: list[Recipe], base: NameResolver, memory: Layouts | None) -> int:
    """Each recipe's key with its module path in the base checkpoint's naming (or, with `memory`, in transformers 5's
    in-memory naming of it), when that differs; how many modules."""
    renamed: set[str] = set()
    for i, recipe in enumerate(recipes):
        m = re.match(r"^(?P<path>.*?)\.(?P<tail>(?:base_layer\.)*(?:lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|"
                     r"modules_to_save|token_adapter|original_module)\b.*)$", strip_peft_prefix(recipe.key))
        if m is None:
            continue
        path = m["path"]
        target = base.find(path + ".weight", record=False) or base.find(path, record=False)
        if target is None:
            continue
        new_path = (memory.in_memory(target) if memory is not None else target).removesuffix(".weight")
        if new_path != path:
            recipes[i] = Recipe(f"{PEFT_PREFIX}{new_path}.{m['tail']}", recipe.op, recipe.sources, recipe.expert,
                                recipe.experts, recipe.rows, recipe.ranks, recipe.interleaved)
            renamed.add(path)
    return len(renamed)
