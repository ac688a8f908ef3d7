"""Per-module scales of an adapter, and config rewrites that keep every scale exactly.

`module_entries` lists each LoRA module with PEFT's rank, alpha and scale (via scaling.py, the
one scale implementation) and the rank its tensors have. `convention_config` rewrites a config
to the other convention (rsLoRA <-> classic) so that PEFT computes bit-identical scales, with
pattern keys that every PEFT version matches the same way. `unit_config` is the form whose scale
is 1 in every runtime, once the scale is folded into the weights.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .adapter import Adapter, LoraModule
from .errors import MismatchError, UnsupportedAdapterError
from .scaling import ModuleScale, matching_keys, module_scale, pattern_key, scale

# A pattern key that PEFT <= 0.14 (`.*\.{key}$` plus an exact-name fallback) and >= 0.15
# (`(.*\.)?({key})$`) match the same way: dotted identifiers, no anchors or other regex syntax.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


@dataclass(frozen=True)
class ModuleEntry:
    """One LoRA module: its saved tensors, the name PEFT matches patterns against, its scale."""

    module: LoraModule
    name: str  # what rank_pattern / alpha_pattern keys are matched against
    shape_rank: int  # the rank the saved tensors have
    scale: ModuleScale

    @property
    def kind(self) -> str:
        if self.module.embedding:
            return "embedding"
        if self.module.mha_parent is not None:
            return "mha out_proj"
        return "param" if self.name != self.module.name else "module"


def module_entries(adapter: Adapter, *, check_ranks: bool = True) -> list[ModuleEntry]:
    """Every LoRA module of the adapter with PEFT's scale, in adapter file order.

    Raises MismatchError when the config's rank disagrees with the saved tensors (PEFT would
    refuse to load such an adapter), unless `check_ranks` is False.
    """
    entries = []
    for module in adapter.lora_modules:
        name = _pattern_name(adapter, module)
        s = adapter.config.scale_for(name)
        a_rows = adapter.shapes[module.a_key][0]  # type: ignore[index]
        shape_rank = a_rows
        if name != module.name and a_rows % s.r == 0:  # a target_parameters wrapper: rank * experts rows
            shape_rank = s.r
        if check_ranks and shape_rank != s.r:
            source = f"rank_pattern key {s.rank_key!r}" if s.rank_key is not None else "'r'"
            raise MismatchError(
                f"{adapter.path}: module {module.name!r}: the config gives rank {s.r} (from {source}) but the "
                f"saved tensors have rank {shape_rank}; PEFT cannot load this adapter"
            )
        entries.append(ModuleEntry(module, name, shape_rank, s))
    return entries


def _pattern_name(adapter: Adapter, module: LoraModule) -> str:
    """PEFT matches patterns against `<module>.<param>` for target_parameters wrappers, else the module name."""
    if module.mha_parent is not None:  # out_proj inside a MultiheadAttention LoRA layer: the MHA's own name
        return module.mha_parent
    params = []
    for target in adapter.config.target_parameters:
        full = f"{module.name}.{target.rsplit('.', 1)[-1]}"
        if full == target or full.endswith("." + target):
            params.append(full)
    if not params:
        return module.name
    if len(params) == 1:
        return params[0]
    return _nested_parameter(adapter, module, params)


def _nested_parameter(adapter: Adapter, module: LoraModule, params: list[str]) -> str:
    """Which of several target parameters a nested ParamWrapper (`module.depth`) holds.

    Each wrapper's A has rank * experts rows, with one expert count for the whole module. Among
    the assignments of parameters to nesting depths, keep those where one expert count fits every
    depth; the answer is known when all of them give this depth the same rank and alpha.
    """
    import itertools

    cfg = adapter.config
    depths = sorted(d for (name, d) in adapter.modules if name == module.name)
    rows = {d: adapter.shapes[adapter.modules[(module.name, d)].a_key][0] for d in depths}  # type: ignore[index]
    scales = {p: cfg.scale_for(p) for p in params}
    answers = set()
    for chosen in itertools.permutations(params, len(depths)):
        experts = {rows[d] / scales[p].r for d, p in zip(depths, chosen)}
        if len(experts) == 1 and next(iter(experts)).is_integer():
            picked = chosen[depths.index(module.depth)]
            answers.add((scales[picked].r, scales[picked].alpha, picked))
    if len({(r, alpha) for r, alpha, _ in answers}) == 1:
        return sorted(answers)[0][2]
    raise UnsupportedAdapterError(
        f"{adapter.path}: module {module.name!r} wraps several target parameters ({', '.join(params)}) whose "
        "saved tensors cannot be told apart from the adapter alone (merge matches them to the base's shapes)"
    )


def alpha_for_scale(target: float, r: int, use_rslora: bool) -> int | float:
    """The shortest alpha for which PEFT's scale is exactly `target` (bit for bit) at rank r."""
    x0 = target * math.sqrt(r) if use_rslora else target * r
    candidates = [float(f"{x0:.{digits}g}") for digits in range(1, 18)]
    up = down = x0
    for _ in range(16):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    for alpha in candidates:
        if alpha > 0 and scale(alpha, r, use_rslora) == target:
            return int(alpha) if alpha.is_integer() and abs(alpha) < 2**53 else alpha
    raise UnsupportedAdapterError(f"no alpha gives scale {target!r} at rank {r} exactly")


