"""Config rewrites that keep every module's scale bit for bit (what `convert` writes).

`convention_config` rewrites a config to the other convention (rsLoRA <-> classic) so that PEFT
computes bit-identical scales, with pattern keys that every PEFT version matches the same way
(docs/peft-rules.md, "Patterns"). `unit_config` is the form whose scale is 1 in every runtime,
once the scale is folded into the weights (docs/runtimes.md, "The unit-scale form").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any

from ..errors import UnsupportedAdapterError
from .adapter import Adapter, LoraModule
from .module_scales import ModuleEntry
from .scaling import ModuleScale, matching_keys, scale, scale_in, unstable_patterns


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
    raise UnsupportedAdapterError(f"no alpha gives PEFT's scale {target!r} at rank {r} exactly")


def convention_config(adapter: Adapter, entries: list[ModuleEntry], use_rslora: bool) -> dict[str, Any]:
    """The adapter's config rewritten to the other convention; every module keeps its exact scale.

    Values are rewritten in place (alpha' = alpha*sqrt(r) or alpha/sqrt(r), per pattern key)
    when the patterns are stable across PEFT versions; a module group whose rank differs from
    the global one gets an alpha entry under its rank_pattern key. Otherwise the patterns are
    rewritten to full module names, the same keys in both dicts, one per module that differs
    from the most common (rank, alpha).
    """
    fields = adapter.config.normalized()
    names = [e.name for e in entries]
    new, reason = None, ""
    try:
        if not unstable_patterns(fields, names):
            new = _rewrite_in_place(fields, entries, use_rslora)
        if new is None or not _keeps_scales(new, entries):
            alphas = [alpha_for_scale(e.scale.scale, e.scale.r, use_rslora) for e in entries]
            new = _rewrite_canonical(fields, entries, use_rslora, alphas)
    except UnsupportedAdapterError as e:
        new, reason = None, f" ({e.message})"
    if new is None or not _keeps_scales(new, entries):
        raise UnsupportedAdapterError(
            f"{adapter.path}: cannot express these per-module scales in a config{reason}; use [[bake=True]] to fold "
            f"the "
            "change into lora_B instead"
        )
    return new


def unit_config(adapter: Adapter, entries: list[ModuleEntry], *, global_alpha_only: bool = False) -> dict[str, Any]:
    """The config of the unit-scale form: classic, alpha = rank per module, so every scale is 1.

    With `global_alpha_only`, alpha_pattern is left empty and lora_alpha is the global rank: each
    module's scale is then r_global / r_k, the value a reader that takes the rank from the tensor
    shapes and one alpha per file (llama.cpp) computes as well. Weights must carry the rest.
    """
    fields = adapter.config.normalized()
    rank_pattern = fields["rank_pattern"]
    # alpha_pattern mirrors the adapter's own rank_pattern when its keys are stable; else full module names.
    new = dict(fields, use_rslora=False, lora_alpha=fields["r"], alpha_pattern=dict(rank_pattern))
    if not _keeps_scales(new, entries, [1.0] * len(entries)):
        new = _rewrite_canonical(fields, entries, False, [e.scale.r for e in entries])
    if global_alpha_only:
        new["lora_alpha"] = new["r"]
        new["alpha_pattern"] = {}
    return new


def scale_one_config(fields: dict[str, Any], ranks: dict[str, int], *, use_rslora: bool = False) -> dict[str, Any]:
    """A config whose modules (name -> rank) all get scale 1 in every PEFT version: classic with alpha = rank, or
    rsLoRA with alpha = sqrt(rank) (alpha / sqrt(r) is then exactly 1.0). Used for factors that carry their scale."""
    entries = []
    for name, r in ranks.items():
        alpha = math.sqrt(r) if use_rslora else r
        scale_ = ModuleScale(r=r, alpha=alpha, scale=1.0, use_rslora=use_rslora, rank_key=None, alpha_key=None)
        entries.append(ModuleEntry(LoraModule(name), name, r, scale_))
    fields = dict(fields, use_rslora=use_rslora, rank_pattern={}, alpha_pattern={})
    new = _rewrite_canonical(fields, entries, use_rslora, [e.scale.alpha for e in entries])
    if not _keeps_scales(new, entries):
        raise UnsupportedAdapterError(
            "no config gives every combined module scale 1 (module names that match each other as patterns)"
        )
    return new


def rank_doubled_config(adapter: Adapter, entries: list[ModuleEntry], *, unit: bool = False) -> dict[str, Any]:
    """The config of the rank-2r form (`--initial`: A' = [A; A0], B' = [B, -B0]): every rank doubled, alphas chosen so
    that each module keeps its scale bit for bit at its new rank (`unit`: classic with alpha = rank, scale 1, for
    scales folded into the weights). Raises UnsupportedAdapterError when no alphas do."""
    fields = adapter.config.normalized()
    use_rslora = False if unit else bool(fields["use_rslora"])
    fields = dict(
        fields,
        r=2 * fields["r"],
        rank_pattern={k: 2 * v for k, v in fields["rank_pattern"].items()},
        init_lora_weights=True,
    )
    doubled = [
        dataclasses.replace(
            e,
            shape_rank=2 * e.shape_rank,
            scale=dataclasses.replace(e.scale, r=2 * e.scale.r, scale=1.0 if unit else e.scale.scale),
        )
        for e in entries
    ]
    new = None
    if not unstable_patterns(fields, [e.name for e in doubled]):
        new = _rewrite_in_place(fields, doubled, use_rslora)
    if new is None or not _keeps_scales(new, doubled):
        alphas = [alpha_for_scale(e.scale.scale, e.scale.r, use_rslora) for e in doubled]
        new = _rewrite_canonical(fields, doubled, use_rslora, alphas)
    if not _keeps_scales(new, doubled):
        raise UnsupportedAdapterError(f"{adapter.path}: no config gives every module its scale at twice its rank")
    return new


def keeping_scales(fields: dict[str, Any], entries: list[ModuleEntry]) -> dict[str, Any]:
    """`fields` if PEFT gives every module in `entries` its rank and scale by it; else its patterns rewritten to full
    module names (for the modules that differ from the most common rank and alpha). A config that a relayout or a
    rename produced keeps every module's scale this way, checked by PEFT's own matching (`scale_in`)."""
    if _same_scales(fields, entries):
        return fields
    use_rslora = bool(fields.get("use_rslora"))
    alphas = [alpha_for_scale(e.scale.scale, e.scale.r, use_rslora) for e in entries]
    new = _rewrite_canonical(
        dict(fields, rank_pattern={}, alpha_pattern={}), entries, use_rslora, alphas, anchored=True
    )
    if not _same_scales(new, entries):
        raise UnsupportedAdapterError(
            "no adapter_config.json gives every rewritten module its scale (module names "
            "that match each other as patterns)"
        )
    return new


def _rewrite_in_place(fields: dict[str, Any], entries: list[ModuleEntry], use_rslora: bool) -> dict[str, Any] | None:
    """Rewrite lora_alpha and each alpha_pattern value for its rank; None when one value cannot serve all its
    modules."""
    # a module's group: its alpha_pattern key, else ("rank", its rank_pattern key), else None (the global alpha)
    groups: dict[str | tuple[str, str] | None, set[int | float]] = {}
    for e in entries:
        key: str | tuple[str, str] | None = (
            e.scale.alpha_key
            if e.scale.alpha_key is not None
            else (("rank", e.scale.rank_key) if e.scale.rank_key is not None else None)
        )
        groups.setdefault(key, set()).add(alpha_for_scale(e.scale.scale, e.scale.r, use_rslora))
    if any(len(v) > 1 for v in groups.values()):
        return None
    new = dict(fields)
    new["use_rslora"] = use_rslora
    old_rs = bool(fields.get("use_rslora"))
    if None in groups:
        new["lora_alpha"] = next(iter(groups[None]))
    else:  # no module uses the global alpha: convert it at the global rank
        new["lora_alpha"] = alpha_for_scale(scale(fields["lora_alpha"], fields["r"], old_rs), fields["r"], use_rslora)
    alpha_pattern = {}
    for key, value in (fields.get("alpha_pattern") or {}).items():
        if key in groups:
            alpha_pattern[key] = next(iter(groups[key]))
        else:  # matches no module: convert it at the rank its rank key (or the global r) gives
            r = (fields.get("rank_pattern") or {}).get(key, fields["r"])
            alpha_pattern[key] = alpha_for_scale(scale(value, r, old_rs), r, use_rslora)
    for key, values in groups.items():
        if isinstance(key, tuple):  # a rank_pattern group using the global alpha
            value = next(iter(values))
            if value != new["lora_alpha"]:
                alpha_pattern[key[1]] = value
    # An entry under a rank key that now equals the global alpha is redundant (a round trip removes it).
    rank_keys = set(fields.get("rank_pattern") or {})
    new["alpha_pattern"] = {
        k: v
        for k, v in sorted(alpha_pattern.items())
        if not (k in rank_keys and v == new["lora_alpha"] and k in groups)
    }
    return new


def _rewrite_canonical(
    fields: dict[str, Any],
    entries: list[ModuleEntry],
    use_rslora: bool,
    alphas: list[int | float],
    anchored: bool = False,
) -> dict[str, Any]:
    """Full-module-name patterns (same keys in both dicts) for modules that differ from the most common pair;
    `anchored`: a name that is also the end of another module's name is written `^name` (escaped), a regular
    expression that PEFT >= 0.15 matches to that module only."""
    pairs = [(e.scale.r, a) for e, a in zip(entries, alphas)]
    r_global, alpha_global = Counter(pairs).most_common(1)[0][0] if pairs else (fields["r"], fields["lora_alpha"])
    rank_pattern, alpha_pattern = {}, {}
    names = [e.name for e in entries]
    matched_by: dict[str, list[str]] = {}  # each module name, used as a key: the modules it matches
    for n in names:
        for key in matching_keys(names, n):
            matched_by.setdefault(key, []).append(n)
    for e, (r, alpha) in zip(entries, pairs):
        if (r, alpha) == (r_global, alpha_global):
            continue
        hits = matched_by.get(e.name, [])
        key = e.name
        if hits != [e.name] and anchored:
            key = "^" + re.escape(e.name)
        elif hits != [e.name]:
            raise UnsupportedAdapterError(
                f"module name {e.name!r} also matches {', '.join(h for h in hits if h != e.name)} as a pattern key; "
                "its scale cannot be set on its own in adapter_config.json"
            )
        rank_pattern[key] = r
        alpha_pattern[key] = alpha
    new = dict(fields)
    new.update(
        use_rslora=use_rslora,
        r=r_global,
        lora_alpha=alpha_global,
        rank_pattern=dict(sorted(rank_pattern.items())),
        alpha_pattern=dict(sorted(alpha_pattern.items())),
    )
    return new


def _keeps_scales(fields: dict[str, Any], entries: list[ModuleEntry], scales: list[float] | None = None) -> bool:
    """Every module resolves to its rank and the bit-identical scale (its own, or `scales`); patterns stable."""
    return not unstable_patterns(fields, [e.name for e in entries]) and _same_scales(fields, entries, scales)


def _same_scales(fields: dict[str, Any], entries: list[ModuleEntry], scales: list[float] | None = None) -> bool:
    """Every module resolves to its rank and the bit-identical scale (its own, or `scales`) by PEFT's matching."""
    for i, e in enumerate(entries):
        s = scale_in(fields, e.name)
        if s.r != e.scale.r or s.scale != (e.scale.scale if scales is None else scales[i]):
            return False
    return True


def is_power_of_two(x: float) -> bool:
    m, _ = math.frexp(x)
    return x > 0 and m == 0.5
