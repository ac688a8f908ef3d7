"""Each LoRA module's pattern name, rank and scale, and the lints about them.

`module_entries` lists every module with PEFT's rank, alpha and scale (adapter/scaling.py) and the rank
its saved tensors have. The rules that several commands apply are kept here once: which name
PEFT matches a module's patterns against (`pattern_name`, including which parameter a nested
target_parameters wrapper holds), the rank-mismatch message, and the pattern-key warnings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import MismatchError, UnsupportedAdapterError
from .adapter import Adapter, LoraModule
from .config import AdapterConfig
from .scaling import ModuleScale, matching_keys

Wrapping = Literal["module", "param", "embedding", "mha out_proj"]


@dataclass(frozen=True)
class ModuleEntry:
    """One LoRA module: its saved tensors, the name PEFT matches patterns against, its scale."""

    module: LoraModule
    name: str  # what rank_pattern / alpha_pattern keys are matched against
    shape_rank: int  # the rank the saved tensors have
    scale: ModuleScale

    @property
    def wrapping(self) -> Wrapping:
        """What PEFT wrapped: a module, a target parameter, an embedding, or a MultiheadAttention's out_proj."""
        if self.module.embedding:
            return "embedding"
        if self.module.mha_parent is not None:
            return "mha out_proj"
        return "param" if self.name != self.module.name else "module"


def module_entries(
    adapter: Adapter, *, check_ranks: bool = True, names: Callable[[LoraModule], str] | None = None
) -> list[ModuleEntry]:
    """Every LoRA module of the adapter with PEFT's scale, in adapter file order; `names` gives each module's pattern
    name where a base model decides it (which parameter a target_parameters wrapper holds).

    Raises MismatchError when the config's rank disagrees with the saved tensors (PEFT would
    refuse to load such an adapter), unless `check_ranks` is False.
    """
    entries = []
    for module in adapter.lora_modules:
        name = names(module) if names is not None else pattern_name(adapter, module)
        s = adapter.config.scale_for(name)
        shape_rank = adapter.shapes[module.a_key][0]
        if name != module.name and shape_rank % s.r == 0:  # a target_parameters wrapper: rank * experts rows
            shape_rank = s.r
        entry = ModuleEntry(module, name, shape_rank, s)
        if check_ranks and shape_rank != s.r:
            raise MismatchError(f"{adapter.weights_path}: {rank_mismatch(entry)}")
        entries.append(entry)
    return entries


def rank_mismatch(entry: ModuleEntry) -> str:
    """The message for a module whose saved rank is not the rank the config gives it."""
    source = f"rank_pattern key {entry.scale.rank_key!r}" if entry.scale.rank_key is not None else "'r'"
    return (
        f"module {entry.module.name!r}: the config gives rank {entry.scale.r} (from {source}) but the saved "
        f"tensors have rank {entry.shape_rank}; the config does not belong to these weights (PEFT cannot load it)"
    )


def target_parameters_of(config: AdapterConfig, module_name: str, own: Collection[str] | None = None) -> list[str]:
    """The `<module>.<param>` names `target_parameters` gives this module, as PEFT matches them: each of the module's
    own parameters (`own`, from the base model; without one, any name a target ends in) as `<module>.<param>`,
    matched when it equals a target or ends with `.<target>`; each name once."""
    names: list[str] = []
    for target in config.target_parameters:
        leaf = target.rsplit(".", 1)[-1]
        full = f"{module_name}.{leaf}"
        if (own is None or leaf in own) and (full == target or full.endswith("." + target)) and full not in names:
            names.append(full)
    return names


def wraps_parameters(config: AdapterConfig, module: LoraModule, own: Collection[str] | None) -> bool:
    """Whether PEFT wrapped this module's parameters (a ParamWrapper, `target_parameters`) rather than the module."""
    if not config.target_parameters or module.mha_parent is not None:
        return False
    if module.depth > 0:
        return True
    if own is None and config.targets_module(module.name):
        return False
    return bool(target_parameters_of(config, module.name, own))


