"""Stage 6, commands: `merge`, the merge command: check inputs and OUT, plan, lower, execute, report.

The work itself happens in the stages before: planner.py decides what every output tensor
becomes, lowering.py how each is produced, executor.py writes the shards. This module checks
the output location and the free disk space, runs those stages inside an atomic output folder
(so a failure or Ctrl-C leaves nothing behind), adds the index, side files and provenance, and
reports what was done.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import Adapter, load_adapter
from .initial import RelativeAdapter, relative_to_original, variant_name
from .stacking import StackedAdapter, stack_adapters
from .checkpoint import Checkpoint, CheckpointFiles, copy_side_files, side_files, write_index
from .errors import InputError, MismatchError, OutputError
from .executor import ProgressCallback, execute
from .finite import check_finite
from .lowering import Device, Lowered, StepKind, estimate_memory, lower
from .output import atomic_folder, check_output_location, free_space, remove_leftovers, write_failure
from .plan import Plan, TensorPlan, parse_dtype
from .planner import plan_merge
from .quant_formats import QuantScheme, trained_on_scheme
from .provenance import write_provenance
from .safetensors_file import FLOAT_DTYPES
from .sizes import human_size, parse_size

if TYPE_CHECKING:
    from .verification import VerifyReport


@dataclass(frozen=True)
class MergeOptions:
    """Everything a merge can be asked to do besides its three paths (the keyword arguments of `merge`, parsed)."""

    dtype: str | None = None  # safetensors dtype of the floating output tensors; None keeps the base's
    device: str = "cpu"
    max_shard_size: int | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    dry_run: bool = False
    verify: bool = False
    allow_nonfinite: bool = False
    trained_on: QuantScheme | None = None  # quantize the base's weights as in training before merging
    initial: str | None = None  # INIT adapter folder: merge a PiSSA/OLoRA/CorDA/LoRA-GA adapter into the original base
    base_is_residual: bool = False  # BASE is such an adapter's residual base: merge it as plain LoRA
    sources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    progress: ProgressCallback | None = None


@dataclass
class MergeReport:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | Adapter | Sequence[str | os.PathLike[str] | Adapter],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | bool | None = None,
    allow_pickle: bool = False,
    dry_run: bool = False,
    sources: Mapping[str, Mapping[str, Any]] | None = None,
    verify: bool = False,
    allow_nonfinite: bool = False,
    trained_on: str | None = None,
    double_quant: bool | None = None,
    quant_blocksize: int | None = None,
    skip_modules: list[str] | None = None,
    initial: str | os.PathLike[str] | None = None,
    base_is_residual: bool = False,
) -> MergeReport:
    """Merge a PEFT LoRA adapter into a base checkpoint, streaming, exactly as PEFT's merge_and_unload.

    Args:
        base: base model folder (safetensors, single file or sharded).
        adapter: adapter folder (adapter_config.json + adapter_model.safetensors) or a loaded `Adapter`; or a list
            of them: a stacked merge, in that order, as PEFT's merge_and_unload(adapter_names=[...]) (stacking.py).
        out: output folder; written atomically (a temporary folder beside it replaces it at the end).
        weights: with several adapters, each one's delta multiplied by its weight (default 1), as PEFT's
            set_scale(adapter, weight) does: scale = weight * alpha / sqrt(r) (or / r).
        dtype: output dtype for floating tensors ("bf16", "fp16", "fp32"); None or "auto" keeps the base's.
        device: "cpu" (the merge kernel, torch on the CPU for the rest), "cuda" (torch on the GPU for
            every computed tensor) or "auto" (the kernel where it applies, CUDA when present for the rest).
        max_shard_size: re-shard the output ("5GB" = 5e9 bytes); default: keep the base's shards.
        overwrite: replace an existing non-empty OUT.
        progress: called as `progress(bytes_done_now, total_bytes)` as tensors are written (from
            worker threads, one call at a time); the CLI draws its progress bar with it.
        dry_run: plan only (headers and config); write nothing. The report lists every change,
            adapter tensors that match nothing, the memory needed and the free disk space.
        verify: recompute and compare every tensor of the fresh output before it replaces OUT;
            a mismatch beyond rounding fails the merge and nothing is written.
        allow_nonfinite: merge an adapter whose weights hold NaN or Inf (refused by default).
        trained_on: "nf4", "fp4" or "int8": the adapter was trained on BASE quantized this way
            (QLoRA); the weights transformers quantizes are quantized and dequantized as
            bitsandbytes does before the merge. `double_quant` (default False) and
            `quant_blocksize` (default 64) as in BitsAndBytesConfig; `skip_modules` as its
            llm_int8_skip_modules. A quantized BASE needs none of this: it is dequantized.
        initial: for a PiSSA, OLoRA, CorDA or LoRA-GA adapter, the adapter folder saved right after
            initialisation: the trained adapter is merged into the original BASE as the rank-2r
            LoRA s * ([B, -B0] @ [A; A0]) (initial.relative_to_original).
        base_is_residual: BASE is the residual base such an adapter was trained on: merge it as plain LoRA.
        sources: where BASE and ADAPTER came from ({"base": ..., "adapter": ...}, hub.Source dicts), for the
            provenance file OUT gets (a later `push` writes the model card from it).

    Returns:
        A `MergeReport` with what was merged.
    """
    if isinstance(progress, bool):
        if progress:
            warnings.warn("merge(progress=True) no longer draws a progress bar (the CLI does); pass a callback "
                          "progress(bytes_done_now, total_bytes)", DeprecationWarning, stacklevel=2)
        progress = None
    merged, options = merge_arguments(
        adapter, weights=weights, dtype=dtype, device=device, max_shard_size=max_shard_size, overwrite=overwrite,
        progress=progress, allow_pickle=allow_pickle, dry_run=dry_run, sources=sources, verify=verify,
        allow_nonfinite=allow_nonfinite, trained_on=trained_on, double_quant=double_quant,
        quant_blocksize=quant_blocksize, skip_modules=skip_modules, initial=initial, base_is_residual=base_is_residual)
    return run_merge(base, merged, Path(out), options)


def merge_arguments(
    adapter: str | os.PathLike[str] | Adapter | Sequence[str | os.PathLike[str] | Adapter],
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    allow_pickle: bool = False,
    dry_run: bool = False,
    sources: Mapping[str, Mapping[str, Any]] | None = None,
    verify: bool = False,
    allow_nonfinite: bool = False,
    trained_on: str | None = None,
    double_quant: bool | None = None,
    quant_blocksize: int | None = None,
    skip_modules: list[str] | None = None,
    initial: str | os.PathLike[str] | None = None,
    base_is_residual: bool = False,
) -> tuple[str | os.PathLike[str] | Adapter, MergeOptions]:
    """`merge`'s arguments checked and parsed: the adapter (several are stacked into one) and the options."""
    try:
        size = parse_size(max_shard_size) if max_shard_size is not None else None
    except ValueError as e:
        raise InputError(str(e)) from None
    scheme = None
    if trained_on is not None:
        scheme = trained_on_scheme(trained_on, double_quant=double_quant, blocksize=quant_blocksize,
                                   skip_modules=skip_modules)
    elif double_quant is not None or quant_blocksize is not None or skip_modules is not None:
        raise InputError("--double-quant, --quant-blocksize and --skip-modules describe --trained-on; pass it too")
    if initial is not None and base_is_residual:
        raise InputError("--initial and --base-is-residual exclude each other: the first merges into the original "
                         "base, the second into the residual base")
    if isinstance(adapter, (list, tuple)):
        if len(adapter) == 1 and weights is None:
            adapter = adapter[0]
        else:
            if initial is not None:
                raise InputError("--initial applies to one adapter; convert each PiSSA/OLoRA/CorDA/LoRA-GA adapter with "
                                 "`convert --initial` first, then merge the converted adapters together")
            adapter = stack_adapters([a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=allow_pickle)
                                      for a in adapter], list(weights) if weights is not None else None)
    elif weights is not None:
        raise InputError("--weights goes with several adapters")
    options = MergeOptions(
        dtype=parse_dtype(dtype), device=device, max_shard_size=size, overwrite=overwrite,
        allow_pickle=allow_pickle, dry_run=dry_run, verify=verify, allow_nonfinite=allow_nonfinite,
        trained_on=scheme, initial=str(initial) if initial is not None else None, base_is_residual=base_is_residual,
        sources=sources or {}, progress=progress,
    )
    assert isinstance(adapter, (str, os.PathLike, Adapter))
    return adapter, options


