"""The factors of one combined module (`combine`), with torch.

`cat` stacks the inputs' factors with `weight * scale` on A (A * weight * scale, as PEFT's
add_weighted_adapter does); its B @ A is the weighted sum of the inputs' deltas. `svd` takes the
best rank-R approximation of that sum from the stacked factors (QR of both sides, then the SVD of
the small core, in float64): the SVD of the delta itself, without forming it. The task-arithmetic
methods are PEFT's (`utils/merge_utils.py`, peft 0.21.2), applied to A and B separately with
weights sqrt(|w*s|) (the sign on A); their random masks come from a generator seeded per module
(`seed` and the module's name), so a result does not depend on the order modules are visited.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch

from ..plan.combine import CombinedModule

Reader = Callable[[int, str], torch.Tensor]  # (adapter index, key) -> tensor as saved


def combine_module(
    m: CombinedModule, read: Reader, method: str, density: float | None = None, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(A, B) of the combined module in float32, and measures (svd: retained energy, relative error)."""
    factors = [
        (read(p.adapter, p.module.a_key).float(), read(p.adapter, p.module.b_key).float(), p.factor) for p in m.parts
    ]
    if method == "cat":  # A * weight * scale, in PEFT's order
        return (
            torch.cat([a * p.weight * p.scale for (a, _, _), p in zip(factors, m.parts)], dim=0).contiguous(),
            torch.cat([b for _, b, _ in factors], dim=1).contiguous(),
            {},
        )
    if method == "svd":
        return svd_of_sum(factors, m.rank)
    generator = torch.Generator().manual_seed(module_seed(seed or 0, m.name))
    weights_a = torch.tensor([math.sqrt(abs(f)) * (1 if f >= 0 else -1) for _, _, f in factors])
    weights_b = torch.tensor([math.sqrt(abs(f)) for _, _, f in factors])
    a = _merge([a for a, _, _ in factors], weights_a, method, density, generator)
    b = _merge([b for _, b, _ in factors], weights_b, method, density, generator)
    return a.contiguous(), b.contiguous(), {}


def svd_of_sum(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The best rank-`rank` approximation of sum(f * B @ A): B' = U S, A' = V^T (as PEFT's svd), and how much of the
    sum's squared Frobenius norm it keeps."""
    b = torch.cat([bb.double() * f for _, bb, f in factors], dim=1)  # (out, K)
    a = torch.cat([aa.double() for aa, _, _ in factors], dim=0)  # (K, in)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    total = float((s * s).sum())
    kept = float((s[:rank] * s[:rank]).sum())
    new_b = (qb @ u[:, :rank]) * s[:rank]
    new_a = vh[:rank] @ qa.T
    energy = kept / total if total > 0 else 1.0
    return (
        new_a.float().contiguous(),
        new_b.float().contiguous(),
        {"energy": energy, "relative_error": math.sqrt(max(0.0, 1.0 - energy))},
    )


def module_seed(seed: int, name: str) -> int:
    """A generator seed for one module: the same for the same --seed and module, whatever else is combined."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _merge(
    tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None, generator: torch.Generator
) -> torch.Tensor:
    if method in ("magnitude_prune", "ties"):
        assert density is not None
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        assert density is not None
        tensors = [_prune_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        sign = stacked.sign()
        majority = torch.where(stacked.sum(dim=0) >= 0, 1, -1)
        mask = sign == majority
        return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return weighted.sum(dim=0)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's magnitude pruning: keep the int(density * n) largest |values|."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """PEFT's DARE pruning: keep each value with probability density, rescaled by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density
