"""Stage 7, CLI: the `rslora-tools` command line: parse, call the library, print. All click code lives here.

The CLI owns every progress bar (tqdm on stderr, quiet when stderr is not a terminal) and turns
library errors into one `Error: ...` line with exit code 1.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from . import __version__
from .combination import METHODS
from .errors import OutputInterrupted, RsloraError
from .scaling import convention_label
from .sizes import human_size, parse_size

DEBUG_ENV = "RSLORA_TOOLS_DEBUG"


class _Group(click.Group):
    """Maps library errors to one line `Error: ...` and exit 1; a traceback only with RSLORA_TOOLS_DEBUG=1."""

    def invoke(self, ctx: click.Context) -> Any:
        from .output import forget_written

        forget_written()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except RsloraError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException(_one_line(str(e))) from None
        except OutputInterrupted as e:
            _COMMAND["interrupted"] = True
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            _COMMAND["interrupted"] = True
            raise click.ClickException(_interrupted()) from None
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        except Exception as e:  # an unexpected failure: still one line, unless debugging
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException(
                f"unexpected {type(e).__name__}: {_one_line(str(e))} (set {DEBUG_ENV}=1 for a traceback)"
            ) from None
        finally:
            _COMMAND["finished"] = True


_COMMAND = {"finished": False, "interrupted": False}


def _interrupted() -> str:
    """What an interruption left: nothing, or an output already complete (replaced before the signal came)."""
    from .output import written_outputs

    done = written_outputs()
    if done:
        return f"interrupted after {done[-1]} was written completely; it holds the new output"
    return "interrupted; nothing was written"


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM: interrupt the command (which cleans up and says what is left); ignored once it is done."""
    if not _COMMAND["finished"]:
        _COMMAND["interrupted"] = True
        raise KeyboardInterrupt(f"signal {signum}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="rslora-tools")
def cli() -> None:
    """Merge, convert and inspect PEFT LoRA and rsLoRA adapters, exactly as PEFT does.

    \b
    Examples:
      rslora-tools merge base-model/ my-adapter/ merged/
      rslora-tools merge base-model/ my-adapter/ merged/ --dtype bf16 --max-shard-size 5GB
      rslora-tools convert my-adapter/ for-vllm/ --target vllm
      rslora-tools inspect my-adapter/ --base base-model/
      rslora-tools merge org/base org/adapter merged/ --push-to-hub me/merged
      rslora-tools verify merged/ base-model/ my-adapter/
    """


class _RuntimeSpec(click.ParamType):
    """A runtime name, optionally at a release (vllm@0.6.3); checked against the runtime table."""

    name = "runtime"

    def __init__(self, allow_unit: bool = False):
        self.allow_unit = allow_unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from .runtimes import runtime

        if self.allow_unit and value == "unit":
            return str(value)
        try:
            runtime(str(value))
        except RsloraError as e:
            self.fail(str(e), param, ctx)
        return str(value)


def _hub_push_options(f):
    """--push-to-hub and its companions, shared by merge and convert."""
    for option in reversed([
        click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Upload OUT to this Hub repo when done."),
        click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
        click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead of committing to main."),
        click.option("--commit-message", metavar="TEXT", help="With --push-to-hub: the commit message."),
    ]):
        f = option(f)
    return f


_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout.")
_overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
def _quant_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--trained-on and its BitsAndBytesConfig settings (merge and verify)."""
    f = click.option("--skip-modules", metavar="NAMES", default=None,
                     help="With --trained-on: modules transformers left unquantized, comma-separated, as "
                          "llm_int8_skip_modules (replaces the default, which keeps the output head).")(f)
    f = click.option("--quant-blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
                     default=None, help="With --trained-on nf4/fp4: the 4-bit block size [default: 64, "
                                        "bitsandbytes' and so BitsAndBytesConfig's].")(f)
    f = click.option("--double-quant/--no-double-quant", default=None,
                     help="With --trained-on nf4/fp4: bnb_4bit_use_double_quant [default: off, as in "
                          "BitsAndBytesConfig; most QLoRA recipes turn it on].")(f)
    return click.option("--trained-on", type=click.Choice(["nf4", "fp4", "int8"]), default=None,
                        help="The adapter was trained on BASE quantized this way (QLoRA): quantize the weights "
                             "transformers would, as bitsandbytes does, then merge. A quantized BASE is "
                             "dequantized without this.")(f)


def _initial_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--initial and --base-is-residual (merge and verify): PiSSA, OLoRA, CorDA and LoRA-GA adapters."""
    f = click.option("--base-is-residual", is_flag=True,
                     help="PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ: BASE is the residual base the adapter was trained on "
                          "(you saved it); merge as plain LoRA.")(f)
    return click.option("--initial", metavar="INIT",
                        help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved right after initialisation (folder or "
                             "Hub repo); merge into the original BASE.")(f)


def _initial_path(flags: dict[str, Any]) -> str | None:
    """--initial resolved to a local folder (a Hub repo is downloaded like ADAPTER)."""
    from .hub import resolve_input

    spec = flags.get("initial")
    if spec is None:
        return None
    return str(resolve_input(spec, role="adapter", token=flags.get("token"), allow_pickle=bool(flags.get("allow_pickle"))).path)


def _trained_on(flags: dict[str, Any]) -> Any:
    """The QuantScheme the --trained-on flags describe (None without --trained-on)."""
    from .quant_formats import trained_on_scheme

    args = _quant_arguments(flags)
    if args["trained_on"] is None:
        if any(args[k] is not None for k in ("double_quant", "quant_blocksize", "skip_modules")):
            raise click.UsageError("--double-quant, --quant-blocksize and --skip-modules describe --trained-on; pass it too")
        return None
    return trained_on_scheme(args.pop("trained_on"), double_quant=args["double_quant"],
                             blocksize=args["quant_blocksize"], skip_modules=args["skip_modules"])


def _quant_arguments(flags: dict[str, Any]) -> dict[str, Any]:
    """The library's keyword arguments for the --trained-on flags."""
    skip = flags.get("skip_modules")
    block = flags.get("quant_blocksize")
    return {"trained_on": flags.get("trained_on"), "double_quant": flags.get("double_quant"),
            "quant_blocksize": int(block) if block is not None else None,
            "skip_modules": [m.strip() for m in skip.split(",") if m.strip()] if skip is not None else None}



_allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Read an adapter that exists only as adapter_model.bin (torch.load weights_only=True; no code runs).")


def _input_revision_options(f):
    """--base-revision and --adapter-revision, for the commands that take BASE and ADAPTER."""
    f = click.option("--adapter-revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo.")(f)
    return click.option("--base-revision", metavar="REV", help="Branch, tag or commit of BASE when it is a Hub repo.")(f)


def _token_option(f):
    return click.option("--token", metavar="TOKEN", default=None,
                        help="Hugging Face token (default: HF_TOKEN or the stored login). Never printed.")(f)


def _push_target(flags: dict[str, Any], sources: Any) -> Any:
    """The --push-to-hub flags as a publish.PushTarget (None: no push), refused before any work when it names an
    input's own repo (publish.PushTarget.refuse_inputs)."""
    if not flags.get("push_to"):
        return None
    from .publish import PushTarget

    target = PushTarget(flags["push_to"], flags["private"], None, flags["create_pr"], flags["commit_message"],
                        flags["token"])
    target.refuse_inputs(sources)
    return target


def _push_after(out: str, target: Any, quiet: bool) -> dict[str, Any] | None:
    """Push OUT (complete on disk) when asked; a failure or Ctrl-C says so and how to push it later."""
    if target is None:
        return None
    from pathlib import Path

    from .publish import push_folder

    later = f"{out} is complete on disk; push it later with: rslora-tools push {out} {target.repo_id}"
    try:
        report = push_folder(Path(out), target)
    except RsloraError as e:
        raise type(e)(f"{e} ({later})") from e
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted during the push; {later}") from None
    if not quiet:
        _echo_push(report)
    return report.to_dict()


@contextmanager
def _progress(desc: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar on stderr (shown only on a terminal), as the `progress(n, total)` callback the library calls."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = _byte_bar(desc)
    try:
        yield lambda n, total: _advance(bar, n, total)
    finally:
        bar.close()


def _byte_bar(desc: str, position: int | None = None) -> Any:
    """A tqdm bar counting bytes on stderr, drawn only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=desc, position=position, file=sys.stderr,
                disable=None, dynamic_ncols=True)


def _advance(bar: Any, n: int, total: int) -> None:
    """Count `n` more bytes of `total` (the library says the total with each call; it may grow)."""
    if bar.total != total:
        bar.total = total
        bar.refresh()
    bar.update(n)


def _echo_push(report: Any) -> None:
    where = report.pr_url or report.commit_url
    card = ", model card written" if report.card_written else ""
    click.echo(f"Pushed {report.files} files to {report.repo_id}{card}: {where}", err=True)
    if report.removed:
        click.echo(f"  removed from the repo in the same commit (stale weight or adapter files): "
                   f"{', '.join(report.removed)}", err=True)


@cli.command()
@click.argument("base")
@click.argument("adapters", metavar="ADAPTER... OUT", nargs=-1, required=True)
@click.option("--weights", metavar="W1,W2,...",
              help="Several adapters: multiply each one's delta by its weight (PEFT's set_scale); default 1 each.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Dtype of the merged floating tensors; auto keeps the base's.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where deltas are computed. cpu: bit-exact with PEFT; cuda: every computed tensor on the GPU; "
                   "auto: the merge kernel where it applies, CUDA (when present) for the rest.")
@click.option("--max-shard-size", metavar="SIZE", default=None,
              help="Re-shard the output, e.g. 5GB (decimal, like transformers) or 2GiB. Default: keep the base's shards.")
@_overwrite_option
@_allow_pickle_option
@click.option("--dry-run", is_flag=True, help="Plan the merge and print it; write nothing.")
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary (errors still print).")
@_input_revision_options
@click.option("--verify", "verify_output", is_flag=True,
              help="Recompute and compare every merged tensor before OUT is replaced; fail on a mismatch.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge even if the adapter weights hold NaN or Inf.")
@_quant_options
@_initial_options
@_token_option
@_hub_push_options
@click.option("--stream", is_flag=True,
              help="With --push-to-hub: stream shard by shard from BASE to the Hub; OUT is omitted (every argument "
                   "after BASE is an adapter), the disk holds a few shards at a time.")
@click.option("--scratch", metavar="DIR", type=click.Path(file_okay=False),
              help="With --stream: the run works in DIR/rslora-tools-stream-ORG--NAME (default DIR "
                   "~/.cache/rslora-tools/stream), a folder of its own; a re-run "
                   "with the same one resumes.")
@click.option("--keep-cache", is_flag=True,
              help="With --stream: keep the downloaded base shards in the Hugging Face cache (default: delete them "
                   "after use; shards cached before are never deleted).")
@click.option("--no-resume", is_flag=True,
              help="With --stream: forget what an earlier run uploaded (its journal in the scratch folder) and start "
                   "over.")
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

    \b
    Examples:
      rslora-tools merge fixtures/tiny-llama fixtures/tiny-llama-rslora merged/
      rslora-tools merge base/ adapter/ merged/ --dtype bf16 --max-shard-size 5GB --json
      rslora-tools merge org/base org/adapter merged/ --push-to-hub me/merged
      rslora-tools merge auto org/adapter@v2 merged/
      rslora-tools merge org/base-bnb-4bit qlora-adapter/ merged/
      rslora-tools merge org/base qlora-adapter/ merged/ --trained-on nf4 --double-quant --dry-run
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
    from .hub import resolve_input, resolve_merge_inputs
    from .merging import merge as run_merge

    if flags["stream"] or flags["scratch"] or flags["keep_cache"] or flags["no_resume"]:
        _merge_streamed(base, adapters, flags)
        return
    if len(adapters) < 2:
        raise click.UsageError("missing argument OUT: merge BASE ADAPTER... OUT")
    *adapter_specs, out = adapters
    weights = _parse_weights(flags["weights"], len(adapter_specs))

    if flags["max_shard_size"] is not None:
        try:
            parse_size(flags["max_shard_size"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    base_source, adapter_source, hub_warnings = resolve_merge_inputs(
        base, adapter_specs[0], base_revision=flags["base_revision"], adapter_revision=flags["adapter_revision"],
        token=flags["token"], allow_pickle=flags["allow_pickle"],
    )
    more = [resolve_input(spec, role="adapter", token=flags["token"], allow_pickle=flags["allow_pickle"])
            for spec in adapter_specs[1:]]
    stacked: dict[str, Any] = {"adapters": [s.to_dict() for s in (adapter_source, *more)]} if more else {}
    sources = {"base": base_source.to_dict(), "adapter": adapter_source.to_dict(), **stacked}
    target = _push_target(flags, sources)
    with _progress("Merging", not (flags["quiet"] or flags["as_json"])) as progress:
        report = run_merge(
            base_source.path, [adapter_source.path, *(s.path for s in more)] if more else adapter_source.path, out,
            weights=weights, dtype=flags["dtype"], device=flags["device"],
            max_shard_size=flags["max_shard_size"], overwrite=flags["overwrite"], progress=progress,
            allow_pickle=flags["allow_pickle"], dry_run=flags["dry_run"],
            sources=sources, verify=flags["verify_output"], allow_nonfinite=flags["allow_nonfinite"], **_quant_arguments(flags),
            initial=_initial_path(flags), base_is_residual=flags["base_is_residual"],
        )
    for warning in hub_warnings + report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    _finish(report, _print_merge, out, target, flags["as_json"], flags["quiet"])


def _merge_streamed(base: str, adapter_specs: tuple[str, ...], flags: dict[str, Any]) -> None:
    """merge --stream: BASE and ADAPTER... to the Hub repo, shard by shard (streaming.py)."""
    from pathlib import Path

    from .errors import InputError
    from .hub import resolve_input, resolve_merge_inputs
    from .merging import merge_arguments
    from .publish import PushTarget
    from .streaming import StreamOptions, stream_merge

    if not flags["stream"]:
        raise InputError("--scratch, --keep-cache and --no-resume go with --stream")
    if not flags["push_to"]:
        raise InputError("--stream sends the merged model to the Hub: pass --push-to-hub REPO_ID (without --stream, "
                         "merge into OUT)")
    for flag, name in (("verify_output", "--verify"), ("overwrite", "--overwrite")):
        if flags[flag]:
            raise InputError(f"{name} does not go with --stream (no OUT is written); verify the pushed repo with "
                             "`rslora-tools verify` after downloading it")
    try:
        base_source, adapter_source, hub_warnings = resolve_merge_inputs(
            base, adapter_specs[0], base_revision=flags["base_revision"], adapter_revision=flags["adapter_revision"],
            token=flags["token"], allow_pickle=flags["allow_pickle"], base_shards=False)
        more = [resolve_input(spec, role="adapter", token=flags["token"], allow_pickle=flags["allow_pickle"])
                for spec in adapter_specs[1:]]
    except InputError as e:
        if not str(e).startswith(adapter_specs[-1]):
            raise
        raise InputError(f"{e} (with --stream there is no OUT: every argument after BASE is an adapter; --scratch DIR "
                         "names the scratch folder)") from e
    stacked: dict[str, Any] = {"adapters": [s.to_dict() for s in (adapter_source, *more)]} if more else {}
    adapter, options = merge_arguments(
        [adapter_source.path, *(s.path for s in more)] if more else adapter_source.path,
        weights=_parse_weights(flags["weights"], len(adapter_specs)), dtype=flags["dtype"], device=flags["device"],
        max_shard_size=flags["max_shard_size"], allow_pickle=flags["allow_pickle"], dry_run=flags["dry_run"],
        sources={"base": base_source.to_dict(), "adapter": adapter_source.to_dict(), **stacked},
        allow_nonfinite=flags["allow_nonfinite"], **_quant_arguments(flags), initial=_initial_path(flags),
        base_is_residual=flags["base_is_residual"])
    with _phase_progress(not (flags["quiet"] or flags["as_json"])) as progress:
        report = stream_merge(base_source, adapter, options, StreamOptions(
            PushTarget(flags["push_to"], flags["private"], None, flags["create_pr"], flags["commit_message"],
                       flags["token"]),
            Path(flags["scratch"]) if flags["scratch"] else None, flags["keep_cache"], progress, flags["no_resume"]))
    for warning in hub_warnings + report.merge.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if flags["as_json"]:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not flags["quiet"]:
        _print_merge(report.merge)
        _print_stream(report)


def _print_stream(report: Any) -> None:
    bound = f"disk: up to {human_size(report.disk_bound)} in {report.scratch} for a {human_size(report.model_bytes)} model"
    if report.free_bytes is not None:
        bound += f", {human_size(report.free_bytes)} free ({'fits' if report.disk_bound <= report.free_bytes else 'DOES NOT FIT'})"
    click.echo(f"  {bound}")
    for why, names in report.skipped.items():
        if names:
            click.echo(f"  skipped ({why.replace('_', ' ')}): {len(names)} shard(s): {', '.join(names[:3])}"
                       f"{', ...' if len(names) > 3 else ''}")
    if report.merge.dry_run:
        return
    rates = ", ".join(f"{phase} {human_size(p.bytes)} in {p.seconds:.1f} s" for phase, p in report.phases.items())
    click.echo(f"  streamed in {report.seconds:.1f} s ({rates})")
    push = report.push
    click.echo(f"Pushed {push['files']} files to {push['repo_id']} in one commit: {push['pr_url'] or push['commit_url']}",
               err=True)


@contextmanager
def _phase_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """One byte progress bar per phase (download, merge, upload) on stderr, shown only on a terminal."""
    if not enabled:
        yield None
        return
    bars = {phase: _byte_bar(f"{phase.capitalize():9}", i) for i, phase in enumerate(("download", "merge", "upload"))}
    try:
        yield lambda phase, n, total: _advance(bars[phase], n, total)
    finally:
        for bar in bars.values():
            bar.close()


def _parse_weights(text: str | None, count: int, *, several: bool = True) -> list[float] | None:
    """--weights W1,W2,...: one finite number per adapter (`several`: only with two adapters or more)."""
    from .errors import InputError

    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--weights {text!r} is not a comma-separated list of numbers") from None
    if several and count < 2:
        raise InputError("--weights goes with several adapters (to scale one adapter, convert it)")
    if len(weights) != count:
        raise InputError(f"--weights has {len(weights)} weights for {count} adapters")
    return weights


def _finish(report: Any, printer: Callable[[Any], None], out: str, push: Any, as_json: bool,
            quiet: bool) -> None:
    """Print the report (JSON or text), then push OUT when asked; with --json the push result is included."""
    if as_json:
        pushed = None if report.dry_run else _push_after(out, push, quiet=True)
        click.echo(json.dumps({**report.to_dict(), "push": pushed}, indent=2))
        if getattr(report, "unmatched", None):  # a dry run that found adapter tensors matching nothing
            sys.exit(1)
        return
    if not quiet:
        printer(report)
    if not report.dry_run:
        _push_after(out, push, quiet=quiet)


def _print_merge(report: Any) -> None:
    scale = "no LoRA modules"
    if report.scale_min is not None:
        scale = f"scale {report.scale_min:.6g}" if report.scale_min == report.scale_max else \
            f"scales {report.scale_min:.6g} to {report.scale_max:.6g}"
    verb = "Would merge" if report.dry_run else "Merged"
    conventions = " + ".join(convention_label(c, "short") for c in report.convention.split(","))
    what = f"{len(report.adapters)} adapters, " if len(report.adapters) > 1 else ""
    click.echo(f"{verb} {what}{report.modules} LoRA modules ({conventions}, {scale}) into {report.out}")
    click.echo(
        f"  tensors: {report.tensors_merged} changed, {report.tensors_copied} copied as is, {report.tensors_total} total; "
        f"{len(report.shards)} shard(s), {human_size(report.bytes_written)}, {report.dtype or 'no float'} on {report.device}"
        + ("" if report.dry_run else f", {report.seconds:.2f} s")
    )
    for key, value in report.config_updates.items():
        click.echo(f"  config.json: {key} removed" if value is None else f"  config.json: {key} = {json.dumps(value)}")
    for note in report.notes:
        click.echo(f"  note: {note}")
    measured = (report.quantization or {}).get("measured")
    if measured and measured["quant_error_over_delta"] is not None:
        click.echo(
            f"  quantization moved the weights by {measured['quant_error_over_weight']:.1%} of their norm, "
            f"{measured['quant_error_over_delta']:.2g}x the adapter's own delta ({measured['delta_over_weight']:.1%}); "
            f"median of {measured['tensors']} of {measured['of']} targeted weights; merging into the original weights "
            "would leave that out of the model the adapter was trained on")
    if report.verify is not None:
        v = report.verify
        click.echo(f"  verified: {v['verdict']} ({v['exact']} exact, {v['rounding']} within rounding, "
                   f"{v['tensors_checked']} tensors)")
    if report.dry_run:
        _print_dry_run(report)


_BY = {"kernel": "merge kernel", "torch": "torch", "copy": "copied from the adapter", "raw": "copied",
       "dequant": "dequantized with torch", "quant-kernel": "quantized and merged by the kernel"}


def _print_dry_run(report: Any) -> None:
    """The plan in detail: changes grouped over layers, unmatched adapter tensors, memory and disk."""
    from .inspection import layer_pattern

    groups: dict[tuple, list[dict]] = {}
    for change in report.changes:
        generic = layer_pattern(change["tensor"])
        groups.setdefault((generic, change["how"], change["scale"], change["by"]), []).append(change)
    click.echo("  changes:")
    for (generic, how, scale, by), items in groups.items():
        at = f" at scale {scale:.6g}" if scale is not None else ""
        count = f" (x{len(items)})" if len(items) > 1 else ""
        click.echo(f"    {generic}{count}: {how}{at} [{_BY[by]}]")
    click.echo(f"  copied as is: {report.tensors_copied} tensors")
    click.echo(f"  shards: {', '.join(report.shards[:4])}{', ...' if len(report.shards) > 4 else ''}")
    click.echo(f"  memory needed: about {human_size(report.memory_bytes)}")
    if report.free_bytes is not None:
        fits = "fits" if report.bytes_written <= report.free_bytes else "DOES NOT FIT"
        click.echo(f"  disk: writes {human_size(report.bytes_written)}, {human_size(report.free_bytes)} free ({fits})")
    for key in report.unmatched:
        click.echo(f"  matches nothing in the base: {key}")
    if report.unmatched:
        raise click.ClickException(
            f"{len(report.unmatched)} adapter tensor(s) match no base tensor; a merge would fail")


@cli.command()
@click.argument("adapter")
@click.argument("out", type=click.Path())
@click.option("--to-rslora", "to", flag_value="rslora", help="Rewrite to rsLoRA (alpha/sqrt(r)), same scales.")
@click.option("--to-classic", "to", flag_value="classic", help="Rewrite to classic LoRA (alpha/r), same scales.")
@click.option("--target", type=_RuntimeSpec(allow_unit=True), metavar="RUNTIME[@VERSION]",
              help="Produce an adapter that this runtime serves with PEFT's exact per-module scales: peft, vllm, tgi, "
                   "lorax, sglang, llama.cpp or unit; a release as vllm@0.6.3 (default: the current one).")
@click.option("--bake", is_flag=True, help="With --to-*: fold the scale change into lora_B instead of rewriting alphas.")
@click.option("--base", help="Base model folder or Hub repo; needed for --target llama.cpp with a .gguf OUT.")
@_overwrite_option
@_allow_pickle_option
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if the adapter weights hold NaN or Inf.")
@click.option("--initial", metavar="INIT",
              help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved right after initialisation (folder or Hub repo); "
                   "the result is a plain LoRA relative to the original base (rank 2r). Alone, or with --to-*/--target.")
@_token_option
@_hub_push_options
def convert(adapter: str, out: str, **flags: Any) -> None:
    """Convert ADAPTER into OUT so that it is served with PEFT's exact scale everywhere.

    --to-rslora / --to-classic rewrite the alphas (per module when ranks or alphas differ), so
    that PEFT computes bit-identical scales; the weights are copied byte for byte. --bake folds
    the change into lora_B instead. --target RUNTIME picks what that runtime's current release
    (or RUNTIME@VERSION's) needs: a no-op copy when it already applies PEFT's scales (today's
    vLLM does), a config rewrite when that suffices, or the unit-scale form (scale folded into
    lora_B in float32, alpha = r). Runtimes that cannot serve an adapter (DoRA or lora_bias on
    vLLM, modules_to_save on TGI, ...) are refused with the reason.

    PiSSA, OLoRA, CorDA and LoRA-GA adapters are relative to a residual base; --initial INIT
    turns them into a plain LoRA for the original base, with every module's scale exact
    (rsLoRA and rank/alpha patterns included), alone or before --to-*/--target.

    \b
    Examples:
      rslora-tools convert my-adapter/ my-adapter-classic/ --to-classic
      rslora-tools convert my-adapter/ for-vllm/ --target vllm
      rslora-tools convert my-adapter/ for-old-vllm/ --target vllm@0.6.3
      rslora-tools convert my-adapter/ adapter.gguf --target llama.cpp --base base-model/
      rslora-tools convert org/adapter for-sglang/ --target sglang --push-to-hub me/adapter-sglang
      rslora-tools convert pissa-trained/ plain-lora/ --initial pissa-init/
      rslora-tools convert pissa-trained/ for-vllm/ --initial pissa-init/ --target vllm
    """
    from .conversion import convert as run_convert
    from .hub import resolve_input

    to, target = flags["to"], flags["target"]
    if (to is not None and target is not None) or (to is None and target is None and flags["initial"] is None):
        raise click.UsageError("choose one of --to-rslora, --to-classic or --target RUNTIME (or --initial INIT alone)")
    if flags["bake"] and to is None:
        raise click.UsageError("--bake goes with --to-rslora or --to-classic (--target bakes when it must)")
    if flags["push_to"] and out.endswith(".gguf"):
        raise click.UsageError("--push-to-hub pushes a folder; push a .gguf file with: hf upload REPO FILE")
    source = resolve_input(adapter, role="adapter", revision=flags["revision"], token=flags["token"],
                           allow_pickle=flags["allow_pickle"])
    base = flags["base"]
    base_path = resolve_input(base, role="base", token=flags["token"]).path if base is not None else None
    initial = flags["initial"]
    initial_path = resolve_input(initial, role="adapter", token=flags["token"], allow_pickle=flags["allow_pickle"]).path \
        if initial is not None else None
    push_target = _push_target(flags, {"adapter": source.to_dict()})
    report = run_convert(source.path, out, to=to, target=target, bake=flags["bake"], base=base_path,
                         overwrite=flags["overwrite"], dry_run=flags["dry_run"], allow_pickle=flags["allow_pickle"],
                         source=source.to_dict(), allow_nonfinite=flags["allow_nonfinite"], initial=initial_path)
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    _finish(report, _print_convert, out, push_target, flags["as_json"], flags["quiet"])


def _print_convert(report: Any) -> None:
    verb = "Would write" if report.dry_run else "Wrote"
    click.echo(f"{verb} {report.out}: {report.message}")
    for key, (before, after) in report.config_changes.items():
        click.echo(f"  {key}: {json.dumps(before)} -> {json.dumps(after)}")
    if report.action == "initial" or (report.weights_changed and "relative to the original base" in report.message):
        click.echo(f"  weights: A' = [A; A0], B' = [B, -B0] ({report.weights_dtype or 'dtype kept'})")
    elif report.weights_changed:
        click.echo(f"  weights: scales folded into lora_B ({report.weights_dtype or 'dtype kept'})")
    elif report.action != "gguf":
        click.echo("  weights: unchanged (byte for byte)")


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rank", type=click.IntRange(min=1), metavar="R", help="A fixed rank for every module (default 16).")
@click.option("--energy", type=float, metavar="F", help="Per module, the smallest rank keeping this fraction of the "
              "delta's squared Frobenius norm (e.g. 0.9).")
@click.option("--max-error", type=float, metavar="E", help="Per module, the smallest rank with relative error <= E.")
@click.option("--rslora/--classic", default=True, show_default=True,
              help="Write use_rslora (alpha = sqrt(rank)) or classic LoRA (alpha = rank); scale 1 either way.")
@click.option("--alpha", type=float, metavar="A", help="Write lora_alpha = A instead; each module's scale is folded "
              "into its factors.")
@click.option("--target-modules", metavar="NAMES", help="Comma-separated module names (or name suffixes) to factorise; "
              "other changed tensors still go to modules_to_save.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the SVDs run.")
@click.option("--exact", is_flag=True, help="Always the full SVD (default: randomized above 512 columns, residual "
              "measured either way).")
@_overwrite_option
@click.option("--dry-run", is_flag=True, help="List the modules and the adapter's size from headers; write nothing.")
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@_token_option
@_hub_push_options
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
    from .extraction import extract as run_extract
    from .hub import resolve_input

    base_source = resolve_input(base, role="base", token=flags["token"])
    tuned_source = resolve_input(tuned, role="base", token=flags["token"])
    sources = {"base": base_source.to_dict(), "tuned": tuned_source.to_dict()}
    push_target = _push_target(flags, sources)
    targets = [t.strip() for t in flags["target_modules"].split(",") if t.strip()] if flags["target_modules"] else None
    with _progress("Extracting", not (flags["quiet"] or flags["as_json"] or flags["dry_run"])) as progress:
        report = run_extract(base_source.path, tuned_source.path, out, rank=flags["rank"], energy=flags["energy"],
                             max_error=flags["max_error"], rslora=flags["rslora"], alpha=flags["alpha"],
                             target_modules=targets, device=flags["device"], exact=flags["exact"],
                             overwrite=flags["overwrite"], dry_run=flags["dry_run"], progress=progress,
                             sources=sources)
    _finish(report, _print_extract, out, push_target, flags["as_json"], flags["quiet"])


def _print_extract(report: Any) -> None:
    verb = "Would write" if report.dry_run else "Wrote"
    ranks = sorted({m["rank"] for m in report.modules})
    rank_text = "no LoRA modules" if not ranks else (f"rank {ranks[0]}" if len(ranks) == 1 else
                                                    f"ranks {ranks[0]} to {ranks[-1]}")
    click.echo(f"{verb} {report.out}: {len(report.modules)} LoRA modules, {rank_text}, {human_size(report.bytes)}; "
               f"{convention_label(report.convention, 'short')}")
    if report.worst_error is not None:
        worst = max(report.modules, key=lambda m: m["relative_error"] or 0.0)
        click.echo(f"  largest relative error {report.worst_error:.3g} ({worst['name']}); {report.unchanged} unchanged "
                   "tensors skipped")
    if report.biases not in ("none", "unknown"):
        click.echo(f"  biases: {report.biases} ({len(report.bias_modules)} modules)")
    for module in report.modules_to_save:
        click.echo(f"  modules_to_save: {module}")
    for note in report.notes:
        click.echo(f"  note: {note}")


@cli.command()
@click.argument("adapters", metavar="ADAPTER... OUT", nargs=-1, required=True)
@click.option("--method", type=click.Choice(METHODS), default="cat", show_default=True,
              help="cat: the exact weighted sum (rank = sum of ranks); svd: its best rank-R approximation; the others "
                   "are PEFT's task-arithmetic methods on the factors (equal ranks per module).")
@click.option("--weights", metavar="W1,W2,...", help="One weight per adapter (default 1 each).")
@click.option("--rank", type=click.IntRange(min=1), metavar="R", help="svd: the output rank (default: the largest input "
              "rank).")
@click.option("--density", type=float, metavar="D", help="ties, dare_*, magnitude_prune: the fraction of values kept.")
@click.option("--seed", type=int, metavar="N", help="dare_*: the random masks' seed (default 0); same seed, same "
              "result.")
@click.option("--rslora", is_flag=True, help="Write the rsLoRA convention (alpha = sqrt(rank)) instead of classic "
              "(alpha = rank); every module's scale is 1 either way.")
@click.option("--target", type=_RuntimeSpec(allow_unit=True), metavar="RUNTIME[@VERSION]",
              help="Then convert the combined adapter for this runtime (as convert --target), in the same run.")
@_overwrite_option
@_allow_pickle_option
@click.option("--dry-run", is_flag=True, help="Plan the combination and print it; write nothing.")
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--allow-nonfinite", is_flag=True, help="Combine even if the adapter weights hold NaN or Inf.")
@_token_option
@_hub_push_options
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
    from .combining import combine as run_combine
    from .hub import resolve_input

    if len(adapters) < 2:
        raise click.UsageError("missing argument OUT: combine ADAPTER... OUT")
    *specs, out = adapters
    weights = _parse_weights(flags["weights"], len(specs), several=False)
    resolved = [resolve_input(spec, role="adapter", token=flags["token"], allow_pickle=flags["allow_pickle"])
                for spec in specs]
    push_target = _push_target(flags, {"adapters": [r.to_dict() for r in resolved]})
    with _progress("Combining", not (flags["quiet"] or flags["as_json"] or flags["dry_run"])) as progress:
        report = run_combine([r.path for r in resolved], out, weights=weights, method=flags["method"],
                             rank=flags["rank"], density=flags["density"], seed=flags["seed"], rslora=flags["rslora"],
                             target=flags["target"], overwrite=flags["overwrite"], dry_run=flags["dry_run"],
                             allow_pickle=flags["allow_pickle"], allow_nonfinite=flags["allow_nonfinite"],
                             progress=progress, sources=[r.to_dict() for r in resolved])
    for warning in report.warnings:
        click.echo(f"Warning: {warning}", err=True)
    _finish(report, _print_combine, out, push_target, flags["as_json"], flags["quiet"])


def _print_combine(report: Any) -> None:
    verb = "Would write" if report.dry_run else "Wrote"
    ranks = f"rank {report.rank_min}" if report.rank_min == report.rank_max else \
        f"ranks {report.rank_min} to {report.rank_max}"
    weights = ", ".join(f"{w:g}" for w in report.weights)
    click.echo(f"{verb} {report.out}: {len(report.adapters)} adapters combined by {report.method} (weights {weights}), "
               f"{len(report.modules)} modules, {ranks}, {human_size(report.bytes)}; "
               f"{convention_label(report.convention, 'short')} with scale 1")
    if report.worst_error is not None:
        worst = max(report.modules, key=lambda m: m["relative_error"] or 0.0)
        lowest = min(m["energy"] for m in report.modules if m["energy"] is not None)
        click.echo(f"  svd: energy kept >= {lowest:.6f}; largest relative error {report.worst_error:.3g} "
                   f"({worst['name']})")
    if report.converted is not None:
        click.echo(f"  then for {report.target}: {report.converted['message']}")


@cli.command()
@click.argument("adapter")
@click.option("--base", help="Also check the adapter against this base model (folder or Hub repo).")
@click.option("--runtime", "runtimes", multiple=True, type=_RuntimeSpec(), metavar="RUNTIME[@VERSION]",
              help="Runtime(s) you will serve with, e.g. vllm or vllm@0.6.3: their problems become warnings, and "
                   "their other releases are shown where they differ (repeatable).")
@click.option("--strict", is_flag=True, help="Exit 1 on warnings too (for CI pipelines).")
@_allow_pickle_option
@_json_option
@click.option("--revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo.")
@_token_option
def inspect(adapter: str, base: str | None, runtimes: tuple[str, ...], strict: bool, allow_pickle: bool,
            as_json: bool, revision: str | None, token: str | None) -> None:
    """Show ADAPTER's per-module ranks, alphas and scales, the scale each runtime would apply, and lints.

    Reads only the config and tensor headers. Exit code: 0 when there is no error (and, with
    --strict, no warning), 1 otherwise.

    \b
    Examples:
      rslora-tools inspect my-adapter/
      rslora-tools inspect my-adapter/ --base base-model/ --runtime vllm --strict
      rslora-tools inspect my-adapter/ --runtime vllm@0.31.0 --runtime sglang
      rslora-tools inspect my-adapter/ --json | jq .groups
    """
    from .hub import resolve_input
    from .inspection import inspect_adapter

    source = resolve_input(adapter, role="adapter", revision=revision, token=token, allow_pickle=allow_pickle)
    base_path = resolve_input(base, role="base", token=token).path if base is not None else None
    report = inspect_adapter(source.path, base=base_path, runtimes=list(runtimes), allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_inspection(report)
    if report.errors or (strict and report.warnings):
        sys.exit(1)


@cli.command()
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.argument("base")
@click.argument("adapters", metavar="ADAPTER...", nargs=-1, required=True)
@click.option("--weights", metavar="W1,W2,...", help="Several adapters: the weights the merge was given.")
@click.option("--sample", type=click.IntRange(min=1), metavar="N",
              help="Check only N tensors spread over the model (changed ones first), for a quick check.")
@_allow_pickle_option
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
@_input_revision_options
@_quant_options
@_initial_options
@_token_option
def verify(merged: str, base: str, adapters: tuple[str, ...], weights: str | None, sample: int | None,
           allow_pickle: bool, as_json: bool, quiet: bool, base_revision: str | None, adapter_revision: str | None,
           token: str | None, **quant_flags: Any) -> None:
    """Check that MERGED is BASE with ADAPTER merged: recompute every tensor and compare.

    Per tensor: exact (same bytes), within rounding (at most 1 ulp of the dtype off, e.g. a GPU
    merge), or a mismatch, with the max absolute and relative error. Also checks that the
    folder's index, shards, tensor names/shapes/dtypes and config.json agree. Exit code 1 on
    any mismatch beyond rounding.

    A quantized BASE is dequantized as the merge did; a merge made with --trained-on is
    recomputed the same way (from MERGED's rslora_tools.json, or the --trained-on flags).

    \b
    Examples:
      rslora-tools verify merged/ base-model/ my-adapter/
      rslora-tools verify merged/ org/base org/adapter --sample 20
      rslora-tools verify merged/ base-model/ qlora-adapter/ --trained-on nf4 --double-quant
      rslora-tools verify merged/ base-model/ task-a/ task-b/ --weights 0.7,0.4
    """
    from .hub import resolve_input, resolve_merge_inputs
    from .verification import recipe_text
    from .verification import verify as run_verify

    base_source, adapter_source, _ = resolve_merge_inputs(
        base, adapters[0], base_revision=base_revision, adapter_revision=adapter_revision, token=token,
        allow_pickle=allow_pickle)
    more = [resolve_input(spec, role="adapter", token=token, allow_pickle=allow_pickle).path for spec in adapters[1:]]
    adapter_arg: Any = [adapter_source.path, *more] if more else adapter_source.path
    with _progress("Verifying", not (quiet or as_json)) as progress:
        report = run_verify(merged, base_source.path, adapter_arg, weights=_parse_weights(weights, len(adapters)),
                            sample=sample,
                            allow_pickle=allow_pickle, progress=progress, trained_on=_trained_on(quant_flags),
                            initial=_initial_path({**quant_flags, "token": token, "allow_pickle": allow_pickle}),
                            base_is_residual=quant_flags["base_is_residual"])
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        if not quiet:
            for problem in report.problems:
                click.echo(f"problem: {problem}")
            for c in report.tensors:
                if c.status == "mismatch":
                    click.echo(f"mismatch: {c.name} ({c.dtype}): max abs error {c.max_abs_error:.3g}, "
                               f"max rel error {c.max_rel_error:.3g}, {c.max_ulps:.3g} ulp")
            worst = max(report.tensors, key=lambda c: c.max_ulps, default=None)
            if worst is not None and worst.status == "rounding":
                click.echo(f"largest rounding difference: {worst.name}: {worst.max_abs_error:.3g} "
                           f"({worst.max_ulps:.3g} ulp of {worst.dtype})")
        sampled = f" (sample of {report.tensors_total})" if report.sampled else ""
        recipe = report.recipe
        how = f"; recipe from {recipe['from']}: {recipe_text(recipe)}" if recipe.get("from") != "the arguments" else ""
        click.echo(f"{report.verdict.upper()}: {report.tensors_checked} tensors checked{sampled}: {report.exact} exact, "
                   f"{report.rounding} within rounding, {report.mismatched} mismatched, "
                   f"{len(report.problems)} folder problem(s); {report.seconds:.2f} s{how}")
        if recipe.get("note") and not quiet:
            click.echo(f"note: {recipe['note']}")
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created if needed) instead of main.")
@click.option("--commit-message", metavar="TEXT", help="The commit message.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@_token_option
@_json_option
def push(folder: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         create_pr: bool, token: str | None, as_json: bool) -> None:
    """Upload FOLDER (a merged model or converted adapter) to the Hub repo REPO_ID.

    Creates the repo if needed and uploads with huggingface_hub's upload_folder (re-run the same
    command to resume an interrupted upload), then checks that every local file is in the repo.
    When FOLDER has no README.md, a model card is generated from what rslora-tools recorded
    (base, adapter, convention, scales) and uploaded with it; FOLDER itself is not changed.

    \b
    Examples:
      rslora-tools push merged/ me/my-merged-model --private
      rslora-tools push for-vllm/ me/my-adapter-vllm --create-pr
    """
    from .publish import push as run_push

    report = run_push(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                      create_pr=create_pr, token=token)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _echo_push(report)


def _print_inspection(report: Any) -> None:
    cfg = f"r={report.r}, lora_alpha={report.lora_alpha:g}"
    if report.rank_pattern:
        cfg += f", rank_pattern={json.dumps(report.rank_pattern)}"
    if report.alpha_pattern:
        cfg += f", alpha_pattern={json.dumps(report.alpha_pattern)}"
    click.echo(f"{report.adapter}: {convention_label(report.convention, 'short')}; {cfg}")
    click.echo(f"  {len(report.modules)} LoRA modules; features: {', '.join(report.features) or 'plain LoRA'}")
    runtime_names = [n for n in report.runtimes if n != "peft"]
    header = ["modules", "n", "layers", "rank", "alpha", "PEFT scale",
              *(report.runtimes[n]["label"] + (f"@{n.partition('@')[2]}" if "@" in n else "") for n in runtime_names)]
    rows = [header]
    for g in report.groups:
        ratios = [_ratio(g["ratios"][n], report.runtimes[n]["status"]) for n in runtime_names]
        rows.append([g["modules"], str(g["count"]), g["layers"] or "-", str(g["rank"]), f"{g['alpha']:g}",
                     f"{g['scale']:.6g}", *ratios])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    click.echo()
    for row in rows:
        click.echo("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    click.echo("  (runtime columns: the runtime's scale as a multiple of PEFT's; 'no' = cannot serve; releases: "
               + "; ".join(f"{report.runtimes[n]['label']}{'@' + n.partition('@')[2] if '@' in n else ''} "
                           f"{report.runtimes[n]['version']}" for n in runtime_names if report.runtimes[n]["version"]
                           != "all releases") + ")")
    if report.lints:
        click.echo()
    for lint in report.lints:
        click.echo(f"{lint.level}: {lint.message}" + (f" [{lint.code}]" if lint.level != "info" else ""))
    click.echo(f"\n{report.errors} error(s), {report.warnings} warning(s)")


def _ratio(ratio: float | None, status: str) -> str:
    if status == "cannot serve":
        return "no"
    if ratio is None:
        return "-"
    return "1x" if ratio == 1.0 else f"{ratio:.4g}x"


def main() -> None:
    # Worker threads copy and write while torch computes: idle OpenMP workers must sleep rather
    # than spin, or they take the CPU the other workers need. Read once, when torch first loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A short-lived process that allocates few cyclic objects: reference counting frees them;
    # the cyclic collector would only rescan torch's import graph (when loaded) again and again.
    gc.disable()
    _return_freed_memory()
    # SIGTERM interrupts like Ctrl-C, and neither interrupts the exit once the command has finished
    # (its message is already true then).
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        cli(prog_name="rslora-tools")
    except SystemExit as e:
        _exit_now_if_workers_run(e.code)
        raise
    finally:  # the command is over: a signal now must not kill the exit (Python restores SIG_DFL when it shuts down)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_now_if_workers_run(code: object) -> None:
    """After an interruption, exit without Python's shutdown: a worker, or a thread torch runs for it, may still be
    inside a long torch operation (a second signal can cut the wait for them short).

    Python's shutdown would otherwise tear down the interpreter under that thread, which aborts
    the process ("terminate called without an active exception"). The output was cleaned up
    already and the message printed.
    """
    import threading

    workers = any(t.name.startswith("rslora-tools-") and t.is_alive() for t in threading.enumerate())
    if workers or _COMMAND["interrupted"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def _return_freed_memory() -> None:
    """glibc: serve every allocation of 128 KiB or more with its own mapping, given back on free.

    By default glibc raises that threshold after the first such free, and later blocks (a
    merge's row blocks and fp32 factors) then come from heaps that keep what was freed, so
    peak memory drifts from run to run. A fixed threshold keeps it at what is really in use.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


if __name__ == "__main__":
    main()
