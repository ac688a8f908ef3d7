"""`rslora_tools.json`, what a merge or conversion was made from, so that a later push writes the right card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import __version__

PROVENANCE_NAME = "rslora_tools.json"


def write_provenance(folder: Path, record: dict[str, Any]) -> None:
    record = {"tool": "rslora-tools", "version": __version__, **record}
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
