"""`rslora-tools convert`: its flags, their mapping to ConvertOptions, and its printer."""

from __future__ import annotations

import json
from typing import Any

import click

from ..commands.convert import ConvertOptions
from . import options as o
from .app import cli
from .render import echo_warnings, finish


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@o.flags_from(ConvertOptions, verb="Convert")
@o.json_option
@o.quiet_option()
def convert(adapter: str, out: str, **flags: Any) -> None:
    """Convert ADAPTER into OUT so that it is served with PEFT's exact scale everywhere.

    --to-rslora / --to-classic rewrite the alphas (per module when ranks or alphas differ), so
    that PEFT computes bit-identical scales; the weights are copied byte for byte. --bake folds
    the change into lora_B instead. --target RUNTIME picks what that runtime's current release
    (or RUNTIME@VERSION's) needs: a no-op copy when it already applies PEFT's scales (today's
    vLLM does), a config rewrite when that suffices, or the unit-scale form (scale folded into
    lora_B in float32, alpha = r). Runtimes that cannot serve an adapter (DoRA or lora_bias on
    vLLM, modules_to_save on TGI, ...) are refused with the reason. --target mlx writes
    mlx-lm's format; an mlx-lm adapter is accepted as ADAPTER too.

    PiSSA, OLoRA, CorDA and LoRA-GA adapters are relative to a residual base; --initial INIT
    turns them into a plain LoRA for the original base, with every module's scale exact
    (rsLoRA and rank/alpha patterns included), alone or before --to-*/--target.

    \b
    Examples:
      rslora-tools convert my-adapter/ my-adapter-classic/ --to-classic
      rslora-tools convert my-adapter/ for-vllm/ --target vllm
      rslora-tools convert my-adapter/ for-old-vllm/ --target vllm@0.6.3
      rslora-tools convert my-adapter/ adapter.gguf --target llama.cpp --base base-model/
      rslora-tools convert my-adapter/ for-mlx/ --target mlx
      rslora-tools convert mlx-adapter/ for-vllm/ --target vllm
      rslora-tools convert org/adapter for-sglang/ --target sglang --push-to-hub me/adapter-sglang
      rslora-tools convert pissa-trained/ plain-lora/ --initial pissa-init/
      rslora-tools convert pissa-trained/ for-vllm/ --initial pissa-init/ --target vllm
      rslora-tools convert moe-adapter/ per-expert/ --expert-layout per-expert --base org/mixtral
      rslora-tools convert vl-adapter/ renamed/ --key-layout base --base org/qwen2-vl
    """
    from ..commands.convert import convert as run_convert

    report = run_convert(adapter, out, options=convert_options(flags))
    echo_warnings(report.warnings)
    finish(report, _print_convert, flags["as_json"], flags["quiet"])


def convert_options(flags: dict[str, Any]) -> ConvertOptions:
    """The convert flags as ConvertOptions (their values are checked there)."""
    return o.options_from(ConvertOptions, flags)


def _print_convert(report: Any) -> None:
    verb = "Would write" if report.dry_run else "Wrote"
    click.echo(f"{verb} {report.out}: {report.message}")
    for key, (before, after) in report.config_changes.items():
        click.echo(f"  {key}: {json.dumps(before)} -> {json.dumps(after)}")
    if report.action == "mlx":
        click.echo(
            f"  weights: lora_a = A^T, lora_b = B^T in mlx-lm's adapters.safetensors "
            f"({report.weights_dtype or 'dtype kept'})"
        )
    elif report.source_format == "mlx-lm" and report.action in ("copy", "config"):
        click.echo("  weights: lora_A = lora_a^T, lora_B = lora_b^T (the same values)")
    elif report.action == "relayout":
        how = "rearranged" if "expert layout" in report.target else "renamed"
        click.echo(f"  weights: the same values, {how} (every module keeps its scale)")
    elif report.action == "initial" or (report.weights_changed and report.relative_form is not None):
        click.echo(f"  weights: A' = [A; A0], B' = [B, -B0] ({report.weights_dtype or 'dtype kept'})")
    elif report.weights_changed:
        click.echo(f"  weights: scales folded into lora_B ({report.weights_dtype or 'dtype kept'})")
    elif report.action != "gguf":
        click.echo("  weights: unchanged (byte for byte)")
