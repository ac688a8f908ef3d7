"""What a converted adapter folder holds besides its weights (`convert`, and `convert --expert-layout/--key-layout`):
the report, the adapter's other files carried along, the README's note, the config changes reported."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapter.adapter import PICKLE_NAME, WEIGHTS_NAME, Adapter
from ..adapter.config import CONFIG_NAME
from ..formats.checkpoint import checked_file
from ..formats.provenance import PROVENANCE_NAME
from ..plan.convert import ConversionPlan
from ..reporting import Report


@dataclass
class ConvertReport(Report):
    """What `convert` did (or would do); `to_dict()` is what `--json` prints."""

    adapter: str
    out: str
    action: str
    source_convention: str
    target: str
    modules: int
    message: str
    config_changes: dict[str, list[Any]] = field(default_factory=dict)
    weights_changed: bool = False
    weights_dtype: str | None = None
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    relative_form: str | None = None  # --initial: the adapter was made relative to the original base, in this form
    source_format: str = "peft"  # the format ADAPTER was read from: "peft" or "mlx-lm"
    push: dict[str, Any] | None = None  # the push of OUT when one was asked


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """The scale fields that differ, as [before, after] (both configs normalized)."""
    keys = ("use_rslora", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights")
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def other_files(adapter: Adapter) -> list[Path]:
    """The adapter folder's other top-level files, which travel along (links out of the folder refused)."""
    skip = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, PROVENANCE_NAME, adapter.weights_path.name}
    return [
        checked_file(adapter.path, path, "side file")
        for path in sorted(adapter.path.iterdir())
        if path.name not in skip and not path.name.startswith(".") and path.is_file()
    ]


def copy_other_files(adapter: Adapter, tmp: Path, plan: ConversionPlan, *, readme: bool = True) -> None:
    """Every other top-level file travels along; the README gets a note of the conversion (or, `readme=False`,
    stays behind: a PEFT card would misdescribe an mlx-lm adapter, and `push` writes the right one)."""
    for path in other_files(adapter):
        if path.name == "README.md" and not readme:
            continue
        if path.name == "README.md":
            text = path.read_text(encoding="utf-8", errors="replace")
            (tmp / path.name).write_text(text.rstrip("\n") + "\n\n" + _readme_note(plan), encoding="utf-8")
            continue
        shutil.copyfile(path, tmp / path.name)


def _readme_note(plan: ConversionPlan) -> str:
    return (
        "## Converted with rslora-tools\n\n"
        f"{plan.message[0].upper()}{plan.message[1:]} (rslora-tools {__version__}). "
        "Every module keeps the scale PEFT applied to the original adapter.\n"
    )
