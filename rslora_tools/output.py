"""Writing results safely: OUT is checked against the inputs, and is written atomically.

Everything goes into a temporary path beside OUT that is renamed at the end, so a failure,
Ctrl-C or SIGTERM leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """OUT may not be, contain, or sit inside an input; an existing non-empty OUT needs overwrite."""
    out_r = out.resolve()
    for inp in inputs:
        inp_r = inp.resolve()
        if out_r == inp_r or inp_r in out_r.parents or out_r in inp_r.parents:
            raise OutputError(f"{out}: the output folder may not be, contain or be inside an input ({inp})")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it")


def check_output_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """A single-file OUT may not be inside an input; an existing one needs overwrite."""
    out_r = out.resolve()
    for inp in inputs:
        inp_r = inp.resolve()
        if out_r == inp_r or inp_r in out_r.parents:
            raise OutputError(f"{out}: the output file may not be an input or inside one ({inp})")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")


@contextmanager
def atomic_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.rslora-tools-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise OutputError(f"{out}: appeared while writing and is not empty; nothing was replaced")
            old = out.parent / f".{out.name}.rslora-tools-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """Yield a temporary file path beside OUT; on success it replaces OUT, on any failure it is removed.

    Whether OUT may be written at all is `check_output_file`'s decision, made before.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.rslora-tools-tmp-{os.getpid()}"
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, like the Hub and transformers)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
