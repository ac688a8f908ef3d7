"""Stage 2, adapter and scales: PEFT's scale rules, rank/alpha patterns and the rsLoRA vs classic scale.

This is the one place where a module's scale is computed; merge, convert and inspect all call
`module_scale`. Matching follows PEFT >= 0.15 (docs/peft-rules.md, "Patterns"): pattern keys
are tried in the order they appear in `adapter_config.json` (PEFT writes them sorted), and the
first key `k` for which `re.match(rf"(.*\\.)?({k})$", name)` succeeds wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import AdapterConfigError

Convention = Literal["rslora", "classic"]

LabelStyle = Literal["name", "short", "formula"]
_LABELS: dict[str, dict[str, str]] = {
    "rslora": {"name": "rsLoRA", "short": "rsLoRA, alpha/sqrt(r)", "formula": "rsLoRA (scale = lora_alpha / sqrt(r))"},
    "classic": {"name": "classic LoRA", "short": "classic LoRA, alpha/r", "formula": "classic LoRA (scale = lora_alpha / r)"},
}

# A pattern key that PEFT <= 0.14 (`.*\.{key}$` plus an exact-name fallback) and >= 0.15
# (`(.*\.)?({key})$`) match the same way: dotted identifiers, no anchors or other regex syntax.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def convention_label(convention: str, style: LabelStyle = "name") -> str:
    """How a convention is written: "rsLoRA" (name), "rsLoRA, alpha/sqrt(r)" (short), or with the scale formula."""
    return _LABELS[convention][style] if convention in _LABELS else convention


def pattern_key(keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that matches `module_name`, as PEFT's get_pattern_key picks it, or None."""
    for key in keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module_name):
                return key
        except re.error as e:
            raise AdapterConfigError(f"adapter_config.json: pattern key {key!r} is not a valid regular expression: {e}") from e
    return None


def matching_keys(keys: Iterable[str], module_name: str) -> list[str]:
    """Every pattern key that matches `module_name` (more than one makes the result order-dependent)."""
    return [k for k in keys if pattern_key([k], module_name) is not None]


def scale(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha/sqrt(r) for rsLoRA, alpha/r otherwise (a Python float, as in PEFT)."""
    if r <= 0:
        raise AdapterConfigError(f"rank must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass(frozen=True)
class ModuleScale:
    """The rank, alpha and scale PEFT uses for one module, and which pattern keys decided them."""

    r: int
    alpha: float
    scale: float
    use_rslora: bool
    rank_key: str | None
    alpha_key: str | None


def module_scale(
    module_name: str,
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> ModuleScale:
    """Resolve rank, alpha and scale for `module_name` (relative to the wrapped model, no `base_model.model.`)."""
    rank_pattern = rank_pattern or {}
    alpha_pattern = alpha_pattern or {}
    rank_key = pattern_key(rank_pattern, module_name)
    alpha_key = pattern_key(alpha_pattern, module_name)
    module_r = rank_pattern[rank_key] if rank_key is not None else r
    module_alpha = alpha_pattern[alpha_key] if alpha_key is not None else lora_alpha
    return ModuleScale(
        r=module_r,
        alpha=module_alpha,
        scale=scale(module_alpha, module_r, use_rslora),
        use_rslora=use_rslora,
        rank_key=rank_key,
        alpha_key=alpha_key,
    )


def scale_in(fields: Mapping[str, Any], module_name: str) -> ModuleScale:
    """PEFT's scale for `module_name` under a config's scale fields (r, lora_alpha, use_rslora, patterns)."""
    return module_scale(
        module_name, r=fields["r"], lora_alpha=fields["lora_alpha"], use_rslora=bool(fields.get("use_rslora")),
        rank_pattern=fields.get("rank_pattern") or {}, alpha_pattern=fields.get("alpha_pattern") or {},
    )


def unstable_patterns(fields: Mapping[str, Any], names: list[str]) -> list[str]:
    """Why PEFT versions might resolve these patterns differently (empty when they all agree).

    Stable means: every key is a plain dotted name (no `^` anchors or regex syntax, which
    PEFT < 0.15 does not match), and no module is matched by more than one key across
    rank_pattern and alpha_pattern (the first match depends on key order, which PEFT's sorted
    save changes, and PEFT <= 0.13 used one combined lookup).
    """
    keys = list(dict.fromkeys([*(fields.get("rank_pattern") or {}), *(fields.get("alpha_pattern") or {})]))
    reasons = [f"pattern key {k!r} is a regular expression, not a plain module name" for k in keys if not _PLAIN_KEY.fullmatch(k)]
    for name in names:
        hits = matching_keys(keys, name)
        if len(hits) > 1:
            reasons.append(f"module {name!r} is matched by several pattern keys ({', '.join(map(repr, hits))})")
    return reasons
