"""`rslora-tools verify`: its flags, their mapping to VerifyOptions, and its printer (problems, mismatches,
verdict)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..commands.options import VerifyOptions
from ..reporting import counted
from . import options as o
from .app import cli
from .progress import byte_progress
from .render import echo_json, echo_warnings


@cli.command()
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.argument("base")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@o.flags_from(VerifyOptions)
@o.json_option
@o.quiet_option("Print nothing when the check passes (a failed check still prints what is wrong).")
def verify(merged: str, base: str, adapters: tuple[str, ...], **flags: Any) -> None:
    """Check that MERGED is BASE with ADAPTER merged: recompute every tensor and compare.

    Per tensor: exact (same bytes), within rounding (at most 1 ulp of the dtype off, e.g. a GPU
    merge), or a mismatch, with the max absolute and relative error. Also checks that the
    folder's index, shards, tensor names/shapes/dtypes and config.json agree, and that it holds
    no adapter a loader would apply again. Exit code 1 on any mismatch beyond rounding.

    A quantized BASE is dequantized as the merge did; a merge made with --trained-on, --weights or
    --base-is-residual is recomputed as MERGED's rslora_tools.json records it when the flags are not
    given (the verdict says so).

    \b
    Examples:
      rslora-tools verify merged/ base-model/ my-adapter/
      rslora-tools verify merged/ org/base org/adapter --sample 20
      rslora-tools verify merged/ base-model/ qlora-adapter/ --trained-on nf4 --double-quant
      rslora-tools verify merged/ base-model/ task-a/ task-b/ --weights 0.7,0.4
    """
    from ..commands.verify import verify as run_verify

    options = o.options_from(VerifyOptions, flags)
    with byte_progress("Verifying", not (flags["quiet"] or flags["as_json"])) as progress:
        report = run_verify(merged, base, list(adapters), options=options, progress=progress)
    echo_warnings(report.warnings)
    if flags["as_json"]:
        echo_json(report)
    elif not (flags["quiet"] and report.ok):
        _print_verify(report)
    if not report.ok:
        sys.exit(1)


def _print_verify(report: Any) -> None:
    from ..commands.verify import recipe_text

    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for c in report.tensors:
        if c.status == "mismatch":
            click.echo(
                f"mismatch: {c.name} ({c.dtype}): max abs error {c.max_abs_error:.3g}, "
                f"max rel error {c.max_rel_error:.3g}, {c.max_ulps:.3g} ulp"
            )
    worst = max(report.tensors, key=lambda c: c.max_ulps, default=None)
    if worst is not None and worst.status == "rounding":
        click.echo(
            f"largest rounding difference: {worst.name}: {worst.max_abs_error:.3g} "
            f"({worst.max_ulps:.3g} ulp of {worst.dtype})"
        )
    if report.verdict != "exact" and report.computed_with:
        click.echo(f"expected values computed with {report.computed_with}")
    sampled = f" (sample of {report.tensors_total})" if report.sampled else ""
    recipe = report.recipe
    how = f"; recipe from {recipe['from']}: {recipe_text(recipe)}" if recipe.get("from") != "the arguments" else ""
    click.echo(
        f"{report.verdict.upper()}: {report.tensors_checked} tensors checked{sampled}: {report.exact} exact, "
        f"{report.rounding} within rounding, {report.mismatched} mismatched, "
        f"{counted(len(report.problems), 'folder problem')}; {report.seconds:.2f} s{how}"
    )
    if recipe.get("note"):
        click.echo(f"note: {recipe['note']}")