def pattern_name(
    adapter: Adapter,
    module: LoraModule,
    fits: Callable[[str], bool] | None = None,
    own: Collection[str] | None = None,
    order: Sequence[str] | None = None,
) -> str:
    """The name PEFT matches this module's rank/alpha patterns against.

    A MultiheadAttention's out_proj uses the MHA's name; a target_parameters wrapper uses
    `<module>.<param>`, for the parameter it holds (`own`: the module's own parameters in the base, when there is
    one). When a module wraps several parameters (nested wrappers), PEFT wraps them in the order the module
    registers them (`order`, from transformers' model, when known): the first is the innermost, under the most
    `base_layer`s. Without it, `fits` (a base model's shapes) keeps the parameters whose base tensor fits this
    wrapper's tensors; among those still left, the nesting decides.
    """
    if module.mha_parent is not None:
        return module.mha_parent
    if not wraps_parameters(adapter.config, module, own):
        return module.name
    params = target_parameters_of(adapter.config, module.name, own)
    depths = sum(1 for (name, _) in adapter.modules if name == module.name)
    if own is None and len(params) > depths:
        params = _most_specific(adapter.config, module.name, params, depths)
    if order is not None and len(params) > 1:
        wrapped = [f"{module.name}.{p}" for p in order if f"{module.name}.{p}" in params]
        if len(wrapped) == depths == len(params):
            return wrapped[depths - 1 - module.depth]
    if fits is not None and len(params) > 1:
        params = [p for p in params if fits(p)] or params  # no fit at all: the caller reports the module as unmatched
    if not params:
        return module.name
    if len(params) == 1:
        return params[0]
    return _nested_parameter(adapter, module, params)


def _most_specific(config: AdapterConfig, module_name: str, params: list[str], depths: int) -> list[str]:
    """Without a base model to say which parameters a module holds, the names matched by the most specific targets
    (`gate.weight` over a bare `down_proj`, which PEFT's transformers-5 remap writes for fused experts), when as many
    of them are left as the module has wrappers; else all of them."""

    def parts(param: str) -> int:
        return max(t.count(".") + 1 for t in config.target_parameters if param == t or param.endswith("." + t))

    best = max(parts(p) for p in params)
    kept = [p for p in params if parts(p) == best]
    return kept if len(kept) == depths else params


def _nested_parameter(adapter: Adapter, module: LoraModule, params: list[str]) -> str:
    """Which of several target parameters a nested ParamWrapper (`module.depth`) holds.

    Each wrapper's A has rank * experts rows, with one expert count for the whole module. Among
    the assignments of parameters to nesting depths, keep those where one expert count fits every
    depth; the answer is known when all of them give this depth the same rank and alpha.
    """
    cfg = adapter.config
    depths = sorted(d for (name, d) in adapter.modules if name == module.name)
    rows = {d: adapter.shapes[adapter.modules[(module.name, d)].a_key][0] for d in depths}
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


@dataclass(frozen=True)
class PatternWarning:
    code: Literal["unmatched-pattern", "order-dependent"]
    message: str


def pattern_warnings(config: AdapterConfig, names: list[str]) -> list[PatternWarning]:
    """Pattern keys that match no module, and modules matched by several keys with different values."""
    found = []
    for field_name, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        hits = {n: matching_keys(pattern, n) for n in names}  # one indexed lookup per module
        matched = {k for keys in hits.values() for k in keys}
        for key in pattern:
            if key not in matched:
                found.append(
                    PatternWarning(
                        "unmatched-pattern",
                        f"{field_name} key {key!r} matches no module of the adapter (typo, or a "
                        "leading '^' that needs the full module name?)",
                    )
                )
        for n, keys in hits.items():
            if len({pattern[k] for k in keys}) > 1:
                values = ", ".join(f"{k!r}: {pattern[k]}" for k in keys)
                found.append(
                    PatternWarning(
                        "order-dependent",
                        f"module {n!r} is matched by several {field_name} keys with different "
                        f"values ({values}); PEFT takes the first in file order ({keys[0]!r}), and "
                        "saving sorts the keys, so the value can change between training and loading",
                    )
                )
    return found
