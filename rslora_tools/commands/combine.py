"""`combine`, one PEFT adapter out of several (docs/combining.md).

Plans the output (plan/combine.py), then computes it module by module (compute/combine.py),
writing each module's factors at their place in a preallocated safetensors file, so memory holds
one module's working set. The folder is written atomically; with `target`, the combined adapter
goes through `convert --target` (commands/convert.py) before it replaces OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..adapter.adapter import Adapter
from ..adapter.load import load_adapter
from ..compute.finite import check_finite
from ..errors import OptionError
from ..formats.output import check_output_location, writing
from ..plan.combine import CombinePlan, plan_combination
from ..reporting import ProgressCallback, Report, counted, worst_error
from .common import (
    AdapterSpec,
    adapter_input,
    check_push,
    lora_only,
    publish,
    with_fields,
)

if TYPE_CHECKING:
    from ..execute.converted import ConvertReport
from ..adapter.writer import AdapterWriter
from ..formats.provenance import write_provenance
from .options import CombineOptions, ConvertOptions


@dataclass
class CombineReport(Report):
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
    push: dict[str, Any] | None = None  # the push of OUT when one was asked

    @property
    def worst_error(self) -> float | None:
        return worst_error(self.modules)


def combine(
    adapters: Sequence[AdapterSpec],
    out: str | os.PathLike[str],
    *,
    options: CombineOptions | None = None,
    progress: ProgressCallback | None = None,
    **fields: Any,
) -> CombineReport:
    """Combine several LoRA adapters into one PEFT adapter in OUT.

    Args:
        adapters: the adapters (folders, Hub repos or loaded `Adapter`s), in order.
        out: the output folder (written atomically).
        options: a `CombineOptions`; keyword arguments are taken as its fields (`method="svd"`, `rank=16`).
        progress: called as `progress(bytes_done_now, total_bytes)` as modules are written.

    Returns:
        A `CombineReport`: each module's rank (and, for svd, the energy kept and the relative error).
    """
    started = time.monotonic()
    options = with_fields(options, CombineOptions, fields)
    if not adapters:
        raise OptionError("combine needs at least one adapter")
    if options.weights is not None and len(options.weights) != len(adapters):
        raise OptionError(
            f"[[weights]] has {counted(len(options.weights), 'weight')} for {counted(len(adapters), 'adapter')}"
        )
    resolved = [adapter_input(a, token=options.token, allow_pickle=options.allow_pickle) for a in adapters]
    sources = [source for _, source in resolved]
    check_push(options, {"adapters": sources})
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=options.allow_pickle) for a, _ in resolved]
    lora_only(loaded, "combine")
    weights = list(options.weights) if options.weights is not None else [1.0] * len(loaded)
    plan = plan_combination(
        loaded,
        weights,
        options.method,
        rank=options.rank,
        density=options.density,
        seed=options.seed,
        rslora=options.rslora,
    )
    out = Path(out)
    written = check_output_location(out, [a.path for a in loaded], options.overwrite, writes_adapter=True)
    report = _report(loaded, out, plan, options.rslora, options.target, options.dry_run)
    if options.dry_run:
        return report
    if not options.allow_nonfinite:
        for adapter in loaded:
            check_finite(adapter)
    if options.target is None:
        with writing(out, written, overwrite=options.overwrite, what="combining", warnings=report.warnings) as tmp:
            _write(loaded, plan, tmp, report, progress, sources, options.allow_nonfinite)
        pushed = publish(out, options)
        report.push = pushed.to_dict() if pushed is not None else None
    else:
        converted = _write_for_target(loaded, plan, written, report, progress, sources, options)
        report.converted, report.push = converted.to_dict(), converted.push
    report.seconds = time.monotonic() - started
    return report


def _report(
    loaded: list[Adapter], out: Path, plan: CombinePlan, rslora: bool, target: str | None, dry_run: bool
) -> CombineReport:
    modules = [
        {
            "name": m.name,
            "rank": m.rank,
            "inputs": [p.adapter for p in m.parts],
            "input_ranks": [p.rank for p in m.parts],
            "energy": None,
            "relative_error": None,
        }
        for m in plan.modules
    ]
    ranks = [m.rank for m in plan.modules]
    return CombineReport(
        [str(a.path) for a in loaded],
        str(out),
        plan.method,
        plan.weights,
        "rslora" if rslora else "classic",
        modules,
        min(ranks),
        max(ranks),
        plan.nbytes,
        plan.density,
        plan.seed,
        target,
        warnings=list(plan.warnings),
        dry_run=dry_run,
    )


def _write(
    loaded: list[Adapter],
    plan: CombinePlan,
    tmp: Path,
    report: CombineReport,
    progress: ProgressCallback | None,
    sources: list[dict[str, Any]],
    allow_nonfinite: bool,
) -> None:
    from ..compute.combine import combine_module

    entries = [(k, "F32", shape) for m in plan.modules for k, shape in ((m.a_key, m.a_shape), (m.b_key, m.b_shape))]
    entries += [(key, loaded[i].dtypes[key], loaded[i].shapes[key]) for key, i in plan.saved.items()]
    metadata = {
        "format": "pt",
        "rslora_tools.combine": json.dumps(
            {"tool": f"rslora-tools {__version__}", "method": plan.method, "weights": plan.weights}, sort_keys=True
        ),
    }
    with AdapterWriter(tmp, plan.config, entries, metadata, allow_nonfinite=allow_nonfinite) as writer:
        for m, row in zip(plan.modules, report.modules):
            a, b, measures = combine_module(
                m, lambda i, key: loaded[i].tensor(key), plan.method, plan.density, plan.seed
            )
            writer.write(m.a_key, a)
            writer.write(m.b_key, b)
            row.update(measures)
            if progress is not None:
                progress(4 * (a.numel() + b.numel()), plan.nbytes)
        for key, i in plan.saved.items():
            writer.write(key, loaded[i].tensor(key))
    write_provenance(
        tmp,
        {
            "operation": "combine",
            "adapters": sources or [{"spec": str(a.path)} for a in loaded],
            "method": plan.method,
            "weights": plan.weights,
            "density": plan.density,
            "seed": plan.seed,
            "convention": report.convention,
            "base_model": loaded[0].config.base_model_name_or_path,
            "revision": loaded[0].config.revision,
        },
    )


def _write_for_target(
    loaded: list[Adapter],
    plan: CombinePlan,
    written: Path,
    report: CombineReport,
    progress: ProgressCallback | None,
    sources: list[dict[str, Any]],
    options: CombineOptions,
) -> ConvertReport:
    """Combine into a scratch folder beside OUT, then convert it for the runtime into OUT (and push it when asked)."""
    from .convert import convert_adapter

    scratch = Path(tempfile.mkdtemp(prefix="rslora-tools-combine-"))
    try:
        _write(loaded, plan, scratch, report, progress, sources, options.allow_nonfinite)
        combined_from = {"combined": sources, "method": plan.method, "weights": plan.weights}
        convert_options = ConvertOptions(
            target=options.target,
            overwrite=options.overwrite,
            allow_nonfinite=options.allow_nonfinite,
            token=options.token,
            push=options.push,
        )
        return convert_adapter(load_adapter(scratch), written, convert_options, combined_from)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
