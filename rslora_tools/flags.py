"""How an options field is spelt on the command line: its flag, help, choices and default, declared once beside the
field (`option(...)`), so that the CLI generates every click option and the flags-to-options mapping from it.

A field of an options object (`MergeOptions.dtype`, `OutputOptions.overwrite`) is declared with
`option(default, Flag("--dtype", help=...))`; a field that several flags make up (`push`:
`--push-to-hub`, `--private`, ...) lists them all, and the CLI builds its value with the builder
of that field's name (cli/options.py `BUILDERS`). Flags with no field (`--json`, `--quiet`) are
the CLI's own: they choose how a report is shown, not what a command does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    """One command-line flag of an options field. `help` may name `{verb}` (the command's verb: "Merge")."""

    name: str  # "--dtype"
    help: str
    dest: str | None = None  # the flag's key in the CLI's mapping; default: the field's name for a field's first
    # flag, the flag's own name for the others ("--create-pr": create_pr)
    choices: tuple[str, ...] | None = None
    type: Any = None  # int, float, or the name of a CLI value type ("runtime", "runtime_or_unit": cli/options.py)
    metavar: str | None = None
    is_flag: bool = False
    secondary: str | None = None  # the off switch of a three-state flag ("--no-double-quant": None, True or False)
    default: Any = None  # the CLI's default, shown by --help, when it differs from the field's (None: the field's)
    show_default: bool = False
    folder: bool = False  # a folder path (click.Path(file_okay=False))
    multiple: bool = False  # the flag may be given several times (its values a tuple)
    api: str | None = None  # how a message names it in the Python API's words, where that is not the field's own
    # (`field=True` for a switch, `field=` + value): 'to="rslora"', "PushTarget(private=True)"; a value follows a
    # form ending in "=" or "(" ("StreamOptions(scratch=" + "DIR" + ")")


# Flags declared in more than one stage's options (the Hub's push target and the commands' options).
TOKEN = Flag(
    "--token", metavar="TOKEN", help="Hugging Face token (default: HF_TOKEN or the stored login). Never printed."
)
DRY_RUN = Flag("--dry-run", is_flag=True, help="Plan and print what would be done; write nothing.")


def option(default: Any = None, *flags: Flag) -> Any:
    """A field of an options object with the flags that set it (none: settable from Python only)."""
    return dataclasses.field(default=default, metadata={"flags": flags})


def dest(field: str, index: int, flag: Flag) -> str:
    """The key of a field's `index`th flag in the CLI's mapping of flags to values."""
    if flag.dest is not None:
        return flag.dest
    return field if index == 0 else flag.name.removeprefix("--").replace("-", "_")


def api_words(field: str, index: int, flag: Flag) -> tuple[str, ...]:
    """How library messages name a field's `index`th flag (rslora_tools/errors.py: `[[overwrite=True]]`): the Python
    API's words for it, then, for a three-state switch, those of its off switch (`flag.secondary`)."""
    said = flag.api or (f"{field}=True" if flag.is_flag or flag.secondary else f"{field}=")
    if index and flag.api is None:
        raise ValueError(f"{flag.name}: a field's second flag says how the Python API names it (Flag.api)")
    return (said, said.replace("=True", "=False")) if flag.secondary else (said,)


def marked(options: type, field: str) -> str:
    """How a message names a field of an options class, marked (rslora_tools/errors.py): `[[verify=True]]`,
    `[[max_shard_size]]`, `[[push=PushTarget(...)]]`; the CLI says it as the field's first flag."""
    declared: tuple[Flag, ...] = next(f.metadata["flags"] for f in dataclasses.fields(options) if f.name == field)
    said = api_words(field, 0, declared[0])[0]
    return f"[[{said}...)]]" if said.endswith("(") else f"[[{said.removesuffix('=')}]]"


def flags_of(options: type) -> Iterator[tuple[str, Any, tuple[Flag, ...]]]:
    """Each field of an options class that has flags: its name, its default and its flags, in field order."""
    for f in dataclasses.fields(options):
        declared = f.metadata.get("flags")
        if declared:
            yield f.name, f.default, declared
