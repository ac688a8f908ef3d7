"""A merge made ready to write, whatever its OUT: its inputs resolved, its plan lowered, its report so far, and
the pieces every writer shares (the files beside the shards, the inputs checked finite, the quantization measured).

commands/merge.py resolves the inputs (`MergeInputs`); each writer of execute/outputs.py prepares
them (`prepare_merge`: plan and lower, headers and configs only) and writes, so that a folder, a
GGUF file and a Hub stream are made of the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.relative import variant_name
from ..compute.finite import check_finite
from ..compute.quant_stats import (
    each_requantization,
    measurable_weights,
    measured_quantization,
    sample_quantization,
)
from ..formats.checkpoint import Checkpoint, copy_side_files, side_files, write_index
from ..formats.provenance import write_provenance
from ..formats.safetensors_file import FLOAT_DTYPES
from ..hub.resolve import Source
from ..plan.merge import plan_merge
from ..plan.tensors import Plan
from ..reporting import Report
from .lowering import Device, Lowered, StepKind, estimate_memory, lower
from .options import MergeOptions


@dataclass
class MergeReport(Report):
    """What a merge did; `to_dict()` is what `--json` prints."""

    base: str
    adapter: str
    out: str
    convention: str
    modules: int
    tensors_merged: int
    tensors_copied: int
    tensors_total: int
    scale_min: float | None
    scale_max: float | None
    shards: list[str]
    bytes_written: int
    dtype: str
    device: str
    seconds: float
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    changes: list[dict[str, Any]] = field(default_factory=list)  # what happens to each changed tensor
    unmatched: list[str] = field(default_factory=list)  # adapter tensors that match nothing (dry run)
    memory_bytes: int = 0  # estimated peak memory of the merge
    free_bytes: int | None = None  # free disk space where OUT goes
    verify: dict[str, Any] | None = None  # the verification of the fresh output (--verify)
    quantization: dict[str, Any] | None = None  # a quantized base dequantized, or --trained-on: scheme and measures
    adapters: list[str] = field(default_factory=list)  # every adapter merged, in order (several: a stacked merge)
    weights: list[float] = field(default_factory=list)  # each adapter's weight (its delta multiplied)
    push: dict[str, Any] | None = None  # the push of OUT when one was asked (hub.push.PushReport)
    gguf: dict[str, Any] | None = (
        None  # an OUT.gguf: outtype, the llama.cpp used, the next step (execute/gguf_writer.py)
    )


@dataclass
class MergeInputs:
    """BASE and the adapter(s) of a merge, resolved: the base folder, the adapter to read, and their provenance."""

    base: Path
    adapter: Adapter
    sources: dict[str, Any]
    warnings: list[str]
    base_source: Source | None = None


@dataclass
class PreparedMerge:
    """A merge planned and lowered, with its report so far: what each writer of execute/outputs.py executes."""

    checkpoint: Checkpoint
    adapter: Adapter
    plan: Plan
    lowered: Lowered
    report: MergeReport
    sources: dict[str, Any]  # where BASE and the adapters came from (the provenance record)


def prepare_merge(base: Path | Checkpoint, inputs: MergeInputs, out: Path, options: MergeOptions) -> PreparedMerge:
    """Open, plan and lower a merge (headers and configs only); `out` is only named in the report."""
    checkpoint, adapter, plan = plan_merge(
        base,
        inputs.adapter,
        dtype=options.dtype,
        max_shard_size=options.max_shard_size,
        allow_pickle=options.allow_pickle,
        collect_unmatched=options.dry_run,
        trained_on=options.trained_on,
        base_is_residual=options.base_is_residual,
        keep_quantization=options.keep_quantization,
    )
    if adapter.relative_form is not None:
        plan.notes.append(
            f"{variant_name(adapter.trained_adapter)} adapter made relative to the original "
            f"base with INIT {options.initial}: {adapter.relative_form}"
        )
    lowered = lower(plan, checkpoint, adapter, Device(options.device))
    report = _report(checkpoint, adapter, plan, lowered, out, options)
    report.warnings = inputs.warnings + report.warnings
    for folder in (checkpoint.folder, *(a.path for a in adapter.sources)):
        side_files(folder)  # the link rule, before anything is written (a dry run says it too)
    return PreparedMerge(checkpoint, adapter, plan, lowered, report, inputs.sources)


def measure_sample(prepared: PreparedMerge) -> None:
    """A dry run (and a merge that does not measure as it goes): the quantization error measured on a sample of the
    weights (compute/quant_stats.py)."""
    report, plan = prepared.report, prepared.plan
    if report.quantization is not None and "measured" in report.quantization:
        report.quantization["measured"] = measured_quantization(
            sample_quantization(plan, prepared.checkpoint, prepared.adapter), measurable_weights(plan)
        )


def check_inputs_finite(adapter: Adapter, options: MergeOptions) -> None:
    if not options.allow_nonfinite:
        for source in adapter.sources:
            check_finite(source)


def record_measures(
    prepared: PreparedMerge, measures: dict[str, tuple[float, float, float]], *, sample: bool = True
) -> None:
    """The quantization error the executor measured (--trained-on, --keep-quantization, a block-scaled FP8 base
    through the kernel) into the report; otherwise a dequantized base's is measured on a sample after the merge."""
    quantization, plan = prepared.report.quantization, prepared.plan
    if quantization is None or "measured" not in quantization:
        return
    if plan.prequantized and not plan.keep_quantization and not measures:  # the kernel measures FP8 as it merges
        if sample:  # (`sample` False: a streamed merge, whose base shards are gone)
            measure_sample(prepared)
        return
    quantization["measured"] = measured_quantization(measures, measurable_weights(plan))
    if plan.keep_quantization:
        quantization["requantized"] = each_requantization(measures)