@dataclass
class PreparedMerge:
    """A merge planned and lowered, with its report so far: what `run_merge` and a streamed merge execute."""

    checkpoint: Checkpoint
    adapter: Adapter
    plan: Plan
    lowered: Lowered
    report: MergeReport


def prepare_merge(base: str | os.PathLike[str] | Checkpoint, adapter: str | os.PathLike[str] | Adapter, out: Path,
                  options: MergeOptions) -> PreparedMerge:
    """Open, plan and lower a merge (headers and configs only); `out` is only named in the report."""
    if options.initial is not None:
        adapter = with_initial(adapter, options.initial, options.allow_pickle)
    checkpoint, adapter_obj, plan = plan_merge(
        base, adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
        allow_pickle=options.allow_pickle, collect_unmatched=options.dry_run, trained_on=options.trained_on,
        base_is_residual=options.base_is_residual,
    )
    if isinstance(adapter_obj, RelativeAdapter):
        plan.notes.append(f"{variant_name(adapter_obj.trained or adapter_obj)} adapter made relative to the original "
                          f"base with INIT {options.initial}: {adapter_obj.form}")
    lowered = lower(plan, checkpoint, adapter_obj, Device(options.device))
    report = _report(checkpoint, adapter_obj, plan, lowered, out, options)
    for folder in (checkpoint.folder, *(a.path for a in adapter_obj.sources)):
        side_files(folder)  # the link rule, before anything is written (a dry run says it too)
    return PreparedMerge(checkpoint, adapter_obj, plan, lowered, report)