def unstable_patterns(raw: dict[str, Any], names: list[str]) -> list[str]:
    """Why PEFT versions might resolve these patterns differently (empty when they all agree).

    Stable means: every key is a plain dotted name (no `^` anchors or regex syntax, which
    PEFT < 0.15 does not match), and no module is matched by more than one key across
    rank_pattern and alpha_pattern (the first match depends on key order, which PEFT's sorted
    save changes, and PEFT <= 0.13 used one combined lookup).
    """
    keys = list(dict.fromkeys([*(raw.get("rank_pattern") or {}), *(raw.get("alpha_pattern") or {})]))
    reasons = [f"pattern key {k!r} is a regular expression, not a plain module name" for k in keys if not _PLAIN_KEY.fullmatch(k)]
    for name in names:
        hits = matching_keys(keys, name)
        if len(hits) > 1:
            reasons.append(f"module {name!r} is matched by several pattern keys ({', '.join(map(repr, hits))})")
    return reasons


def resolve(raw: dict[str, Any], name: str) -> ModuleScale:
    """PEFT's rank, alpha and scale for `name` under a (possibly rewritten) raw config dict."""
    return module_scale(
        name, r=raw["r"], lora_alpha=raw["lora_alpha"], use_rslora=bool(raw.get("use_rslora")),
        rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
    )


def normalized_raw(adapter: Adapter) -> dict[str, Any]:
    """The raw config with the scale fields always present (PEFT's defaults filled in)."""
    cfg = adapter.config
    raw = dict(cfg.raw)
    raw.update(r=cfg.r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora,
               rank_pattern=dict(cfg.rank_pattern), alpha_pattern=dict(cfg.alpha_pattern))
    return raw


def convention_config(adapter: Adapter, entries: list[ModuleEntry], use_rslora: bool) -> dict[str, Any]:
    """The adapter's config rewritten to the other convention; every module keeps its exact scale.

    Values are rewritten in place (alpha' = alpha*sqrt(r) or alpha/sqrt(r), per pattern key)
    when the patterns are stable across PEFT versions; a module group whose rank differs from
    the global one gets an alpha entry under its rank_pattern key. Otherwise the patterns are
    rewritten to full module names, the same keys in both dicts, one per module that differs
    from the most common (rank, alpha).
    """
    raw = normalized_raw(adapter)
    names = [e.name for e in entries]
    new = None
    if not unstable_patterns(raw, names):
        new = _rewrite_in_place(raw, entries, use_rslora)
    if new is None or not _keeps_scales(new, entries):
        new = _rewrite_canonical(raw, entries, use_rslora, [alpha_for_scale(e.scale.scale, e.scale.r, use_rslora) for e in entries])
    if not _keeps_scales(new, entries):
        raise UnsupportedAdapterError(
            f"{adapter.path}: cannot express these per-module scales in a config; use --bake instead"
        )
    return new


def unit_config(adapter: Adapter, entries: list[ModuleEntry], *, global_alpha_only: bool = False) -> dict[str, Any]:
    """The config of the unit-scale form: classic, alpha = rank per module, so every scale is 1.

    With `global_alpha_only`, alpha_pattern is left empty and lora_alpha is the global rank: each
    module's scale is then r_global / r_k, the value a reader that takes the rank from the tensor
    shapes and one alpha per file (llama.cpp) computes as well. Weights must carry the rest.
    """
    raw = normalized_raw(adapter)
    rank_pattern = raw["rank_pattern"]
    # alpha_pattern mirrors the adapter's own rank_pattern when its keys are stable; else full module names.
    new = dict(raw, use_rslora=False, lora_alpha=raw["r"], alpha_pattern=dict(rank_pattern))
    if not _keeps_scales(new, entries, [1.0] * len(entries)):
        new = _rewrite_canonical(raw, entries, False, [e.scale.r for e in entries])
    if global_alpha_only:
        new["lora_alpha"] = new["r"]
        new["alpha_pattern"] = {}
    return new


