"""`rslora-tools extract`: its flags, their mapping to ExtractOptions, and its printer."""

from __future__ import annotations

from typing import Any

import click

from ..commands.options import ExtractOptions
from ..formats.sizes import human_size
from ..reporting import counted
from . import options as o
from .app import cli
from .progress import byte_progress
from .render import finish


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out", type=click.Path(file_okay=False))
@o.flags_from(ExtractOptions, verb="Extract", skip=("allow_nonfinite",))
@o.json_option
@o.quiet_option()
def extract(base: str, tuned: str, out: str, **flags: Any) -> None:
    """Extract TUNED - BASE (a full fine-tune) as a LoRA adapter in OUT.

    Streams both models tensor by tensor: unchanged tensors are skipped; each changed 2-D weight
    (Linear, GPT-2 Conv1D, embeddings as embedding LoRA) is factorised at --rank, --energy or
    --max-error (rank_pattern where ranks differ); changed biases go with their module
    (lora_bias, or bias="lora_only" when a LoRA module has no bias); other changed tensors
    (norms) make their module a modules_to_save entry. Nothing is dropped; the report lists each
    module's rank, the energy kept and the relative error.

    \b
    Examples:
      rslora-tools extract org/base org/finetuned adapter/ --rank 16
      rslora-tools extract base/ tuned/ adapter/ --energy 0.95 --json
      rslora-tools extract base/ tuned/ adapter/ --max-error 0.05 --classic --push-to-hub me/adapter
    """
    from ..commands.extract import extract as run_extract

    options = o.options_from(ExtractOptions, flags, skip=("allow_nonfinite",))
    with byte_progress("Extracting", not (flags["quiet"] or flags["as_json"] or flags["dry_run"])) as progress:
        report = run_extract(base, tuned, out, options=options, progress=progress)
    finish(report, _print_extract, flags["as_json"], flags["quiet"])


def _print_extract(report: Any) -> None:
    from ..adapter.scaling import convention_label

    verb = "Would write" if report.dry_run else "Wrote"
    ranks = sorted({m["rank"] for m in report.modules})
    rank_text = (
        "no LoRA modules"
        if not ranks
        else (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]} to {ranks[-1]}")
    )
    click.echo(
        f"{verb} {report.out}: {len(report.modules)} LoRA modules, {rank_text}, {human_size(report.bytes)}; "
        f"{convention_label(report.convention, 'short')}"
    )
    if report.worst_error is not None:
        worst = max(report.modules, key=lambda m: m["relative_error"] or 0.0)
        click.echo(
            f"  largest relative error {report.worst_error:.3g} ({worst['name']}); {report.unchanged} unchanged "
            "tensors skipped"
        )
    if report.biases not in ("none", "unknown"):
        click.echo(f"  biases: {report.biases} ({counted(len(report.bias_modules), 'module')})")
    for module in report.modules_to_save:
        click.echo(f"  modules_to_save: {module}")
    for note in report.notes:
        click.echo(f"  note: {note}")