def write_extras(folder: Path, prepared: PreparedMerge, options: MergeOptions) -> None:
    """Everything of a merged model but its shards: the index, config and side files, provenance."""
    checkpoint, adapter, plan, report = prepared.checkpoint, prepared.adapter, prepared.plan, prepared.report
    if plan.index_metadata is not None:
        shards = [(name, [(t.name, t.dtype, t.shape) for t in tensors]) for name, tensors in plan.shards]
        write_index(folder, shards, plan.index_metadata)
    copy_side_files(checkpoint.folder, adapter.path, folder, plan.config_updates)
    sources = prepared.sources
    write_provenance(
        folder,
        {
            "operation": "merge",
            "base": sources.get("base") or {"spec": str(checkpoint.folder)},
            "adapter": sources.get("adapter") or {"spec": str(adapter.path)},
            **(
                {
                    "adapters": sources.get("adapters") or [{"spec": str(p.path)} for p in adapter.parts],
                    "weights": list(adapter.weights),
                }
                if adapter.stacked
                else {}
            ),
            "convention": report.convention,
            "modules": report.modules,
            "scale_min": report.scale_min,
            "scale_max": report.scale_max,
            "dtype": report.dtype,
            **({"quantization": report.quantization} if report.quantization else {}),
            **({"initial": sources.get("initial") or {"spec": options.initial}} if options.initial else {}),
            **({"base_is_residual": True} if options.base_is_residual else {}),
        },
    )


def _report(
    checkpoint: Checkpoint, adapter: Adapter, plan: Plan, lowered: Lowered, out: Path, options: MergeOptions
) -> MergeReport:
    steps = lowered.steps
    scales = [op.scale.scale for op in plan.lora_ops]
    return MergeReport(
        base=str(checkpoint.folder),
        adapter=str(adapter.path),
        out=str(out),
        convention=",".join(dict.fromkeys(p.config.convention for p in adapter.parts)),
        adapters=[str(p.path) for p in adapter.parts],
        weights=list(adapter.weights),
        modules=len({op.module.keys[0] for op in plan.lora_ops}),  # an expert module over several tensors: once
        tensors_merged=sum(not s.tensor.untouched or s.tensor.written_with is not None for s in steps),
        tensors_copied=sum(s.kind is StepKind.COPY_BASE for s in steps),
        tensors_total=len(steps),
        scale_min=min(scales) if scales else None,
        scale_max=max(scales) if scales else None,
        shards=[name for name, _ in plan.shards],
        bytes_written=sum(s.nbytes for s in steps),
        dtype=",".join(sorted({s.tensor.dtype for s in steps if s.tensor.dtype in FLOAT_DTYPES})),
        device=lowered.device_name,
        seconds=0.0,
        config_updates=plan.config_updates,
        notes=plan.notes,
        warnings=plan.warnings,
        dry_run=options.dry_run,
        changes=_changes(lowered),
        unmatched=plan.unmatched,
        memory_bytes=estimate_memory(lowered, adapter),
        quantization=_quantization(plan, checkpoint, adapter),
    )


def _quantization(plan: Plan, checkpoint: Checkpoint, adapter: Adapter) -> dict[str, Any] | None:
    scheme = plan.quantization
    if scheme is None:
        return None
    quantized = [t for t in plan.tensors if t.quant is not None]
    mode = "kept" if plan.keep_quantization else "dequantized" if plan.prequantized else "as trained"
    summary = {
        "mode": mode,
        "scheme": scheme.label,
        "method": scheme.method,
        "blocksize": scheme.blocksize,
        "double_quant": scheme.double_quant,
        "weights": len(quantized),
        "merged_dtypes": sorted({t.quant.keep.dtype if t.quant.keep else t.dtype for t in quantized if t.quant}),
        "skip_modules": list(scheme.skip_modules) if scheme.skip_modules is not None else None,
    }
    if not plan.prequantized or measurable_weights(plan):
        # after the merge (or by a dry run's sample): measured_quantization. A quantized base: how far quantizing the
        # merged weights back moves them (what --keep-quantization loses of the delta)
        summary["measured"] = None
        summary["measure"] = (
            "requantization of the merged weights" if plan.prequantized else "quantization of the base weights"
        )
    return summary


def _changes(lowered: Lowered) -> list[dict[str, Any]]:
    """Each changed tensor: how it changes, the module and scale, and what produces it (`by`)."""
    changes = []
    for step in lowered.steps:
        t = step.tensor
        if t.untouched:
            continue
        how = []
        if t.quant is not None:
            how.append(
                f"quantized as trained ({t.quant.scheme.method})"
                if t.quant.simulated
                else f"dequantized and quantized back ({t.quant.scheme.method})"
                if t.quant.keep
                else f"dequantized ({t.quant.scheme.method})"
            )
        if t.replacement is not None:
            how.append(f"replaced by adapter tensor {t.replacement}")
        for each in t.all_lora:
            how.append(
                ("DoRA" if each.dora else "LoRA")
                + f" ({each.kind})"
                + (f" at scale {each.scale.scale:g}" if t.stacked else "")
            )
        if t.bias_of is not None or any(p.bias_of is not None for p in t.stacked):
            how.append("lora_bias")
        if t.tokens is not None:
            how.append(f"{len(t.tokens[1])} trainable token rows")
        op = t.lora or t.bias_of
        changes.append(
            {
                "tensor": t.name,
                "how": ", ".join(how),
                "module": op.module.name if op is not None else None,
                "scale": op.scale.scale if op is not None else None,
                "rank": op.scale.r if op is not None else None,
                "alpha": op.scale.alpha if op is not None else None,
                "by": step.kind.value,
            }
        )
    return changes