def _rewrite_in_place(raw: dict[str, Any], entries: list[ModuleEntry], use_rslora: bool) -> dict[str, Any] | None:
    """Rewrite lora_alpha and each alpha_pattern value for its rank; None when one value cannot serve all its modules."""
    groups: dict[str | None, set[int | float]] = {}
    rank_of_group: dict[str | None, set[int]] = {}
    for e in entries:
        key = e.scale.alpha_key if e.scale.alpha_key is not None else (
            ("rank", e.scale.rank_key) if e.scale.rank_key is not None else None)
        groups.setdefault(key, set()).add(alpha_for_scale(e.scale.scale, e.scale.r, use_rslora))  # type: ignore[arg-type]
        rank_of_group.setdefault(key, set()).add(e.scale.r)  # type: ignore[arg-type]
    if any(len(v) > 1 for v in groups.values()):
        return None
    new = dict(raw)
    new["use_rslora"] = use_rslora
    old_rs = bool(raw.get("use_rslora"))
    if None in groups:
        new["lora_alpha"] = next(iter(groups[None]))
    else:  # no module uses the global alpha: convert it at the global rank
        new["lora_alpha"] = alpha_for_scale(scale(raw["lora_alpha"], raw["r"], old_rs), raw["r"], use_rslora)
    alpha_pattern = {}
    for key, value in (raw.get("alpha_pattern") or {}).items():
        if key in groups:
            alpha_pattern[key] = next(iter(groups[key]))
        else:  # matches no module: convert it at the rank its rank key (or the global r) gives
            r = (raw.get("rank_pattern") or {}).get(key, raw["r"])
            alpha_pattern[key] = alpha_for_scale(scale(value, r, old_rs), r, use_rslora)
    for key, values in groups.items():
        if isinstance(key, tuple):  # a rank_pattern group using the global alpha
            value = next(iter(values))
            if value != new["lora_alpha"]:
                alpha_pattern[key[1]] = value
    # An entry under a rank key that now equals the global alpha is redundant (a round trip removes it).
    rank_keys = set(raw.get("rank_pattern") or {})
    new["alpha_pattern"] = {
        k: v for k, v in sorted(alpha_pattern.items()) if not (k in rank_keys and v == new["lora_alpha"] and k in groups)
    }
    return new


def _rewrite_canonical(
    raw: dict[str, Any], entries: list[ModuleEntry], use_rslora: bool, alphas: list[int | float]
) -> dict[str, Any]:
    """Full-module-name patterns (same keys in both dicts) for modules that differ from the most common pair."""
    pairs = [(e.scale.r, a) for e, a in zip(entries, alphas)]
    r_global, alpha_global = Counter(pairs).most_common(1)[0][0] if pairs else (raw["r"], raw["lora_alpha"])
    rank_pattern, alpha_pattern = {}, {}
    names = [e.name for e in entries]
    for e, (r, alpha) in zip(entries, pairs):
        if (r, alpha) == (r_global, alpha_global):
            continue
        hits = [n for n in names if pattern_key([e.name], n) is not None]
        if hits != [e.name]:
            raise UnsupportedAdapterError(
                f"module name {e.name!r} also matches {', '.join(h for h in hits if h != e.name)} as a pattern key; "
                "its scale cannot be set on its own in adapter_config.json"
            )
        rank_pattern[e.name] = r
        alpha_pattern[e.name] = alpha
    new = dict(raw)
    new.update(
        use_rslora=use_rslora, r=r_global, lora_alpha=alpha_global,
        rank_pattern=dict(sorted(rank_pattern.items())), alpha_pattern=dict(sorted(alpha_pattern.items())),
    )
    return new


def _keeps_scales(raw: dict[str, Any], entries: list[ModuleEntry], scales: list[float] | None = None) -> bool:
    """Every module resolves to its rank and the bit-identical scale (its own, or `scales`); patterns stable."""
    if unstable_patterns(raw, [e.name for e in entries]):
        return False
    for i, e in enumerate(entries):
        s = resolve(raw, e.name)
        if s.r != e.scale.r or s.scale != (e.scale.scale if scales is None else scales[i]):
            return False
    return True


def is_power_of_two(x: float) -> bool:
    m, _ = math.frexp(x)
    return x > 0 and m == 0.5
