"""`rslora-tools inspect`: its flags, their mapping to InspectOptions, and its printer (the table of scales)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..commands.options import InspectOptions
from ..reporting import counted
from . import options as o
from .app import cli
from .render import echo_json


@cli.command()
@click.argument("adapter")
@o.flags_from(InspectOptions)
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too (for CI pipelines).")
@o.json_option
@o.quiet_option("Print nothing but the errors (and, with --strict, the warnings); the exit code says the rest.")
def inspect(adapter: str, strict: bool, as_json: bool, quiet: bool, **flags: Any) -> None:
    """Show ADAPTER's per-module ranks, alphas and scales, the scale each runtime would apply, and lints.

    Reads only the config and tensor headers. With --base, it lists the base tensors each adapter
    module changes (after renaming between transformers' layouts or splitting MoE experts) and fails
    when the adapter changes nothing or was trained on another base; with --runtime, it fails when
    that runtime would leave expert or vision-tower modules out. Exit code: 0 when there is no error
    (and, with --strict, no warning), 1 otherwise.

    \b
    Examples:
      rslora-tools inspect my-adapter/
      rslora-tools inspect my-adapter/ --base base-model/ --runtime vllm --strict
      rslora-tools inspect my-adapter/ --runtime vllm@0.31.0 --runtime sglang
      rslora-tools inspect my-adapter/ --json | jq .groups
      rslora-tools inspect moe-adapter/ --base org/mixtral --runtime vllm --json | jq .applies_to
    """
    from ..commands.inspect import inspect_adapter

    report = inspect_adapter(adapter, options=o.options_from(InspectOptions, flags))
    if as_json:
        echo_json(report)
    elif quiet:
        for lint in report.lints:
            if lint.level == "error" or (strict and lint.level == "warning"):
                click.echo(f"{lint.level}: {lint.message} [{lint.code}]", err=True)
    else:
        _print_inspection(report)
    if report.errors or (strict and report.warnings):
        sys.exit(1)


def _print_inspection(report: Any) -> None:
    from ..adapter.scaling import convention_label

    cfg = f"r={report.r}, lora_alpha={report.lora_alpha:g}"
    if report.rank_pattern:
        cfg += f", rank_pattern={json.dumps(report.rank_pattern)}"
    if report.alpha_pattern:
        cfg += f", alpha_pattern={json.dumps(report.alpha_pattern)}"
    read_as = "mlx-lm adapter, read as PEFT's " if report.adapter_format == "mlx-lm" else ""
    click.echo(f"{report.adapter}: {read_as}{convention_label(report.convention, 'short')}; {cfg}")
    click.echo(f"  {len(report.modules)} LoRA modules; features: {', '.join(report.features) or 'plain LoRA'}")
    _print_runtime_table(report)
    if report.applies_to:
        _print_applies_to(report.applies_to)
    if report.base_format is not None:
        changed = sum(map(len, report.applies_to.values()))
        click.echo(
            f"  base format: {report.base_format}; {len(report.quantized_targets)} of the {changed} tensors the "
            "adapter changes are stored quantized (merge dequantizes them and writes them unquantized)"
        )
    if report.lints:
        click.echo()
    for lint in report.lints:
        click.echo(f"{lint.level}: {lint.message}" + (f" [{lint.code}]" if lint.level != "info" else ""))
    click.echo(f"\n{counted(report.errors, 'error')}, {counted(report.warnings, 'warning')}")


def _print_runtime_table(report: Any) -> None:
    """One row per group of modules: rank, alpha, PEFT's scale and each runtime's scale as a multiple of it."""
    runtime_names = [n for n in report.runtimes if n != "peft"]
    header = [
        "modules",
        "n",
        "layers",
        "rank",
        "alpha",
        "PEFT scale",
        *(report.runtimes[n]["label"] + (f"@{n.partition('@')[2]}" if "@" in n else "") for n in runtime_names),
    ]
    rows = [header]
    for g in report.groups:
        ratios = [_ratio(g["ratios"][n], report.runtimes[n]["status"]) for n in runtime_names]
        rows.append(
            [
                g["modules"],
                str(g["count"]),
                g["layers"] or "-",
                str(g["rank"]),
                f"{g['alpha']:g}",
                f"{g['scale']:.6g}",
                *ratios,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    click.echo()
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo(
        "  (runtime columns: the runtime's scale as a multiple of PEFT's; 'no' = cannot serve; releases: "
        + "; ".join(
            f"{report.runtimes[n]['label']}{'@' + n.partition('@')[2] if '@' in n else ''} "
            f"{report.runtimes[n]['version']}"
            for n in runtime_names
            if report.runtimes[n]["version"] != "all releases"
        )
        + ")"
    )


def _print_applies_to(applies_to: dict[str, list[str]], shown: int = 12) -> None:
    """Each adapter module and the base tensors it changes (after any renaming or expert split)."""
    click.echo(f"\n  applies to ({counted(sum(map(len, applies_to.values())), 'base tensor')}):")
    for module, tensors in list(applies_to.items())[:shown]:
        more = f" (+{len(tensors) - 1} more: {tensors[-1]})" if len(tensors) > 1 else ""
        click.echo(f"  {module} -> {tensors[0]}{more}")
    if len(applies_to) > shown:
        click.echo(f"  ... {len(applies_to) - shown} more modules (--json lists every one)")


def _ratio(ratio: float | None, status: str) -> str:
    if status == "cannot serve":
        return "no"
    if ratio is None:
        return "-"
    return "1x" if ratio == 1.0 else f"{ratio:.4g}x"
