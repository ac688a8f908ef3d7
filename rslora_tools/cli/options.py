"""The click options several commands share, and the one mapping of each of them to the library's options.

A command module declares its own flags and maps all of them to its options object in one
function; the flags that several commands share are declared here once, with the mapping of
their values (`push_target`, `trained_on`, `weights`). Every check of a value is the options
object's (an OptionError is a usage error, exit 2); what is checked here is only what no
options object can see: a flag given without the flag it qualifies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..errors import OptionError, RsloraError, cli_message

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class RuntimeSpec(click.ParamType):
    """A runtime name, optionally at a release (vllm@0.6.3); checked against the runtime table."""

    name = "runtime"

    def __init__(self, allow_unit: bool = False):
        self.allow_unit = allow_unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ..adapter.runtimes import runtime

        if self.allow_unit and value == "unit":
            return str(value)
        try:
            runtime(str(value))
        except RsloraError as e:
            self.fail(cli_message(e), param, ctx)
        return str(value)


def stack(*decorators: Decorator) -> Decorator:
    """Several click decorators as one, applied in the order listed (the first is the outermost)."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout.")
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace OUT if rslora-tools wrote it (an earlier output); other folders and "
                                      "files are never replaced.")
allow_pickle_option = click.option(
    "--allow-pickle", is_flag=True,
    help="Read an adapter that exists only as adapter_model.bin (torch.load weights_only=True; no code runs).")
token_option = click.option("--token", metavar="TOKEN", default=None,
                            help="Hugging Face token (default: HF_TOKEN or the stored login). Never printed.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Plan and print what would be done; write nothing.")


def quiet_option(what: str = "Print nothing on success.") -> Decorator:
    return click.option("-q", "--quiet", is_flag=True, help=what)


def allow_nonfinite_option(what: str) -> Decorator:
    return click.option("--allow-nonfinite", is_flag=True, help=f"{what} even if the weights hold NaN or Inf.")


push_options = stack(
    click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Upload OUT to this Hub repo when done."),
    click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
    click.option("--create-pr", is_flag=True, help="With --push-to-hub: open a pull request instead of committing to "
                                                   "main."),
    click.option("--commit-message", metavar="TEXT", help="With --push-to-hub: the commit message."),
)

input_revision_options = stack(
    click.option("--base-revision", metavar="REV", help="Branch, tag or commit of BASE when it is a Hub repo."),
    click.option("--adapter-revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo."),
)

trained_on_options = stack(
    click.option("--trained-on", type=click.Choice(["nf4", "fp4", "int8"]), default=None,
                 help="The adapter was trained on BASE quantized this way (QLoRA): quantize the weights transformers "
                      "would, as bitsandbytes does, then merge. A quantized BASE is dequantized without this."),
    click.option("--double-quant/--no-double-quant", default=None,
                 help="With --trained-on nf4/fp4: bnb_4bit_use_double_quant [default: off, as in BitsAndBytesConfig; "
                      "most QLoRA recipes turn it on]."),
    click.option("--quant-blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
                 default=None, help="With --trained-on nf4/fp4: the 4-bit block size [default: 64, bitsandbytes' and "
                                    "so BitsAndBytesConfig's]."),
    click.option("--skip-modules", metavar="NAMES", default=None,
                 help="With --trained-on: modules transformers left unquantized, comma-separated, as "
                      "llm_int8_skip_modules (replaces the default, which keeps the output head)."),
)

initial_options = stack(
    click.option("--initial", metavar="INIT",
                 help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved right after initialisation (folder or Hub repo); "
                      "merge into the original BASE."),
    click.option("--base-is-residual", is_flag=True,
                 help="PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ: BASE is the residual base the adapter was trained on (you "
                      "saved it); merge as plain LoRA."),
)


def push_target(flags: dict[str, Any]) -> Any:
    """The --push-to-hub flags as a hub.push.PushTarget (None without --push-to-hub)."""
    if not flags.get("push_to"):
        given = [name for name, key in (("--private", "private"), ("--create-pr", "create_pr"),
                                        ("--commit-message", "commit_message")) if flags.get(key)]
        if given:
            raise OptionError(f"{given[0]} goes with --push-to-hub REPO_ID")
        return None
    from ..hub.push import PushTarget  # imported only when a command pushes

    return PushTarget(flags["push_to"], flags["private"], None, flags["create_pr"], flags["commit_message"],
                      flags.get("token"))


def trained_on(flags: dict[str, Any]) -> Any:
    """The formats.quant.QuantScheme the --trained-on flags describe (None without --trained-on)."""
    from ..errors import InputError
    from ..formats.quant import trained_on_scheme

    block, skip = flags.get("quant_blocksize"), flags.get("skip_modules")
    if flags.get("trained_on") is None:
        if any(flags.get(k) is not None for k in ("double_quant", "quant_blocksize", "skip_modules")):
            raise OptionError("--double-quant, --quant-blocksize and --skip-modules describe --trained-on; pass it too")
        return None
    try:
        return trained_on_scheme(flags["trained_on"], double_quant=flags.get("double_quant"),
                                 blocksize=int(block) if block is not None else None,
                                 skip_modules=[m.strip() for m in skip.split(",") if m.strip()] if skip else None)
    except InputError as e:
        raise OptionError(cli_message(e)) from None


def weights(text: str | None) -> tuple[float, ...] | None:
    """--weights W1,W2,...: one number per adapter (their count is the options object's to check)."""
    from ..execute.options import parse_weights

    return None if text is None else parse_weights(text)


def names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names (--target-modules)."""
    if text is None:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())
