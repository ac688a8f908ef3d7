"""The click options of every command, generated from its options object's fields, and the mapping back.

Each flag is declared once, on the field it sets (rslora_tools/flags.py: `option(default,
Flag(...))`); `flags_from(Options)` makes the click options and `options_from(Options, flags)` the
options object, a field that several flags make up built by its entry in `BUILDERS`
(`push_target`, `trained_on`, `stream`, ...). The CLI's own flags (`--json`, `--quiet`) are here.
Every check of a value is the options object's (an OptionError is a usage error, exit 2); what is
checked here is only what no options object can see: a flag given without the flag it qualifies.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..errors import OptionError, RsloraError, marked_message
from ..flags import Flag, dest, flags_of

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
T = TypeVar("T")


class RuntimeSpec(click.ParamType):
    """A runtime name, optionally at a release (vllm@0.6.3); checked against the runtime table."""

    name = "runtime"

    def __init__(self, allow_unit: bool = False):
        self.allow_unit = allow_unit

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from ..adapter.runtimes import runtime
        from .words import error_as_flags

        if self.allow_unit and value == "unit":
            return str(value)
        try:
            runtime(str(value))
        except RsloraError as e:
            self.fail(error_as_flags(e), param, ctx)
        return str(value)


def stack(*decorators: Decorator) -> Decorator:
    """Several click decorators as one, applied in the order listed (the first is the outermost)."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# The CLI's own flags: how a report is shown (every other flag is generated from an options field, below).
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout."
)


def quiet_option(what: str = "Print nothing on success.") -> Decorator:
    return click.option("-q", "--quiet", is_flag=True, help=what)


def push_target(flags: dict[str, Any]) -> Any:
    """The --push-to-hub flags as a hub.target.PushTarget (None without --push-to-hub)."""
    if not flags.get("push_to"):
        given = [
            name
            for name, key in (
                ("--private", "private"),
                ("--create-pr", "create_pr"),
                ("--commit-message", "commit_message"),
            )
            if flags.get(key)
        ]
        if given:
            raise OptionError(f"{given[0]} goes with --push-to-hub REPO_ID", options=("push",))
        return None
    from ..hub.target import PushTarget

    return PushTarget(
        flags["push_to"], flags["private"], None, flags["create_pr"], flags["commit_message"], flags.get("token")
    )


def trained_on(flags: dict[str, Any]) -> Any:
    """The formats.quant.QuantScheme the --trained-on flags describe (None without --trained-on)."""
    from ..errors import InputError
    from ..formats.quant import trained_on_scheme

    block, skip = flags.get("quant_blocksize"), flags.get("skip_modules")
    if flags.get("trained_on") is None:
        if any(flags.get(k) is not None for k in ("double_quant", "quant_blocksize", "skip_modules")):
            raise OptionError(
                "--double-quant, --quant-blocksize and --skip-modules describe --trained-on; pass it too",
                options=("trained_on",),
            )
        return None
    try:
        return trained_on_scheme(
            flags["trained_on"],
            double_quant=flags.get("double_quant"),
            blocksize=int(block) if block is not None else None,
            skip_modules=[m.strip() for m in skip.split(",") if m.strip()] if skip else None,
        )
    except InputError as e:
        raise OptionError(marked_message(e), options=("trained_on",)) from None


def weights(text: str | None) -> tuple[float, ...] | None:
    """--weights W1,W2,...: one number per adapter (their count is the options object's to check)."""
    from ..execute.options import parse_weights

    return None if text is None else parse_weights(text)


def stream(flags: dict[str, Any]) -> Any:
    """--stream and the flags that describe it as execute.options.StreamOptions (None without --stream); the command
    adds its progress."""
    from ..execute.options import StreamOptions

    if flags["stream"]:
        return StreamOptions(
            Path(flags["scratch"]) if flags["scratch"] else None, flags["keep_cache"], flags["no_resume"]
        )
    if flags["scratch"] or flags["keep_cache"] or flags["no_resume"]:
        raise OptionError("--scratch, --keep-cache and --no-resume go with --stream", options=("stream",))
    return None


def to(flags: dict[str, Any]) -> str | None:
    """--to-rslora / --to-classic as the convention to rewrite to (None: neither)."""
    if flags["to_rslora"] and flags["to_classic"]:
        raise OptionError("--to-rslora and --to-classic exclude each other", options=("to",))
    return "rslora" if flags["to_rslora"] else "classic" if flags["to_classic"] else None


def names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated list of names (--target-modules)."""
    if text is None:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


# A field that several flags make up, or whose flag's text the options object does not parse: its value from the flags.
BUILDERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "push": push_target,
    "trained_on": trained_on,
    "stream": stream,
    "to": to,
    "weights": lambda flags: weights(flags["weights"]),
    "target_modules": lambda flags: names(flags["target_modules"]),
}


# --- Flags generated from the options' fields (rslora_tools/flags.py) ------------------------------------------------

PARAM_TYPES: dict[str, Callable[[], click.ParamType]] = {
    "runtime": RuntimeSpec,
    "runtime_or_unit": lambda: RuntimeSpec(allow_unit=True),
}


def flags_from(options: type, verb: str = "", skip: tuple[str, ...] = ()) -> Decorator:
    """The click options of every flag of `options`' fields (but those of `skip`): the class's own fields in their
    order, then those it inherits; `{verb}` in a help text becomes `verb` ("Merge")."""
    own = vars(options).get("__annotations__", {})  # the command's own fields first, then the shared ones
    fields = sorted((f for f in flags_of(options) if f[0] not in skip), key=lambda f: f[0] not in own)
    return stack(
        *(
            _click_option(dest(name, i, flag), default if i == 0 else None, flag, verb)
            for name, default, declared in fields
            for i, flag in enumerate(declared)
        )
    )


def _click_option(key: str, default: Any, flag: Flag, verb: str) -> Decorator:
    kwargs: dict[str, Any] = {"help": flag.help.replace("{verb}", verb)}
    if flag.is_flag:
        kwargs["is_flag"] = True
    if flag.choices is not None:
        kwargs["type"] = click.Choice(list(flag.choices))
    elif flag.folder:
        kwargs["type"] = click.Path(file_okay=False)
    elif isinstance(flag.type, str):
        kwargs["type"] = PARAM_TYPES[flag.type]()
    elif flag.type is not None:
        kwargs["type"] = flag.type
    default = flag.default if flag.default is not None else default
    if not (flag.is_flag and flag.secondary is None and not default):  # a plain switch is off unless given
        kwargs["default"] = default  # None included: a three-state switch, or a value not given
    for key_, on in (("metavar", flag.metavar), ("show_default", flag.show_default), ("multiple", flag.multiple)):
        if on:
            kwargs[key_] = on
    spelt = flag.name if flag.secondary is None else f"{flag.name}/{flag.secondary}"
    return click.option(spelt, key, **kwargs)


def flag_option(flag: Flag) -> Decorator:
    """The click option of one flag of no options field (`push --dry-run`: push is a function, not an options
    object)."""
    return _click_option(dest("", 1, flag), None, flag, "")


def options_from(options: type[T], flags: dict[str, Any], skip: tuple[str, ...] = (), **given: Any) -> T:
    """The options object the flags describe: each field from its flag's value, or, for a field that several flags
    (or a flag and a rule) make up, from its builder in `BUILDERS`; `given`: fields the command sets itself."""
    values: dict[str, Any] = {}
    for name, _, declared in flags_of(options):
        if name in skip or name in given:
            continue
        values[name] = BUILDERS[name](flags) if name in BUILDERS else flags[dest(name, 0, declared[0])]
    return options(**values, **given)
