"""Stage 6, commands: `combine`, one PEFT adapter out of several (docs/combining.md).

Plans the output (combination.py), then computes it module by module (task_arithmetic.py),
writing each module's factors at their place in a preallocated safetensors file, so memory holds
one module's working set. The folder is written atomically; with `target`, the combined adapter
goes through `convert --target` (conversion.py) before it replaces OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .adapter import Adapter, load_adapter
from .combination import CombinePlan, plan_combination
from .errors import InputError
from .finite import check_finite
from .output import atomic_folder, check_output_location, remove_leftovers, write_failure
from .provenance import write_provenance
from .runtimes import runtime
from .adapter_writer import AdapterWriter

ProgressCallback = Callable[[int, int], None]


@dataclass
class CombineReport:
    """What `combine` did (or would do); `to_dict()` is what `--json` prints."""

    adapters: list[str]
    out: str
    method: str
    weights: list[float]
    convention: str  # the output's: classic (alpha = rank) or rslora (alpha = sqrt(rank)), scale 1 everywhere
    modules: list[dict[str, Any]]  # per module: name, rank, inputs, and for svd energy and relative_error
    rank_min: int
    rank_max: int
    bytes: int
    density: float | None = None
    seed: int | None = None
    target: str | None = None
    converted: dict[str, Any] | None = None  # the convert report, with target
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def worst_error(self) -> float | None:
        errors = [m["relative_error"] for m in self.modules if m.get("relative_error") is not None]
        return max(errors) if errors else None


def combine(
    adapters: Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    rslora: bool = False,
    target: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    progress: ProgressCallback | None = None,
    sources: list[dict[str, Any]] | None = None,
) -> CombineReport:
    """Combine several LoRA adapters into one PEFT adapter in OUT.

    Args:
        adapters: adapter folders (or loaded `Adapter`s), in order.
        out: the output folder (written atomically).
        weights: one per adapter (default 1 each): the output's delta is sum(w_i * delta_i) for cat and svd.
        method: cat (exact sum, rank = sum of ranks), svd (best rank-R approximation of the sum), or PEFT's
            task-arithmetic methods on the factors: linear, ties, dare_linear, dare_ties, magnitude_prune.
        rank: svd's rank R (default: the largest input rank).
        density: the fraction of values kept (ties, dare_*, magnitude_prune).
        seed: dare's random masks (a generator per module, seeded from this and the module's name).
        rslora: write the rsLoRA convention (alpha = sqrt(rank)) instead of classic (alpha = rank); scale 1 either way.
        target: then convert for this runtime (`convert --target`), in the same run.
        overwrite, dry_run, allow_pickle, allow_nonfinite, progress: as for `convert` and `merge`.
        sources: where each adapter came from (hub.Source dicts), for the provenance file.

    Returns:
        A `CombineReport`: each module's rank (and, for svd, the energy kept and the relative error).
    """
    started = time.monotonic()
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=allow_pickle) for a in adapters]
    if len(loaded) < 1:
        raise InputError("combine needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * len(loaded)
    plan = plan_combination(loaded, weights, method, rank=rank, density=density, seed=seed, rslora=rslora)
    if target is not None and target != "unit":
        runtime(target)  # an unknown runtime is refused before anything is computed
    out = Path(out)
    written = check_output_location(out, [a.path for a in loaded], overwrite)
    report = _report(loaded, out, plan, rslora, target, dry_run)
    if dry_run:
        return report
    if not allow_nonfinite:
        for adapter in loaded:
            check_finite(adapter)
    report.warnings += [f"removed {name}, left beside OUT by an earlier run that was killed"
                        for name in remove_leftovers(written)]
    try:
        if target is None:
            with atomic_folder(written, overwrite) as tmp:
                _write(loaded, plan, tmp, report, progress, sources, allow_nonfinite)
        else:
            report.converted = _write_for_target(loaded, plan, written, report, progress, sources, target, overwrite,
                                                 allow_nonfinite)
    except OSError as e:
        raise write_failure(out, e, "combining") from e
    report.seconds = time.monotonic() - started
    return report


def _report(loaded: list[Adapter], out: Path, plan: CombinePlan, rslora: bool, target: str | None,
            dry_run: bool) -> CombineReport:
    modules = [{"name": m.name, "rank": m.rank, "inputs": [p.adapter for p in m.parts],
                "input_ranks": [p.rank for p in m.parts], "energy": None, "relative_error": None}
               for m in plan.modules]
    ranks = [m.rank for m in plan.modules]
    return CombineReport([str(a.path) for a in loaded], str(out), plan.method, plan.weights,
                         "rslora" if rslora else "classic", modules, min(ranks), max(ranks), plan.nbytes,
                         plan.density, plan.seed, target, warnings=list(plan.warnings), dry_run=dry_run)


def _write(loaded: list[Adapter], plan: CombinePlan, tmp: Path, report: CombineReport,
           progress: ProgressCallback | None, sources: list[dict[str, Any]] | None, allow_nonfinite: bool) -> None:
    from .task_arithmetic import combine_module

    entries = [(k, "F32", shape) for m in plan.modules for k, shape in ((m.a_key, m.a_shape), (m.b_key, m.b_shape))]
    entries += [(key, loaded[i].dtypes[key], loaded[i].shapes[key]) for key, i in plan.saved.items()]
    metadata = {"format": "pt", "rslora_tools.combine": json.dumps(
        {"tool": f"rslora-tools {__version__}", "method": plan.method, "weights": plan.weights}, sort_keys=True)}
    with AdapterWriter(tmp, plan.config, entries, metadata, allow_nonfinite=allow_nonfinite) as writer:
        for m, row in zip(plan.modules, report.modules):
            a, b, measures = combine_module(m, lambda i, key: loaded[i].tensor(key), plan.method, plan.density,
                                            plan.seed)
            writer.write(m.a_key, a)
            writer.write(m.b_key, b)
            row.update(measures)
            if progress is not None:
                progress(4 * (a.numel() + b.numel()), plan.nbytes)
        for key, i in plan.saved.items():
            writer.write(key, loaded[i].tensor(key))
    write_provenance(tmp, {
        "operation": "combine", "adapters": sources or [{"spec": str(a.path)} for a in loaded],
        "method": plan.method, "weights": plan.weights, "density": plan.density, "seed": plan.seed,
        "convention": report.convention, "base_model": loaded[0].config.base_model_name_or_path,
        "revision": loaded[0].config.revision,
    })


def _write_for_target(loaded: list[Adapter], plan: CombinePlan, written: Path, report: CombineReport,
                      progress: ProgressCallback | None, sources: list[dict[str, Any]] | None, target: str,
                      overwrite: bool, allow_nonfinite: bool) -> dict[str, Any]:
    """Combine into a scratch folder beside OUT, then convert it for the runtime into OUT."""
    from .conversion import convert

    scratch = Path(tempfile.mkdtemp(prefix="rslora-tools-combine-"))
    try:
        _write(loaded, plan, scratch, report, progress, sources, allow_nonfinite)
        combined_from = {"combined": sources or [{"spec": str(a.path)} for a in loaded], "method": plan.method,
                         "weights": plan.weights}
        converted = convert(scratch, written, target=target, overwrite=overwrite, source=combined_from,
                            allow_nonfinite=allow_nonfinite)
        return converted.to_dict()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
