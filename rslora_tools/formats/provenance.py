"""`rslora_tools.json`, what a merge or conversion was made from, so that a later push writes the right card."""

from __future__ import annotations

import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .._version import __version__

PROVENANCE_NAME = "rslora_tools.json"

# The command line that runs now (set by the CLI; None from the Python API), recorded for the model card.
COMMAND: ContextVar[str | None] = ContextVar("rslora_tools_command", default=None)


def command_line(args: list[str]) -> str:
    """`rslora-tools ARGS` as a card may show it: a token's value hidden, absolute paths shortened to their name."""
    shown, hide_next = [], False
    for arg in args:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg == "--token":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--token="):
            shown.append("--token=***")
        elif os.path.isabs(os.path.expanduser(arg)) and not arg.startswith("-"):
            shown.append(Path(arg).name or arg)
        else:
            shown.append(arg)
    return " ".join(["rslora-tools", *(_quoted(a) for a in shown)])


def _quoted(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def write_provenance(folder: Path, record: dict[str, Any]) -> None:
    record = {"tool": "rslora-tools", "version": __version__, **record}
    if COMMAND.get() is not None:
        record["command"] = COMMAND.get()
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def add_to_provenance(folder: Path, **fields: Any) -> None:
    """Add fields to the record in FOLDER (a merge's verification, once it passed)."""
    record = read_provenance(folder)
    record.update(fields)
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def written_by_us(record: dict[str, Any]) -> bool:
    """Whether a provenance record says this tool wrote the folder (what --overwrite may replace)."""
    return record.get("tool") == "rslora-tools"


def read_provenance(folder: Path) -> dict[str, Any]:
    """The record in FOLDER, or {} when there is none (or it is unreadable)."""
    try:
        data = json.loads((folder / PROVENANCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
