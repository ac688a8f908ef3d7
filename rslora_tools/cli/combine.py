"""`rslora-tools combine`: its flags, their mapping to CombineOptions, and its printer."""

from __future__ import annotations

from typing import Any

import click

from ..commands.options import CombineOptions
from ..formats.sizes import human_size
from ..reporting import counted
from . import options as o
from .app import cli
from .progress import byte_progress
from .render import echo_warnings, finish


@cli.command()
@click.argument("adapters", metavar="ADAPTER... OUT", nargs=-1, required=True)
@o.flags_from(CombineOptions, verb="Combine")
@o.json_option
@o.quiet_option()
def combine(adapters: tuple[str, ...], **flags: Any) -> None:
    """Combine several LoRA adapters into one adapter in OUT, right under rsLoRA.

    Each input keeps its own convention (classic or rsLoRA), ranks, patterns and target modules;
    a module missing from an input gets nothing from it. The output's factors carry every scale
    and weight, and its config gives every module scale 1 (alpha = rank), which every PEFT
    version and runtime applies as written. PEFT's add_weighted_adapter copies use_rslora from
    the first input and so makes an rsLoRA result sqrt(rank) times too strong; this does not.

    \b
    --method cat      B @ A is exactly sum(w_i * delta_i); rank = the inputs' ranks summed
    --method svd      the best rank-R approximation of that sum, per module, with the energy
                      kept and the relative error reported
    --method linear, ties, dare_linear, dare_ties, magnitude_prune
                      PEFT's definitions, applied to A and B separately (equal ranks per
                      module); dare_* draw their masks from --seed, per module

    \b
    Examples:
      rslora-tools combine domain/ chat/ combined/ --weights 0.7,0.4
      rslora-tools combine a/ b/ c/ combined/ --method svd --rank 16 --json
      rslora-tools combine a/ b/ combined/ --method dare_ties --density 0.5 --seed 1
      rslora-tools combine org/a org/b for-vllm/ --target vllm --push-to-hub me/combined
    """
    from ..commands.combine import combine as run_combine

    if len(adapters) < 2:
        raise click.UsageError("missing argument OUT: combine ADAPTER... OUT")
    *specs, out = adapters
    options = o.options_from(CombineOptions, flags)
    with byte_progress("Combining", not (flags["quiet"] or flags["as_json"] or flags["dry_run"])) as progress:
        report = run_combine(specs, out, options=options, progress=progress)
    echo_warnings(report.warnings)
    finish(report, _print_combine, flags["as_json"], flags["quiet"])


def _print_combine(report: Any) -> None:
    from ..adapter.scaling import convention_label

    verb = "Would write" if report.dry_run else "Wrote"
    ranks = (
        f"rank {report.rank_min}"
        if report.rank_min == report.rank_max
        else f"ranks {report.rank_min} to {report.rank_max}"
    )
    weights = ", ".join(f"{w:g}" for w in report.weights)
    click.echo(
        f"{verb} {report.out}: {counted(len(report.adapters), 'adapter')} combined by {report.method} (weights "
        f"{weights}), "
        f"{counted(len(report.modules), 'module')}, {ranks}, {human_size(report.bytes)}; "
        f"{convention_label(report.convention, 'short')} with scale 1"
    )
    if report.worst_error is not None:
        worst = max(report.modules, key=lambda m: m["relative_error"] or 0.0)
        lowest = min(m["energy"] for m in report.modules if m["energy"] is not None)
        click.echo(
            f"  svd: energy kept >= {lowest:.6f}; largest relative error {report.worst_error:.3g} ({worst['name']})"
        )
    if report.converted is not None:
        click.echo(f"  then for {report.target}: {report.converted['message']}")
