"""A low-rank factorisation of one weight's delta, for `extract` (docs/extraction.md).

`factorize(delta, rank=, energy=, max_error=)` returns B (out, k) and A (k, in) with B @ A the
delta's best rank-k approximation found, and the measures of what it keeps. The SVD is exact
(torch.linalg.svd) for small matrices, else randomized (Halko, Martinsson and Tropp 2011) with
`OVERSAMPLE` extra columns and `POWER_ITERATIONS` power iterations, in float32 with QR
re-orthonormalisation between iterations. Either way the factors are the projection of the
delta onto the subspace found: ||delta - B @ A||_F^2 = ||delta||_F^2 - sum(s_i^2, i <= k), and
the singular values found are lower bounds of the true ones, so a rank chosen for an energy or
an error meets it (to float32 rounding; it may be larger than the smallest rank that would).
The residual reported is measured on the factors written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

OVERSAMPLE = 8
POWER_ITERATIONS = 4
_EXACT_BELOW = 512  # min(out, in) at or below which the full SVD is cheap enough


@dataclass
class Factors:
    b: torch.Tensor  # (out, k) float32, sqrt(S) folded in
    a: torch.Tensor  # (k, in) float32, sqrt(S) folded in
    rank: int
    energy: float  # ||B @ A||^2 / ||delta||^2: the fraction of the delta's squared Frobenius norm kept
    relative_error: float  # ||delta - B @ A|| / ||delta||
    method: str  # "exact" or "randomized (q, iterations)"


def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    exact: bool = False,
) -> Factors:
    """Factor `delta` (float32, 2-D) at a fixed rank, or at the smallest rank keeping `energy` of its squared norm, or
    with a relative error at most `max_error`."""
    rows, cols = delta.shape
    full = min(rows, cols)
    total = float(delta.double().pow(2).sum())
    if total == 0.0:
        return Factors(delta.new_zeros(rows, 1), delta.new_zeros(1, cols), 1, 1.0, 0.0, "zero")
    target = _target_energy(energy, max_error)
    guess = min(full, rank if rank is not None else 16)
    while True:
        q = min(full, guess + OVERSAMPLE)
        use_exact = exact or full <= _EXACT_BELOW or q >= full // 2
        u, s, vh = _svd(delta, q, use_exact)
        captured = torch.cumsum(s.double() ** 2, 0) / total
        if rank is not None:
            k = min(rank, len(s))
            break
        reached = (captured >= target).nonzero()
        if len(reached):
            k = int(reached[0]) + 1
            break
        if use_exact:  # all of it, and still short: rounding; keep everything
            k = len(s)
            break
        guess *= 4
    root = s[:k].sqrt()
    b, a = (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous()
    error = math.sqrt(float((delta - b @ a).double().pow(2).sum()) / total)  # measured, not inferred from S
    method = "exact" if use_exact else f"randomized (q={q}, {POWER_ITERATIONS} power iterations)"
    return Factors(b, a, k, max(0.0, 1.0 - error * error), error, method)


def _target_energy(energy: float | None, max_error: float | None) -> float:
    if energy is not None:
        return energy
    if max_error is not None:
        return 1.0 - max_error * max_error
    return 1.0


def _svd(delta: torch.Tensor, q: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T: the full SVD, or the randomized one with q columns."""
    if exact:
        return torch.linalg.svd(delta, full_matrices=False)
    generator = torch.Generator(device=delta.device).manual_seed(0)
    omega = torch.randn(delta.shape[1], q, generator=generator, device=delta.device, dtype=delta.dtype)
    basis, _ = torch.linalg.qr(delta @ omega)
    for _ in range(POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(delta.T @ basis)
        basis, _ = torch.linalg.qr(delta @ basis)
    small_u, s, vh = torch.linalg.svd(basis.T @ delta, full_matrices=False)
    return basis @ small_u, s, vh
