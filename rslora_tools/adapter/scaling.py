"""PEFT's scale rules, rank/alpha patterns and the rsLoRA vs classic scale.

This is the one place where a module's scale is computed; merge, convert and inspect all call
`module_scale`. Matching follows PEFT >= 0.15 (docs/peft-rules.md, "Patterns"): pattern keys
are tried in the order they appear in `adapter_config.json` (PEFT writes them sorted), and the
first key `k` for which `re.match(rf"(.*\\.)?({k})$", name)` succeeds wins.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import AdapterConfigError

Convention = Literal["rslora", "classic"]

LabelStyle = Literal["name", "short", "formula"]
_LABELS: dict[str, dict[str, str]] = {
    "rslora": {"name": "rsLoRA", "short": "rsLoRA, alpha/sqrt(r)", "formula": "rsLoRA (scale = lora_alpha / sqrt(r))"},
    "classic": {
        "name": "classic LoRA",
        "short": "classic LoRA, alpha/r",
        "formula": "classic LoRA (scale = lora_alpha / r)",
    },
}

# A pattern key that PEFT <= 0.14 (`.*\.{key}$` plus an exact-name fallback) and >= 0.15
# (`(.*\.)?({key})$`) match the same way: dotted identifiers, no anchors or other regex syntax.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def convention_label(convention: str, style: LabelStyle = "name") -> str:
    """How a convention is written: "rsLoRA" (name), "rsLoRA, alpha/sqrt(r)" (short), or with the scale formula."""
    return _LABELS[convention][style] if convention in _LABELS else convention


def pattern_key(keys: Iterable[str], module_name: str) -> str | None:
    """The first pattern key that matches `module_name`, as PEFT's get_pattern_key picks it, or None."""
    return _index(tuple(keys)).first(module_name)


def matching_keys(keys: Iterable[str], module_name: str) -> list[str]:
    """Every pattern key that matches `module_name` (more than one makes the result order-dependent)."""
    return _index(tuple(keys)).matches(module_name)


# Keys made of these characters match a fixed number of characters: `.` is PEFT's any-character
# wildcard and nothing else is special, so only a name's dot-aligned suffix of that length can match.
_FIXED_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


class PatternIndex:
    r"""The keys of one pattern dict, indexed to match many module names in time linear in their number.

    PEFT tries every key in file order with `re.match(rf"(.*\.)?({key})$", name)` and takes the
    first that matches. A fixed key (letters, digits, `_`, `-`, `.`) can only match the name's
    suffix of the key's length that starts the name or follows a `.`; those keys are found through
    dicts, grouped by length and by where their `.` wildcards are. Other keys are regular
    expressions, compiled once and tried in order. With one key per module (EVA writes thousands)
    a name costs a few dict lookups instead of a regex per key.
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        # length -> positions of the `.` wildcards -> the key with those positions masked -> first index
        self._fixed: dict[int, dict[tuple[int, ...], dict[str, int]]] = {}
        self._regex: list[tuple[int, re.Pattern[str]]] = []
        for i, key in enumerate(keys):
            if _FIXED_KEY.fullmatch(key):
                dots = tuple(j for j, ch in enumerate(key) if ch == ".")
                self._fixed.setdefault(len(key), {}).setdefault(dots, {}).setdefault(key, i)
            else:
                try:
                    self._regex.append((i, re.compile(rf"(.*\.)?({key})$")))
                except re.error as e:
                    raise AdapterConfigError(
                        f"adapter_config.json: pattern key {key!r} is not a valid regular expression: {e}"
                    ) from e

    def _fixed_hits(self, name: str) -> list[int]:
        hits = []
        starts = [0] + [j + 1 for j, ch in enumerate(name) if ch == "."]
        for start in starts:
            suffix = name[start:]
            for dots, keys in self._fixed.get(len(suffix), {}).items():
                masked = suffix
                if dots:
                    chars = list(suffix)
                    for j in dots:
                        chars[j] = "."
                    masked = "".join(chars)
                if masked in keys:
                    hits.append(keys[masked])
        return hits

    def first(self, name: str) -> str | None:
        hits = self._fixed_hits(name)
        best = min(hits) if hits else len(self.keys)
        for i, pattern in self._regex:
            if i >= best:
                break
            if pattern.match(name):
                best = i
                break
        return self.keys[best] if best < len(self.keys) else None

    def matches(self, name: str) -> list[str]:
        hits = set(self._fixed_hits(name)) | {i for i, pattern in self._regex if pattern.match(name)}
        return [self.keys[i] for i in sorted(hits)]


@functools.lru_cache(maxsize=256)
def _index(keys: tuple[str, ...]) -> PatternIndex:
    return PatternIndex(keys)


def backtracking_risk(key: str) -> str | None:
    """Why matching this pattern key could take exponential time (PEFT would hang as well), or None.

    Python's regular expressions backtrack: a repetition inside a repetition, or an alternation
    inside a repetition, can try exponentially many ways to match a module name that does not
    match (`(.*)*z`). Such keys are refused before any matching starts.
    """
    new = sys.version_info >= (3, 11)  # the parser of the `re` module moved in 3.11
    c: Any = importlib.import_module("re._constants" if new else "sre_constants")
    parser: Any = importlib.import_module("re._parser" if new else "sre_parse")
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", c.MAX_REPEAT)}

    def walk(items: Any, inside: bool) -> str | None:
        for op, av in items:
            subs: list[Any] = []
            repeated = inside
            if op in repeats:
                if av[1] > 1:
                    if inside:
                        return "a repetition inside a repetition"
                    repeated = True
                subs = [av[2]]
            elif op is c.SUBPATTERN:
                subs = [av[3]]
            elif op is c.BRANCH:
                if inside:
                    return "an alternation inside a repetition"
                subs = list(av[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                subs = [av[1]]
            elif op is getattr(c, "ATOMIC_GROUP", None):
                subs = [av]
            for sub in subs:
                found = walk(sub, repeated)
                if found:
                    return found
        return None

    try:
        return walk(parser.parse(key), False)
    except re.error:
        return None  # reported as an invalid regular expression


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
        module_name,
        r=fields["r"],
        lora_alpha=fields["lora_alpha"],
        use_rslora=bool(fields.get("use_rslora")),
        rank_pattern=fields.get("rank_pattern") or {},
        alpha_pattern=fields.get("alpha_pattern") or {},
    )


def unstable_patterns(fields: Mapping[str, Any], names: list[str]) -> list[str]:
    """Why PEFT versions might resolve these patterns differently (empty when they all agree).

    Stable means: every key is a plain dotted name (no `^` anchors or regex syntax, which
    PEFT < 0.15 does not match), and no module is matched by more than one key across
    rank_pattern and alpha_pattern (the first match depends on key order, which PEFT's sorted
    save changes, and PEFT <= 0.13 used one combined lookup).
    """
    keys = list(dict.fromkeys([*(fields.get("rank_pattern") or {}), *(fields.get("alpha_pattern") or {})]))
    reasons = [
        f"pattern key {k!r} is a regular expression, not a plain module name"
        for k in keys
        if not _PLAIN_KEY.fullmatch(k)
    ]
    for name in names:
        hits = matching_keys(keys, name)
        if len(hits) > 1:
            reasons.append(f"module {name!r} is matched by several pattern keys ({', '.join(map(repr, hits))})")
    return reasons
