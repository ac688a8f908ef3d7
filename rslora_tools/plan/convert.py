"""How `convert` changes an adapter, decided from its config and module scales (commands/convert.py writes it).

The least change that makes the target apply PEFT's exact per-module scales: a no-op copy, a
config-only rewrite (weights byte-identical), or folding scales into lora_B (`--bake`, the
unit-scale form). docs/runtimes.md says what each runtime does with the scale fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..adapter.adapter import Adapter
from ..adapter.config_rewrite import convention_config, unit_config
from ..adapter.module_scales import ModuleEntry
from ..adapter.runtimes import Runtime, missing_features, runtime, runtime_scale
from ..adapter.scaling import convention_label, scale, unstable_patterns
from ..errors import UnsupportedAdapterError

CONVENTIONS: dict[str, bool] = {"rslora": True, "classic": False}


Action = Literal["copy", "config", "bake", "unit", "gguf", "initial", "relayout", "mlx"]


@dataclass
class ConversionPlan:
    """What a conversion does: the new config, and per-module factors folded into lora_B (if any)."""

    action: Action
    config: dict[str, Any]
    factors: dict[tuple[str, int], float]  # (module name, depth) -> factor multiplied into its B (and lora bias)
    message: str


def plan_conversion(
    adapter: Adapter,
    entries: list[ModuleEntry],
    *,
    to: str | None = None,
    target: str | None = None,
    bake: bool = False,
) -> ConversionPlan:
    """Choose how to convert: `to` a convention ("rslora"/"classic"), or for a `target` runtime (or "unit")."""
    fields = adapter.config.normalized()
    current = adapter.config.convention
    if to is not None:
        use_rslora = CONVENTIONS[to]
        if to == current:
            return ConversionPlan(
                "copy", fields, {}, f"the adapter is already {convention_label(to)}; copied unchanged"
            )
        if bake:
            new = dict(fields, use_rslora=use_rslora)
            factors = {_key(e): e.scale.scale / scale(e.scale.alpha, e.scale.r, use_rslora) for e in entries}
            return ConversionPlan(
                "bake",
                new,
                factors,
                f"{convention_label(current)} -> {convention_label(to)}: scale change folded into lora_B",
            )
        new = convention_config(adapter, entries, use_rslora)
        return ConversionPlan(
            "config",
            new,
            {},
            f"{convention_label(current)} -> {convention_label(to)}: alphas rewritten, weights unchanged",
        )

    if target == "unit" or target is None:
        return _unit_plan(adapter, entries, "unit-scale form (scale 1 in every runtime)")
    rt = runtime(target)
    lacks = missing_features(rt, adapter)
    if lacks:
        raise UnsupportedAdapterError(
            f"{rt.title} cannot serve this adapter: {'; '.join(lacks)}. Merge it into the base model "
            "instead ([[rslora_tools.merge(BASE, ADAPTER, OUT)]]) and serve the merged model"
        )
    return _plan_for_runtime(adapter, entries, rt, fields)


def _plan_for_runtime(
    adapter: Adapter, entries: list[ModuleEntry], runtime: Runtime, fields: dict[str, Any]
) -> ConversionPlan:
    """The least change that makes `runtime` apply PEFT's scales: nothing, a config rewrite, or folding them in."""
    if runtime.honours_patterns and unstable_patterns(fields, [e.name for e in entries]):
        stable = convention_config(adapter, entries, adapter.config.use_rslora)
        return ConversionPlan(
            "config",
            stable,
            {},
            "pattern keys rewritten so that every PEFT version reads the same per-module scales; weights unchanged",
        )
    if _serves_right(runtime, fields, entries):
        return ConversionPlan(
            "copy", fields, {}, f"{runtime.title} already applies PEFT's scale to every module; copied unchanged"
        )
    try:
        rewritten = convention_config(adapter, entries, adapter.config.use_rslora and runtime.honours_rslora)
    except UnsupportedAdapterError:
        rewritten = None
    if rewritten is not None and _serves_right(runtime, rewritten, entries):
        return ConversionPlan(
            "config",
            rewritten,
            {},
            f"config rewritten so that {runtime.title} applies PEFT's scales; weights unchanged",
        )
    if runtime.rank_from_shape:
        new = unit_config(adapter, entries, global_alpha_only=True)
        factors = {_key(e): e.scale.scale / scale(new["lora_alpha"], e.scale.r, False) for e in entries}
        return ConversionPlan(
            "unit",
            new,
            factors,
            f"scales folded into lora_B so that {runtime.title}'s alpha/rank per tensor gives PEFT's scale",
        )
    return _unit_plan(
        adapter, entries, f"{runtime.title} {_ignored(runtime, adapter)}: scales folded into lora_B (unit-scale form)"
    )


def _unit_plan(adapter: Adapter, entries: list[ModuleEntry], message: str) -> ConversionPlan:
    return ConversionPlan("unit", unit_config(adapter, entries), {_key(e): e.scale.scale for e in entries}, message)


def _key(e: ModuleEntry) -> tuple[str, int]:
    return (e.module.name, e.module.depth)


def _serves_right(runtime: Runtime, fields: dict[str, Any], entries: list[ModuleEntry]) -> bool:
    return all(runtime_scale(runtime, fields, e) == e.scale.scale for e in entries)


def _ignored(runtime: Runtime, adapter: Adapter) -> str:
    """What the runtime does not do with this adapter's scale fields, as a phrase."""
    cfg = adapter.config
    parts = []
    if cfg.use_rslora and runtime.rslora != "honoured":
        parts.append("refuses use_rslora" if runtime.rslora == "refused" else "ignores use_rslora")
    if (cfg.rank_pattern or cfg.alpha_pattern) and not runtime.honours_patterns:
        parts.append("ignores rank_pattern/alpha_pattern")
    return " and ".join(parts) or "cannot express these per-module scales"
