"""Progress bars: tqdm on stderr, drawn only on a terminal, fed by the library's progress callbacks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def byte_progress(desc: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A byte progress bar, as the `progress(bytes_done_now, total_bytes)` callback the library calls."""
    if not enabled:
        yield None
        return
    bar = _byte_bar(desc)
    try:
        yield lambda n, total: _advance(bar, n, total)
    finally:
        bar.close()


@contextmanager
def phase_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """One byte progress bar per phase (download, merge, upload) of a streamed merge."""
    if not enabled:
        yield None
        return
    bars = {phase: _byte_bar(f"{phase.capitalize():9}", i) for i, phase in enumerate(("download", "merge", "upload"))}
    try:
        yield lambda phase, n, total: _advance(bars[phase], n, total)
    finally:
        for bar in bars.values():
            bar.close()


def _byte_bar(desc: str, position: int | None = None) -> Any:
    """A tqdm bar counting bytes on stderr, drawn only on a terminal."""
    from tqdm.auto import tqdm

    # decimal units (kB, MB, GB: 1000), as every size the commands print (formats.sizes.human_size)
    return tqdm(
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc=desc,
        position=position,
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
    )


def _advance(bar: Any, n: int, total: int) -> None:
    """Count `n` more bytes of `total` (the library says the total with each call; it may grow)."""
    if bar.total != total:
        bar.total = total
        bar.refresh()
    bar.update(n)