def run_merge(base: str | os.PathLike[str], adapter: str | os.PathLike[str] | Adapter, out: Path,
              options: MergeOptions) -> MergeReport:
    """`merge` with its options already parsed."""
    started = time.monotonic()
    prepared = prepare_merge(base, adapter, out, options)
    checkpoint, adapter_obj, plan, report = prepared.checkpoint, prepared.adapter, prepared.plan, prepared.report
    inputs = [checkpoint.folder, *(a.path for a in adapter_obj.sources)]
    folder = check_output_location(out, inputs, options.overwrite)
    report.free_bytes = free_space(folder)
    if options.dry_run:
        measure_sample(prepared)
        report.seconds = time.monotonic() - started
        return report
    for name in remove_leftovers(folder):
        report.warnings.append(f"removed {name}, left beside OUT by an earlier run that was killed")
    report.free_bytes = free_space(folder)
    side = sum(p.stat().st_size for p in side_files(checkpoint.folder))
    check_free_space(out, report.bytes_written + side, report.free_bytes)
    check_inputs_finite(adapter_obj, options)
    try:
        _write_output(folder, prepared, options)
    except OSError as e:  # a full disk (ENOSPC), a read error, ...: the partial output is already removed
        raise write_failure(out, e, "the merge") from e
    report.seconds = time.monotonic() - started
    return report


def measure_sample(prepared: PreparedMerge) -> None:
    """A dry run of --trained-on: the quantization error measured on a sample of the weights."""
    report, plan = prepared.report, prepared.plan
    if report.quantization is not None and not plan.prequantized:
        report.quantization["measured"] = measured_quantization(
            sample_quantization(plan, prepared.checkpoint, prepared.adapter), _measurable(plan))


def check_inputs_finite(adapter: Adapter, options: MergeOptions) -> None:
    if not options.allow_nonfinite:
        for source in adapter.sources:
            check_finite(source)


