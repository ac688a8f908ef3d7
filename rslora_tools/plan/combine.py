"""What `combine` writes: one adapter out of several, module by module (docs/combining.md).

Each output module gathers the inputs that wrap it (`Part`: which adapter, its saved factors, its
rank and `weight * PEFT scale`, so classic and rsLoRA inputs, patterns and ranks mix freely); a
module missing from an input gets nothing from it. The output rank is the sum of the parts'
ranks (`cat`), the `--rank` (`svd`, default the largest input rank, as PEFT), or the parts'
common rank (the task-arithmetic methods, which combine A and B separately, as PEFT). The
output's scales are carried by its float32 factors, and its config gives every module scale 1
(classic alpha = rank, or rsLoRA alpha = sqrt(rank) with `--rslora`), which every PEFT version
and runtime applies as written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.config_rewrite import scale_one_config
from ..adapter.module_scales import module_entries
from ..adapter.relative import require_plain
from ..errors import InputError, UnsupportedAdapterError

METHODS: tuple[str, ...] = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass
class Part:
    """One input adapter's LoRA on a module: its factors, rank, its --weights value and PEFT scale."""

    adapter: int
    module: LoraModule
    rank: int
    weight: float
    scale: float

    @property
    def factor(self) -> float:
        """weight * scale, as PEFT's add_weighted_adapter computes it."""
        return self.weight * self.scale


@dataclass
class CombinedModule:
    """One module of the output adapter."""

    name: str
    embedding: bool
    a_key: str  # output keys (PEFT's saved names, from the first input that wraps the module)
    b_key: str
    parts: list[Part]
    rank: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]


@dataclass
class CombinePlan:
    method: str
    modules: list[CombinedModule]
    config: dict[str, Any]
    weights: list[float]
    density: float | None = None
    seed: int | None = None
    saved: dict[str, int] = field(default_factory=dict)  # whole tensors copied as saved: key -> input index
    warnings: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Size of the output tensors (float32)."""
        return sum(4 * (_prod(m.a_shape) + _prod(m.b_shape)) for m in self.modules)


def plan_combination(
    adapters: list[Adapter],
    weights: list[float],
    method: str,
    *,
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    rslora: bool = False,
) -> CombinePlan:
    """Check the inputs and decide every output module's parts, rank and shapes, and the output config."""
    for adapter in adapters:
        _check_combinable(adapter)
    fan_in_fan_out = {bool(a.config.json_dict.get("fan_in_fan_out")) for a in adapters}
    if len(fan_in_fan_out) > 1:
        raise UnsupportedAdapterError("the adapters disagree on fan_in_fan_out; they are for different layer layouts")
    gathered: dict[str, list[Part]] = {}
    layout: dict[str, tuple[LoraModule, Adapter]] = {}
    for i, adapter in enumerate(adapters):
        for entry in module_entries(adapter):
            module = entry.module
            gathered.setdefault(module.name, []).append(
                Part(i, module, entry.shape_rank, weights[i], entry.scale.scale)
            )
            first, other = layout.setdefault(module.name, (module, adapter))
            if (other.shapes[first.a_key][1], other.shapes[first.b_key][0]) != (
                adapter.shapes[module.a_key][1],
                adapter.shapes[module.b_key][0],
            ) or first.embedding != module.embedding:
                raise UnsupportedAdapterError(
                    f"{adapter.path}: module {module.name!r} has another shape or kind than "
                    f"in {other.path}; the adapters are for different models"
                )
    modules = [_combined(name, parts, *layout[name], method, rank) for name, parts in gathered.items()]
    if not modules:
        raise InputError("the adapters have no LoRA modules to combine")
    saved = _saved_tensors(adapters)
    to_save = sorted({m for a in adapters for m in (a.config.json_dict.get("modules_to_save") or [])})
    fields = dict(
        adapters[0].config.normalized(),
        init_lora_weights=True,
        use_dora=False,
        lora_bias=False,
        target_modules=sorted(gathered),
        modules_to_save=to_save or None,
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        trainable_token_indices=None,
    )
    config = scale_one_config(fields, {m.name: m.rank for m in modules}, use_rslora=rslora)
    plan = CombinePlan(method, modules, config, weights, density, seed, saved=saved)
    bases = Counter(a.config.base_model_name_or_path for a in adapters)
    if len(bases) > 1:
        plan.warnings.append(
            f"the adapters record different base models ({', '.join(map(repr, bases))}); the "
            "combined adapter records the first one"
        )
    return plan


def _saved_tensors(adapters: list[Adapter]) -> dict[str, int]:
    """Whole tensors an input saves (modules_to_save, saved embedding layers), copied as they are: they are not deltas
    and cannot be weighted. Two inputs saving the same tensor must save the same bytes."""
    saved: dict[str, int] = {}
    for i, adapter in enumerate(adapters):
        for key in adapter.replacements.values():
            if key in saved and adapters[saved[key]].tensor_bytes(key) != adapter.tensor_bytes(key):
                raise UnsupportedAdapterError(
                    f"{adapter.path}: saves {key!r} (modules_to_save or a saved embedding layer) with other values "
                    f"than "
                    f"{adapters[saved[key]].path}; a combined adapter can hold one"
                )
            saved.setdefault(key, i)
    return saved


def _check_combinable(adapter: Adapter) -> None:
    """combine handles plain LoRA factors; what is not one (and where PEFT's add_weighted_adapter refuses too)."""
    require_plain(adapter)
    where = adapter.path
    if adapter.token_deltas:
        raise UnsupportedAdapterError(
            f"{where}: trainable tokens are rows of a whole tensor, not LoRA factors; combine "
            "cannot weight them (merge the adapters with a stacked merge)"
        )
    if adapter.replacements and adapter.config.json_dict.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"{where}: bias={adapter.config.json_dict.get('bias')!r} saves trained biases, "
            "which combine cannot weight (merge the adapters with a stacked merge)"
        )
    for m in adapter.lora_modules:
        if m.magnitude_key or m.bias_key or m.depth or m.mha_parent:
            what = (
                "DoRA"
                if m.magnitude_key
                else "lora_bias"
                if m.bias_key
                else "target_parameters"
                if m.depth
                else "MultiheadAttention"
            )
            raise UnsupportedAdapterError(
                f"{where}: module {m.name!r} uses {what}, which is not a sum of B @ A "
                "factors; combine cannot fold it (a stacked merge can merge it)"
            )
        if len(adapter.shapes[m.a_key]) != 2:
            raise UnsupportedAdapterError(
                f"{where}: module {m.name!r} is a convolution LoRA; combine handles Linear, Conv1D and embedding LoRA"
            )


def _combined(
    name: str, parts: list[Part], module: LoraModule, adapter: Adapter, method: str, rank: int | None
) -> CombinedModule:
    a_shape, b_shape = adapter.shapes[module.a_key], adapter.shapes[module.b_key]
    inner, outer = a_shape[1], b_shape[0]
    if method == "cat":
        r = sum(p.rank for p in parts)
    elif method == "svd":
        r = min(rank or max(p.rank for p in parts), sum(p.rank for p in parts), inner, outer)
    else:
        ranks = {p.rank for p in parts}
        if len(ranks) > 1:
            raise UnsupportedAdapterError(
                f"module {name!r} has ranks {sorted(ranks)} in the inputs; [[method={method}]] "
                "adds the A and B factors themselves, which needs one rank (use cat or svd)"
            )
        r = ranks.pop()
    return CombinedModule(name, module.embedding, module.a_key, module.b_key, parts, r, (r, inner), (outer, r))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
