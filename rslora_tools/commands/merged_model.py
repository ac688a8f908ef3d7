"""What a merge makes, however it is written (into OUT, or streamed to the Hub): its options, its inputs resolved,
its plan lowered, the files beside its shards, and its report.

commands/merge.py writes a merge into OUT (and hands a streamed one to commands/stream.py); both
build on these pieces, so that the two give the same bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.load import load_adapter
from ..adapter.relative import RelativeAdapter, relative_to_original, variant_name
from ..adapter.stacked import stack_adapters
from ..compute.finite import check_finite
from ..compute.quant_stats import (
    each_requantization,
    measurable_weights,
    measured_quantization,
    sample_quantization,
)
from ..errors import InputError, OptionError, cli_message
from ..execute.lowering import Device, Lowered, StepKind, estimate_memory, lower
from ..formats.checkpoint import Checkpoint, copy_side_files, side_files, write_index
from ..formats.provenance import write_provenance
from ..formats.quant import QuantScheme, trained_on_scheme
from ..formats.safetensors_file import FLOAT_DTYPES
from ..formats.sizes import parse_size
from ..hub.resolve import Source, resolve_merge_inputs
from ..plan.merge import plan_merge
from ..plan.tensors import Plan, parse_dtype
from ..reporting import PhaseProgress, Report, counted
from .common import AdapterSpec, OutputOptions, adapter_input, check_order


def parse_weights(weights: Any) -> tuple[float, ...]:
    """Adapter weights as given: a sequence of numbers, or one comma-separated string ("0.7,0.3") as the CLI
    takes them; each finite."""
    items = weights.split(",") if isinstance(weights, str) else weights
    try:
        values = tuple(float(w) for w in items) if not isinstance(items, (int, float)) else (float(items),)
    except (TypeError, ValueError):
        raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)") from None
    if not values or any(isinstance(w, bool) for w in (items if isinstance(items, (list, tuple)) else ())):
        raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)")
    if not all(math.isfinite(w) for w in values):
        raise OptionError("--weights must be finite numbers")
    return values


@dataclass(frozen=True)
class MergeOptions(OutputOptions):
    """Everything a merge can be asked to do besides its inputs and OUT; checked when made (OptionError).

    `dtype` ("bf16", "fp16", "fp32", their torch spellings, or None/"auto": keep the base's),
    `max_shard_size` ("5GB" or bytes) and `trained_on` ("nf4", "fp4", "int8", or a QuantScheme
    from formats.quant.trained_on_scheme for its block size and double quantization) are taken
    as people write them and kept parsed.
    """

    weights: tuple[float, ...] | None = None  # several adapters: each one's delta multiplied (PEFT's set_scale)
    dtype: str | None = None  # safetensors dtype of the floating output tensors; None keeps the base's
    device: str = "cpu"  # cpu (bit-exact with PEFT), cuda or auto
    max_shard_size: int | None = None  # re-shard the output; None keeps the base's shards
    verify: bool = False  # recompute and compare every tensor before OUT is replaced
    allow_pickle: bool = False  # read an adapter that exists only as adapter_model.bin (weights_only)
    trained_on: QuantScheme | None = None  # quantize the base's weights as in training before merging (QLoRA)
    keep_quantization: bool = False  # a quantized base: write the changed weights back in its format
    initial: str | None = None  # INIT (folder or Hub repo): merge a PiSSA/OLoRA/CorDA/LoRA-GA adapter into BASE
    base_is_residual: bool = False  # BASE is such an adapter's residual base: merge it as plain LoRA
    base_revision: str | None = None  # of BASE, when it is a Hub repo
    adapter_revision: str | None = None  # of the (first) adapter, when it is a Hub repo
    stream: StreamOptions | None = None  # stream from BASE to the Hub repo `push`, shard by shard (no OUT)
    outtype: str | None = None  # an OUT.gguf: f16, bf16, f32 or q8_0 (convert_hf_to_gguf.py's --outtype); default f16
    llama_cpp: str | None = None  # an OUT.gguf: the llama.cpp checkout whose converter writes it

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", parse_dtype(self.dtype))
            size = self.max_shard_size
            object.__setattr__(self, "max_shard_size", parse_size(size) if size is not None else None)
            if isinstance(self.trained_on, str):
                object.__setattr__(self, "trained_on", trained_on_scheme(self.trained_on))
        except (ValueError, InputError) as e:
            raise OptionError(cli_message(e)) from None
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise OptionError(f"unknown device {self.device!r}; use cpu, cuda or auto")
        if self.weights is not None:
            object.__setattr__(self, "weights", parse_weights(self.weights))
        if self.initial is not None and self.base_is_residual:
            raise OptionError("--initial and --base-is-residual exclude each other: the first merges into the original "
                              "base, the second into the residual base")
        if self.keep_quantization and self.trained_on is not None:
            raise OptionError("--keep-quantization keeps a quantized base's format; --trained-on is for an unquantized "
                              "base (and the output is unquantized)")
        if self.keep_quantization and self.dtype is not None:
            raise OptionError("--keep-quantization writes the base's own dtypes; --dtype does not go with it")
        if self.stream is not None:
            self._check_stream()
        if self.outtype is not None and self.outtype not in ("f16", "bf16", "f32", "q8_0"):
            raise OptionError(f"unknown --outtype {self.outtype!r}; use f16, bf16, f32 or q8_0")

    def _check_stream(self) -> None:
        if self.push is None and self.outtype is None:
            raise OptionError("--stream sends the merged model to the Hub: pass --push-to-hub REPO_ID (or name an "
                              "OUT.gguf with --outtype; without --stream, merge into OUT)")
        for given, name in ((self.verify, "--verify"), (self.overwrite, "--overwrite")):
            if given:
                raise OptionError(f"{name} does not go with --stream (no OUT is written); verify the pushed repo with "
                                  "`rslora-tools verify` after downloading it")


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
    gguf: dict[str, Any] | None = None  # an OUT.gguf: outtype, the llama.cpp used, the next step (commands/merged_gguf)


@dataclass
class MergeInputs:
    """BASE and the adapter(s) of a merge, resolved: the base folder, the adapter to read, and their provenance."""

    base: Path
    adapter: Adapter
    sources: dict[str, Any]
    warnings: list[str]
    base_source: Source | None = None


def merge_inputs(base: str | os.PathLike[str], adapters: list[AdapterSpec], options: MergeOptions,
                 base_shards: bool = True) -> MergeInputs:
    """Resolve BASE and ADAPTER... (folders or Hub repos; BASE "auto": the adapter's own), load the adapters (several:
    stacked with their weights; --initial: made relative to the original base) and say where each came from."""
    check_order("merge", "BASE ADAPTER... OUT", [("BASE", base, ("model", "merged")),
                                                 ("ADAPTER", adapters[0], ("adapter",))])
    if options.weights is not None and len(options.weights) != len(adapters):
        raise OptionError(f"--weights has {counted(len(options.weights), 'weight')} for {counted(len(adapters), 'adapter')}")
    if options.initial is not None and len(adapters) > 1:
        raise OptionError("--initial applies to one adapter; convert each PiSSA/OLoRA/CorDA/LoRA-GA adapter with "
                          "`convert --initial` first, then merge the converted adapters together")
    first = adapters[0]
    base_source, first_source, warnings = resolve_merge_inputs(
        os.fspath(base), os.fspath(first.path if isinstance(first, Adapter) else first),
        base_revision=options.base_revision, adapter_revision=options.adapter_revision, token=options.token,
        allow_pickle=options.allow_pickle, base_shards=base_shards)
    resolved = [(first if isinstance(first, Adapter) else first_source.path, first_source.to_dict())]
    resolved += [adapter_input(a, token=options.token, allow_pickle=options.allow_pickle) for a in adapters[1:]]
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=options.allow_pickle) for a, _ in resolved]
    sources: dict[str, Any] = {"base": base_source.to_dict(), "adapter": resolved[0][1]}
    if len(loaded) > 1 or options.weights is not None:  # one adapter with a weight: a stack of one
        sources["adapters"] = [source for _, source in resolved]
        adapter_obj: Adapter = stack_adapters(loaded, list(options.weights) if options.weights else None)
    else:
        adapter_obj = loaded[0]
    if options.initial is not None:
        init, sources["initial"] = adapter_input(options.initial, token=options.token, allow_pickle=options.allow_pickle)
        adapter_obj = with_initial(adapter_obj, init, options.allow_pickle)
    return MergeInputs(base_source.path, adapter_obj, sources, warnings, base_source)


@dataclass
class PreparedMerge:
    """A merge planned and lowered, with its report so far: what `run_merge` and a streamed merge execute."""

    checkpoint: Checkpoint
    adapter: Adapter
    plan: Plan
    lowered: Lowered
    report: MergeReport
    sources: dict[str, Any]  # where BASE and the adapters came from (the provenance record)


def prepare_merge(base: Path | Checkpoint, inputs: MergeInputs, out: Path, options: MergeOptions) -> PreparedMerge:
    """Open, plan and lower a merge (headers and configs only); `out` is only named in the report."""
    checkpoint, adapter, plan = plan_merge(
        base, inputs.adapter, dtype=options.dtype, max_shard_size=options.max_shard_size,
        allow_pickle=options.allow_pickle, collect_unmatched=options.dry_run, trained_on=options.trained_on,
        base_is_residual=options.base_is_residual, keep_quantization=options.keep_quantization,
    )
    if adapter.relative_form is not None:
        plan.notes.append(f"{variant_name(adapter.trained_adapter)} adapter made relative to the original "
                          f"base with INIT {options.initial}: {adapter.relative_form}")
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
            sample_quantization(plan, prepared.checkpoint, prepared.adapter), measurable_weights(plan))


def check_inputs_finite(adapter: Adapter, options: MergeOptions) -> None:
    if not options.allow_nonfinite:
        for source in adapter.sources:
            check_finite(source)


def record_measures(prepared: PreparedMerge, measures: dict[str, tuple[float, float, float]], *,
                    sample: bool = True) -> None:
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
    write_provenance(folder, {
        "operation": "merge",
        "base": sources.get("base") or {"spec": str(checkpoint.folder)},
        "adapter": sources.get("adapter") or {"spec": str(adapter.path)},
        **({"adapters": sources.get("adapters") or [{"spec": str(p.path)} for p in adapter.parts],
            "weights": list(adapter.weights)} if adapter.stacked else {}),
        "convention": report.convention, "modules": report.modules,
        "scale_min": report.scale_min, "scale_max": report.scale_max, "dtype": report.dtype,
        **({"quantization": report.quantization} if report.quantization else {}),
        **({"initial": sources.get("initial") or {"spec": options.initial}} if options.initial else {}),
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
        convention=",".join(dict.fromkeys(p.config.convention for p in adapter.parts)),
        adapters=[str(p.path) for p in adapter.parts],
        weights=list(adapter.weights),
        modules=len({op.module.a_key for op in plan.lora_ops}),  # an expert module split over several tensors counts once
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
        "mode": mode, "scheme": scheme.label,
        "method": scheme.method, "blocksize": scheme.blocksize, "double_quant": scheme.double_quant,
        "weights": len(quantized),
        "merged_dtypes": sorted({t.quant.keep.dtype if t.quant.keep else t.dtype for t in quantized if t.quant}),
        "skip_modules": list(scheme.skip_modules) if scheme.skip_modules is not None else None,
    }
    if not plan.prequantized or measurable_weights(plan):
        # after the merge (or by a dry run's sample): measured_quantization. A quantized base: how far quantizing the
        # merged weights back moves them (what --keep-quantization loses of the delta)
        summary["measured"] = None
        summary["measure"] = "requantization of the merged weights" if plan.prequantized else \
            "quantization of the base weights"
    return summary


def with_initial(adapter: str | os.PathLike[str] | Adapter, initial: str | os.PathLike[str] | Adapter,
                 allow_pickle: bool = False) -> RelativeAdapter:
    """ADAPTER (PiSSA, OLoRA, CorDA, LoRA-GA) relative to the original base, given its INIT adapter."""
    trained = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    init = initial if isinstance(initial, Adapter) else load_adapter(initial, allow_pickle=allow_pickle)
    return relative_to_original(trained, init)


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
                       else f"dequantized and quantized back ({t.quant.scheme.method})" if t.quant.keep
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


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed merge runs (--scratch, --keep-cache, --no-resume); where it goes is `MergeOptions.push`."""

    scratch: Path | None = None  # the folder the run's working folder goes in; default: ~/.cache/rslora-tools/stream
    keep_cache: bool = False  # base shards downloaded go into the Hugging Face cache and stay
    no_resume: bool = False  # forget what an earlier run uploaded (its journal) and start over
    progress: PhaseProgress | None = None  # called as progress(phase, bytes_done_now, phase_total)
