"""PEFT's scale rules: rank/alpha patterns and the rsLoRA vs classic scale.

This is the one place where a module's scale is computed; merge, convert and inspect all call
`module_scale`. Matching follows PEFT >= 0.15 (`peft.utils.other.get_pattern_key`): pattern
keys are tried in the order they appear in `adapter_config.json` (PEFT writes them sorted), and
the first key `k` for which `re.match(rf"(.*\\.)?({k})$", name)` succeeds wins.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import AdapterConfigError


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
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
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
