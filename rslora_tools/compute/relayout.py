"""The tensors of an adapter rewritten into another layout (plan/relayout.py decides which), with torch.

Only slicing, concatenation and zero blocks: every value of the new adapter is a value of the old one (or 0), so
the rewrite is exact in any dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..plan.relayout import Recipe

Reader = Callable[[str], torch.Tensor]


def relayout_tensor(recipe: Recipe, read: Reader) -> torch.Tensor:
    """One tensor of the new adapter."""
    e, experts = recipe.expert, recipe.experts
    if recipe.op == "copy":
        return read(recipe.sources[0])
    if recipe.op == "expert_a":  # rows e*r .. (e+1)*r: expert-major
        a = read(recipe.sources[0])
        r = a.shape[0] // experts
        t = a[e * r : (e + 1) * r]
        return _ranks(t, recipe, dim=0).contiguous()
    if recipe.op == "expert_b":  # columns k*E + e: expert-minor
        b = read(recipe.sources[0])
        t = b.reshape(b.shape[0], -1, experts)[:, :, e]
        if recipe.rows is not None:
            t = t[slice(*recipe.rows)]
        return _ranks(t, recipe, dim=1).contiguous()
    if recipe.op == "fuse_a":
        return torch.cat([read(k) for k in recipe.sources], dim=0)
    if recipe.op == "fuse_b":
        per_expert = len(recipe.sources) // experts
        blocks = []
        for expert in range(experts):
            parts = [read(k) for k in recipe.sources[expert * per_expert : (expert + 1) * per_expert]]
            block = parts[0] if per_expert == 1 else torch.cat(parts) if recipe.shared else torch.block_diag(*parts)
            if recipe.interleaved and per_expert == 2:  # gate rows at even positions, up rows at odd ones
                half = parts[0].shape[0]
                mixed = torch.empty_like(block)
                mixed[0::2], mixed[1::2] = block[:half], block[half:]
                block = mixed
            blocks.append(block)
        return torch.stack(blocks, dim=2).reshape(blocks[0].shape[0], -1).contiguous()
    raise AssertionError(recipe.op)


def _ranks(t: torch.Tensor, recipe: Recipe, dim: int) -> torch.Tensor:
    if recipe.ranks is None:
        return t
    start, stop = recipe.ranks
    return t[start:stop] if dim == 0 else t[:, start:stop]


def same_a(a_keys: list[tuple[str, str]], read: Reader) -> bool:
    """Whether each (gate, up) pair of per-expert LoRAs has the same A (a fused adapter made per expert)."""
    return all(torch.equal(read(gate), read(up)) for gate, up in a_keys)


def block_diagonal(
    b: torch.Tensor, experts: int, gate_rows: tuple[int, int, int], up_rows: tuple[int, int, int]
) -> tuple[bool, bool]:
    """Whether a fused gate_up's B (out, r*E) is block-diagonal: gate rows zero in the rank's second half, up rows
    zero in its first half (an adapter fused from per-expert ones)."""
    b3 = b.reshape(b.shape[0], -1, experts)
    half = b3.shape[1] // 2
    if b3.shape[1] % 2:
        return False, False
    gate, up = b3[slice(*gate_rows)], b3[slice(*up_rows)]
    return bool((gate[:, half:] == 0).all()), bool((up[:, :half] == 0).all())
