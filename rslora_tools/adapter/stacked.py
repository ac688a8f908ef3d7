"""Several adapters read as one (a stacked merge): adapter i's tensors are named "<i>/<key>".

How their plans are folded into one is plan.tensors.stacking's job (docs/peft-rules.md, "Several adapters").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InputError
from ..reporting import counted
from .adapter import Adapter

if TYPE_CHECKING:
    import torch

_SEP = "/"


def namespaced_key(index: int, key: str) -> str:
    return f"{index}{_SEP}{key}"


@dataclass
class StackedAdapter(Adapter):
    """Several adapters read as one: keys "<i>/<key>" name adapter i's tensors; config, path: the first adapter's."""

    members: list[Adapter] = field(default_factory=list)
    member_weights: list[float] = field(default_factory=list)

    @property
    def parts(self) -> list[Adapter]:
        return self.members

    @property
    def weights(self) -> list[float]:
        return self.member_weights

    @property
    def stacked(self) -> bool:
        return True

    @property
    def on_disk(self) -> bool:
        return False

    @property
    def single_file(self) -> bool:
        return False

    @property
    def sources(self) -> list[Adapter]:
        return [source for part in self.parts for source in part.sources]

    def _split(self, key: str) -> tuple[Adapter, str]:
        index, _, own = key.partition(_SEP)
        return self.parts[int(index)], own

    def tensor(self, key: str) -> torch.Tensor:
        part, own = self._split(key)
        return part.tensor(own)

    def tensor_bytes(self, key: str) -> bytearray:
        part, own = self._split(key)
        return part.tensor_bytes(own)


def stack_adapters(adapters: list[Adapter], weights: list[float] | None = None) -> StackedAdapter:
    """The adapters as one StackedAdapter (weights: each adapter's delta multiplied, as PEFT's set_scale does; one
    adapter with a weight is a stack of one)."""
    if not adapters:
        raise InputError("a merge needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InputError(f"[[weights]] has {counted(len(weights), 'value')} for {counted(len(adapters), 'adapter')}")
    if not all(math.isfinite(w) for w in weights):
        raise InputError("[[weights]] must be finite numbers")
    shapes = {namespaced_key(i, k): v for i, a in enumerate(adapters) for k, v in a.shapes.items()}
    dtypes = {namespaced_key(i, k): v for i, a in enumerate(adapters) for k, v in a.dtypes.items()}
    first = adapters[0]
    return StackedAdapter(
        first.path,
        first.weights_path,
        first.config,
        shapes,
        dtypes,
        _header=first._header,
        members=list(adapters),
        member_weights=weights,
    )
