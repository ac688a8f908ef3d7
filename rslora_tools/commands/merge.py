"""`merge`, the merge command: resolve and check inputs and OUT, plan, lower, execute, report, publish.

The work itself happens in the stages before: plan/merge.py decides what every output tensor
becomes, execute/lowering.py how each is produced, execute/executor.py writes the shards. This
module takes BASE and ADAPTER... as folders or Hub repos, checks the options (`MergeOptions`),
the output location and the free disk space, runs those stages inside an atomic output folder
(so a failure or Ctrl-C leaves nothing behind), adds the index, side files and provenance,
reports what was done and pushes OUT when asked. `options.stream` hands the whole merge to
commands/stream.py instead (Hub to Hub, no OUT).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MismatchError, OptionError, OutputError
from ..execute.executor import execute
from ..formats.checkpoint import side_files
from ..formats.output import check_output_location, free_space, writing
from ..formats.provenance import add_to_provenance
from ..formats.sizes import human_size
from ..reporting import ProgressCallback
from .common import AdapterSpec, adapter_list, check_push, publish, with_fields
from .merged_model import (
    MergeInputs,
    MergeOptions,
    MergeReport,
    PreparedMerge,
    check_inputs_finite,
    measure_sample,
    merge_inputs,
    prepare_merge,
    record_measures,
    write_extras,
)

if TYPE_CHECKING:
    from ..execute.recompute import VerifyReport


def merge(
    base: str | os.PathLike[str],
    adapter: AdapterSpec | Sequence[AdapterSpec],
    out: str | os.PathLike[str] | None = None,
    *,
    options: MergeOptions | None = None,
    progress: ProgressCallback | bool | None = None,
    **fields: Any,
) -> MergeReport:
    """Merge PEFT LoRA adapters into a base checkpoint, streaming, exactly as PEFT's merge_and_unload.

    Args:
        base: the base model: a folder (safetensors, single file or sharded), a Hub repo (`org/name`,
            `org/name@rev`, `hf://org/name`), or "auto" (the base the adapter records).
        adapter: an adapter (folder, Hub repo or loaded `Adapter`), or several: a stacked merge, in that
            order, as PEFT's merge_and_unload(adapter_names=[...]) (plan/stacking.py).
        out: the output folder, written atomically; None for a streamed merge (`options.stream`).
        options: a `MergeOptions`; keyword arguments are taken as its fields (`dtype="bf16"`, `overwrite=True`).
        progress: called as `progress(bytes_done_now, total_bytes)` as tensors are written (from worker
            threads, one call at a time); the CLI draws its progress bar with it.

    Returns:
        A `MergeReport` (a streamed merge: a `stream.StreamReport`); `push` holds the push when one was asked.
    """
    if isinstance(progress, bool):  # the library never draws (the CLI does)
        if progress:
            warnings.warn("merge(progress=True) no longer draws a progress bar (the CLI does); pass a callback "
                          "progress(bytes_done_now, total_bytes)", DeprecationWarning, stacklevel=2)
        progress = None
    options = with_fields(options, MergeOptions, fields)
    adapters = adapter_list(adapter)
    if (options.outtype or options.llama_cpp) and (out is None or Path(out).suffix != ".gguf"):
        raise OptionError("--outtype and --llama-cpp go with an OUT ending in .gguf (one llama.cpp file)")
    if options.stream is not None and out is not None and Path(out).suffix == ".gguf":
        from .merged_gguf import check_gguf_options, stream_gguf_merge

        check_gguf_options(options)
        return stream_gguf_merge(base, adapters, Path(out), options)
    if options.stream is not None:
        if out is not None:
            raise OptionError("a streamed merge writes no OUT (to the Hub) or one OUT.gguf: every other argument after "
                              "BASE is an adapter")
        if options.push is None:
            raise OptionError("--stream with --outtype writes an OUT.gguf: name it after the adapters")
        from .stream import stream_merge  # imported only for a streamed merge

        return stream_merge(base, adapters, options)
    if out is None:
        raise OptionError("missing OUT: merge BASE ADAPTER... OUT (or stream to the Hub)")
    inputs = merge_inputs(base, adapters, options)
    check_push(options, inputs.sources)
    report = run_merge(inputs, Path(out), options, progress)
    pushed = publish(Path(out), options)
    report.push = pushed.to_dict() if pushed is not None else None
    return report


def run_merge(inputs: MergeInputs, out: Path, options: MergeOptions,
              progress: ProgressCallback | None = None) -> MergeReport:
    """A merge of resolved inputs into OUT (`merge` without the resolution and the push)."""
    started = time.monotonic()
    prepared = prepare_merge(inputs.base, inputs, out, options)
    if out.suffix == ".gguf":
        from .merged_gguf import run_gguf_merge

        return run_gguf_merge(prepared, out, options, started)
    checkpoint, adapter, report = prepared.checkpoint, prepared.adapter, prepared.report
    folder = check_output_location(out, [checkpoint.folder, *(a.path for a in adapter.sources)], options.overwrite)
    report.free_bytes = free_space(folder)
    if options.dry_run:
        measure_sample(prepared)
        report.seconds = time.monotonic() - started
        return report
    side = sum(p.stat().st_size for p in side_files(checkpoint.folder))
    check_free_space(out, report.bytes_written + side, report.free_bytes)
    check_inputs_finite(adapter, options)
    with writing(out, folder, overwrite=options.overwrite, what="the merge", warnings=report.warnings) as tmp:
        _write_output(tmp, prepared, options, progress)
    report.seconds = time.monotonic() - started
    return report


def _write_output(tmp: Path, prepared: PreparedMerge, options: MergeOptions, progress: ProgressCallback | None) -> None:
    checkpoint, adapter, report = prepared.checkpoint, prepared.adapter, prepared.report
    measures: dict[str, tuple[float, float, float]] = {}
    execute(prepared.lowered, checkpoint, adapter, tmp, progress, allow_nonfinite=options.allow_nonfinite,
            measures=measures)
    record_measures(prepared, measures)
    write_extras(tmp, prepared, options)
    if options.verify:
        from ..adapter.stacked import stack_adapters
        from ..execute.recompute import check_folder  # torch: imported only when asked

        weights = list(adapter.weights)
        checked_adapter = stack_adapters(adapter.parts, weights) if len(adapter.parts) > 1 or weights != [1.0] \
            else adapter.parts[0]
        checked = check_folder(tmp, checkpoint.folder, checked_adapter, trained_on=options.trained_on,
                               base_is_residual=options.base_is_residual)
        report.verify = checked.to_dict()
        if not checked.ok:
            raise MismatchError(f"verification of the merged output failed ({_verify_summary(checked)}); "
                                "nothing was written")
        add_to_provenance(tmp, verified={"verdict": checked.verdict, "tensors_checked": checked.tensors_checked,
                                         "exact": checked.exact, "rounding": checked.rounding})


def check_free_space(out: Path, needed: int, free: int | None) -> None:
    if free is not None and needed > free:
        raise OutputError(
            f"{out}: the merge writes {human_size(needed)} but only {human_size(free)} is free there; free some space or "
            "choose another output folder (nothing was written)"
        )


def _verify_summary(checked: VerifyReport) -> str:
    first = next((c.name for c in checked.tensors if c.status == "mismatch"), None)
    parts = [f"{checked.mismatched} of the tensors differ beyond rounding" + (f", e.g. {first}" if first else "")]
    return "; ".join(parts + checked.problems[:3])