def _write_output(folder: Path, prepared: PreparedMerge, options: MergeOptions) -> None:
    checkpoint, adapter, plan, report = prepared.checkpoint, prepared.adapter, prepared.plan, prepared.report
    with atomic_folder(folder, options.overwrite) as tmp:
        measures: dict[str, tuple[float, float, float]] = {}
        execute(prepared.lowered, checkpoint, adapter, tmp, options.progress, allow_nonfinite=options.allow_nonfinite,
                measures=measures)
        record_measures(prepared, measures)
        write_extras(tmp, prepared, options)
        if options.verify:
            from .verification import verify  # torch: imported only when asked

            checked = verify(tmp, checkpoint.folder, adapter, trained_on=options.trained_on,
                             base_is_residual=options.base_is_residual)
            report.verify = checked.to_dict()
            if not checked.ok:
                raise MismatchError(f"verification of the merged output failed ({_verify_summary(checked)}); "
                                    "nothing was written")


def record_measures(prepared: PreparedMerge, measures: dict[str, tuple[float, float, float]]) -> None:
    """--trained-on: the quantization error the executor measured, into the report."""
    if prepared.report.quantization is not None and not prepared.plan.prequantized:
        prepared.report.quantization["measured"] = measured_quantization(measures, _measurable(prepared.plan))


def write_extras(folder: Path, prepared: PreparedMerge, options: MergeOptions) -> None:
    """Everything of a merged model but its shards: the index, config and side files, provenance."""
    checkpoint, adapter, plan, report = prepared.checkpoint, prepared.adapter, prepared.plan, prepared.report
    if plan.index_metadata is not None:
        shards = [(name, [(t.name, t.dtype, t.shape) for t in tensors]) for name, tensors in plan.shards]
        write_index(folder, shards, plan.index_metadata)
    copy_side_files(checkpoint.folder, adapter.path, folder, plan.config_updates)
    write_provenance(folder, {
        "operation": "merge",
        "base": options.sources.get("base") or {"spec": str(checkpoint.folder)},
        "adapter": options.sources.get("adapter") or {"spec": str(adapter.path)},
        **({"adapters": options.sources.get("adapters") or [{"spec": str(p.path)} for p in _parts(adapter)],
            "weights": list(adapter.weights)} if isinstance(adapter, StackedAdapter) else {}),
        "convention": report.convention, "modules": report.modules,
        "scale_min": report.scale_min, "scale_max": report.scale_max, "dtype": report.dtype,
        **({"quantization": report.quantization} if report.quantization else {}),
        **({"initial": options.sources.get("initial") or {"spec": options.initial}} if options.initial else {}),
        **({"base_is_residual": True} if options.base_is_residual else {}),
    })


