"""How commands talk back: the progress callbacks they call and the base of every report they return.

The library never draws: a command calls `progress(bytes_done_now, total_bytes)` as it goes
(a streamed merge, `progress(phase, bytes_done_now, phase_total)`), and the CLI draws the bars.
Every command returns a dataclass report; `to_dict()` is what `--json` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

ProgressCallback = Callable[[int, int], None]  # (bytes just done, total bytes; the total may grow)
PhaseProgress = Callable[[str, int, int], None]  # (phase: download|merge|upload, bytes just done, phase total)


class Report:
    """The base of every command's report (a dataclass): `to_dict()` gives its fields as plain JSON values."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


def worst_error(modules: list[dict[str, Any]]) -> float | None:
    """The largest `relative_error` of a report's modules (a factorisation's), or None when none was measured."""
    errors = [m["relative_error"] for m in modules if m.get("relative_error") is not None]
    return max(errors) if errors else None


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun as English counts them: "1 adapter", "2 adapters", "0 modules"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
