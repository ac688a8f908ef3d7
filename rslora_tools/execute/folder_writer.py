"""The writer of a folder OUT: the merged shards written by the executor into a staging folder beside OUT, then the
index, side files and provenance, the optional recomputation (`--verify`), and OUT replaced atomically.

A failure or Ctrl-C leaves nothing behind (formats/output.py `writing`); the free space is checked
before anything is written; a dry run plans, measures a sample of a quantized base and reports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MismatchError, OutputError
from ..formats.checkpoint import side_files
from ..formats.output import check_output_location, free_space, writing
from ..formats.provenance import add_to_provenance
from ..formats.sizes import human_size
from ..reporting import ProgressCallback
from .executor import execute
from .merge_job import (
    MergeInputs,
    MergeReport,
    PreparedMerge,
    check_inputs_finite,
    measure_sample,
    prepare_merge,
    record_measures,
    write_extras,
)
from .options import MergeOptions
from .outputs import Folder

if TYPE_CHECKING:
    from .recompute import VerifyReport


def write_folder(
    inputs: MergeInputs, output: Folder, options: MergeOptions, progress: ProgressCallback | None = None
) -> MergeReport:
    """A merge of resolved inputs into the folder OUT (or, dry, its report)."""
    started = time.monotonic()
    out = output.path
    prepared = prepare_merge(inputs.base, inputs, out, options)
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


def _write_output(
    tmp: Path, prepared: PreparedMerge, options: MergeOptions, progress: ProgressCallback | None
) -> None:
    checkpoint, adapter, report = prepared.checkpoint, prepared.adapter, prepared.report
    measures: dict[str, tuple[float, float, float]] = {}
    execute(
        prepared.lowered,
        checkpoint,
        adapter,
        tmp,
        progress,
        allow_nonfinite=options.allow_nonfinite,
        measures=measures,
    )
    record_measures(prepared, measures)
    write_extras(tmp, prepared, options)
    if options.verify:
        from ..adapter.stacked import stack_adapters
        from .recompute import check_folder  # torch: imported only when asked

        weights = list(adapter.weights)
        checked_adapter = (
            stack_adapters(adapter.parts, weights) if len(adapter.parts) > 1 or weights != [1.0] else adapter.parts[0]
        )
        checked = check_folder(
            tmp,
            checkpoint.folder,
            checked_adapter,
            trained_on=options.trained_on,
            base_is_residual=options.base_is_residual,
        )
        report.verify = checked.to_dict()
        if not checked.ok:
            raise MismatchError(
                f"verification of the merged output failed ({_verify_summary(checked)}); nothing was written"
            )
        add_to_provenance(
            tmp,
            verified={
                "verdict": checked.verdict,
                "tensors_checked": checked.tensors_checked,
                "exact": checked.exact,
                "rounding": checked.rounding,
            },
        )


def check_free_space(out: Path, needed: int, free: int | None) -> None:
    if free is not None and needed > free:
        raise OutputError(
            f"{out}: the merge writes {human_size(needed)} but only {human_size(free)} is free there; free some "
            f"space or "
            "choose another output folder (nothing was written)"
        )


def _verify_summary(checked: VerifyReport) -> str:
    first = next((c.name for c in checked.tensors if c.status == "mismatch"), None)
    parts = [f"{checked.mismatched} of the tensors differ beyond rounding" + (f", e.g. {first}" if first else "")]
    return "; ".join(parts + checked.problems[:3])