def _report(checkpoint: Checkpoint, adapter: Adapter, plan: Plan, lowered: Lowered, out: Path,
            options: MergeOptions) -> MergeReport:
    steps = lowered.steps
    scales = [op.scale.scale for op in plan.lora_ops]
    return MergeReport(
        base=str(checkpoint.folder),
        adapter=str(adapter.path),
        out=str(out),
        convention=",".join(dict.fromkeys(p.config.convention for p in _parts(adapter))),
        adapters=[str(p.path) for p in _parts(adapter)],
        weights=list(adapter.weights) if isinstance(adapter, StackedAdapter) else [1.0],
        modules=len(plan.lora_ops),
        tensors_merged=sum(not s.tensor.untouched for s in steps),
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


_MEASURED_TENSORS = 8  # how many LoRA-targeted weights --trained-on measures the quantization error on


def _quantization(plan: Plan, checkpoint: Checkpoint, adapter: Adapter) -> dict[str, Any] | None:
    scheme = plan.quantization
    if scheme is None:
        return None
    quantized = [t for t in plan.tensors if t.quant is not None]
    summary = {
        "mode": "dequantized" if plan.prequantized else "as trained", "scheme": scheme.label,
        "method": scheme.method, "blocksize": scheme.blocksize, "double_quant": scheme.double_quant,
        "weights": len(quantized), "merged_dtypes": sorted({t.dtype for t in quantized}),
        "skip_modules": list(scheme.skip_modules) if scheme.skip_modules is not None else None,
    }
    if not plan.prequantized:
        summary["measured"] = None  # after the merge (or by a dry run's sample): measured_quantization
    return summary


def _parts(adapter: Adapter) -> list[Adapter]:
    return adapter.parts if isinstance(adapter, StackedAdapter) else [adapter]


def with_initial(adapter: str | os.PathLike[str] | Adapter, initial: str | os.PathLike[str],
                 allow_pickle: bool = False) -> RelativeAdapter:
    """ADAPTER (PiSSA, OLoRA, CorDA, LoRA-GA) relative to the original base, given its INIT adapter."""
    trained = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    return relative_to_original(trained, load_adapter(initial, allow_pickle=allow_pickle))


def _measurable(plan: Plan) -> int:
    return sum(t.quant is not None and t.quant.simulated and t.lora is not None for t in plan.tensors)


def sample_quantization(plan: Plan, checkpoint: Checkpoint, adapter: Adapter) -> dict[str, tuple[float, float, float]]:
    """A dry run's measure: quantization_norms of a few LoRA-targeted weights spread over the model (torch)."""
    targets = [t for t in plan.tensors if t.quant is not None and t.quant.simulated and t.lora is not None]
    if not targets:  # (no LoRA on a quantized weight)
        return {}
    from .compute import quantization_error

    step = max(1, len(targets) // _MEASURED_TENSORS)
    files = CheckpointFiles(checkpoint)
    try:
        return {t.name: quantization_error(t, files.read, adapter.tensor) for t in targets[::step][:_MEASURED_TENSORS]}
    finally:
        files.close()


def measured_quantization(norms: dict[str, tuple[float, float, float]], targeted: int) -> dict[str, Any] | None:
    """The report's summary of quantization_norms: relative norms, medians over the measured weights."""
    if not norms:
        return None
    roots = [tuple(math.sqrt(x) for x in n) for n in norms.values()]
    error_over_weight = sorted(e / w for w, e, _ in roots if w > 0)
    error_over_delta = sorted(e / d for _, e, d in roots if d > 0)
    delta_over_weight = sorted(d / w for w, _, d in roots if w > 0)
    return {
        "tensors": len(norms), "of": targeted,
        "quant_error_over_weight": _median(error_over_weight), "delta_over_weight": _median(delta_over_weight),
        "quant_error_over_delta": _median(error_over_delta),
        "quant_error_over_delta_max": error_over_delta[-1] if error_over_delta else None,
    }


def _median(values: list[float]) -> float | None:
    return values[len(values) // 2] if values else None


def _changes(lowered: Lowered) -> list[dict[str, Any]]:
    """Each changed tensor: how it changes, the module and scale, and what produces it (`by`)."""
    changes = []
    for step in lowered.steps:
        t = step.tensor
        if t.untouched:
            continue
        how = []
        if t.quant is not None:
            how.append(f"quantized as trained ({t.quant.scheme.method})" if t.quant.simulated
                       else f"dequantized ({t.quant.scheme.method})")
        if t.replacement is not None:
            how.append(f"replaced by adapter tensor {t.replacement}")
        for each in t.all_lora:
            how.append(("DoRA" if each.dora else "LoRA") + f" ({each.kind})" + (f" at scale {each.scale.scale:g}"
                                                                              if t.stacked else ""))
        if t.bias_of is not None or any(p.bias_of is not None for p in t.stacked):
            how.append("lora_bias")
        if t.tokens is not None:
            how.append(f"{len(t.tokens[1])} trainable token rows")
        op = t.lora or t.bias_of
        changes.append({
            "tensor": t.name, "how": ", ".join(how), "module": op.module.name if op is not None else None,
            "scale": op.scale.scale if op is not None else None, "rank": op.scale.r if op is not None else None,
            "alpha": op.scale.alpha if op is not None else None, "by": step.kind.value,
        })
    return changes


def check_free_space(out: Path, needed: int, free: int | None) -> None:
    if free is not None and needed > free:
        raise OutputError(
            f"{out}: the merge writes {human_size(needed)} but only {human_size(free)} is free there; free some space or "
            "choose another output folder (nothing was written)"
        )


def _verify_summary(checked: VerifyReport) -> str:
    first = next((c.name for c in checked.tensors if c.status == "mismatch"), None)
    parts = [f"{checked.mismatched} tensor(s) differ beyond rounding" + (f", e.g. {first}" if first else "")]
    return "; ".join(parts + checked.problems[:3])
