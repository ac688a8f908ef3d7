"""`rslora-tools merge`: its flags, their mapping to MergeOptions, and its printers (the merge, the dry run, the
stream)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from ..execute.gguf_model import DEFAULT_OUTTYPE
from ..execute.options import MergeOptions
from ..formats.sizes import human_size
from ..reporting import counted
from . import options as o
from .app import cli
from .progress import byte_progress, phase_progress
from .render import echo_warnings, finish


@cli.command()
@click.argument("base")
@click.argument("adapters", metavar="ADAPTER... OUT", nargs=-1, required=True)
@o.flags_from(MergeOptions, verb="Merge")
@o.json_option
@o.quiet_option("No progress bar and no summary (errors still print).")
def merge(base: str, adapters: tuple[str, ...], **flags: Any) -> None:
    """Merge ADAPTER into BASE and write the merged model to OUT.

    The result equals PEFT's merge_and_unload() bit for bit on CPU, for classic LoRA and rsLoRA,
    rank/alpha patterns, DoRA, embedding and convolution LoRA, GPT-2 Conv1D, lora_bias,
    modules_to_save and trainable tokens, without loading the model: tensors stream one at a
    time, untouched ones are copied as raw bytes. OUT keeps the base's shards, config, tokenizer
    and generation config (the adapter's tokenizer wins when it has one).

    BASE and ADAPTER are local folders or Hub repos (org/name, org/name@revision, hf://org/name);
    BASE may be `auto`: the base the adapter records. Only what the merge reads is downloaded.

    Several adapters (ADAPTER1 ADAPTER2 ... OUT) are merged one after another in one pass, each
    with its own convention, patterns and DoRA, exactly as PEFT's stacked merge
    (merge_and_unload(adapter_names=[...])); --weights scales each one's delta. Two adapters that
    replace the same tensor (modules_to_save, trainable tokens) are refused.

    PiSSA, OLoRA, CorDA and LoRA-GA adapters were trained on a residual base: --initial INIT
    merges them into the original BASE, --base-is-residual into a residual BASE you saved.

    QLoRA: a bitsandbytes (4-bit, 8-bit), GPTQ or AWQ BASE is dequantized exactly as its library
    does and merged in the compute dtype; with an unquantized BASE, --trained-on quantizes the
    weights as they were in training first (the model the adapter learned to correct).
    Block-scaled FP8 (DeepSeek-V3, Qwen3-FP8), MXFP4 (gpt-oss) and compressed-tensors (FP8,
    INT4/INT8, NVFP4) bases are dequantized as transformers loads them and written unquantized; with
    --keep-quantization the changed weights are quantized back into the base's format instead.

    An OUT ending in .gguf is one llama.cpp file, written by llama.cpp's own converter (--llama-cpp
    DIR) from the merged tensors as they are computed: no 16-bit folder on disk, and the same bytes
    as convert_hf_to_gguf.py on the merged folder (--outtype as its).

    \b
    Examples:
      rslora-tools merge fixtures/tiny-llama fixtures/tiny-llama-rslora merged/
      rslora-tools merge base/ adapter/ merged/ --dtype bf16 --max-shard-size 5GB --json
      rslora-tools merge org/base org/adapter merged/ --push-to-hub me/merged
      rslora-tools merge auto org/adapter@v2 merged/
      rslora-tools merge org/base-bnb-4bit qlora-adapter/ merged/
      rslora-tools merge org/base qlora-adapter/ merged/ --trained-on nf4 --double-quant --dry-run
      rslora-tools merge org/base-fp8 adapter/ merged-fp8/ --keep-quantization
      rslora-tools merge org/base adapter/ merged.gguf --outtype q8_0 --llama-cpp ~/llama.cpp
      rslora-tools merge org/base pissa-trained/ merged/ --initial pissa-init/
      rslora-tools merge org/base domain-adapter/ chat-adapter/ merged/
      rslora-tools merge org/base task-a/ task-b/ merged/ --weights 0.7,0.4
      rslora-tools merge org/base-70b org/adapter --push-to-hub me/merged-70b --stream
      rslora-tools merge org/base-70b org/adapter --push-to-hub me/merged-70b --stream --dry-run

    Big models, small disks: --stream --push-to-hub downloads the base's shards one or two
    ahead of the merge, uploads each merged shard as soon as it is complete and deletes it,
    and makes one commit with the whole model at the end (a PR with --create-pr). The dry run
    prints the disk bound. Re-running the same command after a failure or Ctrl-C resumes: shards
    already uploaded are not made again.
    """
    from ..commands.merge import merge as run_merge

    quiet, as_json = flags["quiet"], flags["as_json"]
    if flags["stream"]:
        out = adapters[-1] if adapters and adapters[-1].endswith(".gguf") else None  # else: to the Hub, no OUT
        if out is not None and flags["outtype"] is None:
            flags["outtype"] = DEFAULT_OUTTYPE  # named: MergeOptions refuses a stream with no destination
        with phase_progress(not (quiet or as_json)) as phases:
            report = run_merge(
                base, list(adapters[:-1] if out else adapters), out, options=merge_options(flags, phases)
            )
    else:
        options = merge_options(flags, None)
        if len(adapters) < 2:
            raise click.UsageError("missing argument OUT: merge BASE ADAPTER... OUT")
        with byte_progress("Merging", not (quiet or as_json)) as progress:
            report = run_merge(base, list(adapters[:-1]), adapters[-1], options=options, progress=progress)
    echo_warnings(report.warnings)
    finish(report, _print_report, as_json, quiet)
    if report.unmatched:  # a dry run that found adapter tensors matching nothing: a merge would fail
        raise click.ClickException(
            f"{len(report.unmatched)} of the adapter's tensors match no base tensor; a merge would fail"
        )


def merge_options(flags: dict[str, Any], progress: Any) -> MergeOptions:
    """The merge flags as MergeOptions (their values are checked there), a stream's progress added."""
    options = o.options_from(MergeOptions, flags)
    if options.stream is not None and progress is not None:
        options = dataclasses.replace(options, stream=dataclasses.replace(options.stream, progress=progress))
    return options


def _print_report(report: Any) -> None:
    _print_merge(report)
    if report.dry_run:
        _print_dry_run(report)
    if hasattr(report, "disk_bound"):
        _print_stream(report)


def _print_merge(report: Any) -> None:
    from ..adapter.scaling import convention_label

    scale = "no LoRA modules"
    if report.scale_min is not None:
        scale = (
            f"scale {report.scale_min:.6g}"
            if report.scale_min == report.scale_max
            else f"scales {report.scale_min:.6g} to {report.scale_max:.6g}"
        )
    verb = "Would merge" if report.dry_run else "Merged"
    conventions = " + ".join(convention_label(c, "short") for c in report.convention.split(","))
    what = f"{len(report.adapters)} adapters, " if len(report.adapters) > 1 else ""
    click.echo(f"{verb} {what}{report.modules} LoRA modules ({conventions}, {scale}) into {report.out}")
    click.echo(
        f"  tensors: {report.tensors_merged} changed, {report.tensors_copied} copied as is, {report.tensors_total} "
        f"total; "
        f"{counted(len(report.shards), 'shard')}, {human_size(report.bytes_written)}, {report.dtype or 'no float'} "
        f"on {report.device}" + ("" if report.dry_run else f", {report.seconds:.2f} s")
    )
    for key, value in report.config_updates.items():
        click.echo(f"  config.json: {key} removed" if value is None else f"  config.json: {key} = {json.dumps(value)}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    _print_quantization(report.quantization or {})
    if report.gguf is not None:
        click.echo(f"  gguf: {report.gguf['outtype']}, written by llama.cpp's converter in {report.gguf['llama_cpp']}")
        click.echo(f"  {report.gguf['next_step']}")
    if report.verify is not None:
        v = report.verify
        click.echo(
            f"  verified: {v['verdict']} ({v['exact']} exact, {v['rounding']} within rounding, "
            f"{v['tensors_checked']} tensors)"
        )


def _print_quantization(quantization: dict[str, Any]) -> None:
    """The measured quantization error: of the base weights (--trained-on), or of the merged weights quantized back."""
    measured = quantization.get("measured")
    if not measured or measured["quant_error_over_delta"] is None:
        return
    of = f"median of {measured['tensors']} of {measured['of']} targeted weights"
    delta = f"the adapter's own delta (which is {measured['delta_over_weight']:.1%} of their norm)"
    if quantization.get("mode") == "as trained":
        click.echo(
            f"  quantization moved the weights by {measured['quant_error_over_weight']:.1%} of their norm, "
            f"{measured['quant_error_over_delta']:.2g}x {delta}; {of}; merging into the original weights "
            "would leave that out of the model the adapter was trained on"
        )
        return
    verb = "moved" if quantization.get("mode") == "kept" else "would move"
    worst = measured["quant_error_over_delta_max"]
    click.echo(
        f"  requantizing the merged weights into the base's format {verb} them by "
        f"{measured['quant_error_over_weight']:.2%} of their norm, {measured['quant_error_over_delta']:.2g}x {delta}"
        f" (worst {worst:.2g}x); {of}"
        + ("; above 1x, rounding hides much of the adapter's change" if worst > 1 else "")
    )


def _print_dry_run(report: Any) -> None:
    """The plan in detail: changes grouped over layers, unmatched adapter tensors, memory and disk."""
    from ..commands.inspect import layer_pattern
    from ..execute.lowering import StepKind

    groups: dict[tuple, list[dict]] = {}
    for change in report.changes:
        generic = layer_pattern(change["tensor"])
        groups.setdefault((generic, change["how"], change["scale"], change["by"]), []).append(change)
    click.echo("  changes:")
    for (generic, how, scale, by), items in groups.items():
        at = f" at scale {scale:.6g}" if scale is not None else ""
        count = f" (x{len(items)})" if len(items) > 1 else ""
        click.echo(f"    {generic}{count}: {how}{at} [{StepKind.of(by).description}]")
    click.echo(f"  copied as is: {report.tensors_copied} tensors")
    click.echo(f"  shards: {', '.join(report.shards[:4])}{', ...' if len(report.shards) > 4 else ''}")
    click.echo(f"  memory needed: about {human_size(report.memory_bytes)}")
    if report.free_bytes is not None and not hasattr(report, "disk_bound"):
        fits = "fits" if report.bytes_written <= report.free_bytes else "DOES NOT FIT"
        click.echo(f"  disk: writes {human_size(report.bytes_written)}, {human_size(report.free_bytes)} free ({fits})")
    for key in report.unmatched:
        click.echo(f"  matches nothing in the base: {key}")


def _print_stream(report: Any) -> None:
    bound = (
        f"disk: up to {human_size(report.disk_bound)} in {report.scratch} for a {human_size(report.model_bytes)} model"
    )
    if report.free_bytes is not None:
        bound += (
            f", {human_size(report.free_bytes)} free "
            f"({'fits' if report.disk_bound <= report.free_bytes else 'DOES NOT FIT'})"
        )
    click.echo(f"  {bound}")
    for why, names in report.skipped.items():
        if names:
            click.echo(
                f"  skipped ({why.replace('_', ' ')}): {counted(len(names), 'shard')}: {', '.join(names[:3])}"
                f"{', ...' if len(names) > 3 else ''}"
            )
    if report.dry_run:
        return
    rates = ", ".join(f"{phase} {human_size(p.bytes)} in {p.seconds:.1f} s" for phase, p in report.phases.items())
    click.echo(f"  streamed in {report.seconds:.1f} s ({rates})")
