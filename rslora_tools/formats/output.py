"""Writing results safely: OUT is checked against the inputs, and is written atomically.

Everything goes into a temporary path beside OUT that replaces OUT at the end, so a failure,
Ctrl-C or SIGTERM leaves nothing half-written behind. The replacement itself is one atomic
exchange where the file system offers it (Linux `renameat2(RENAME_EXCHANGE)`), so that OUT is a
complete folder, old or new, at every instant; signals that arrive during it are held back and
reported afterwards, with a message that says which one OUT holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from ..errors import OutputError, OutputInterrupted
from .provenance import read_provenance, written_by_us

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_written: list[Path] = []  # outputs this process has put in place (for messages after an interruption)


def written_outputs() -> list[Path]:
    """The outputs put in place since `forget_written()`: an interruption after that did not undo them."""
    return list(_written)


def forget_written() -> None:
    _written.clear()


def output_target(out: Path) -> Path:
    """The path that is really written: OUT itself, or the folder or file a symbolic link OUT points to.

    A link is followed (its target is replaced, the link stays), so that the output lands where the
    user's link says and the free-space check looks at that file system. A link to nothing is refused.
    """
    if out.is_symlink():
        target = out.resolve()
        if not target.exists():
            raise OutputError(
                f"{out}: is a symbolic link to {target}, which does not exist; create it or give another OUT"
            )
        return target
    return out.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and folder in path.parents


def _input_files(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(entry, real location) for the input folder and every entry in it (shards may be links elsewhere)."""
    yield folder, folder.resolve()
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        yield entry, entry.resolve()


def check_output_location(out: Path, inputs: list[Path], overwrite: bool, *, writes_adapter: bool = False) -> Path:
    """Refuse an OUT folder whose replacement could destroy an input; return the folder really written.

    OUT may not be, contain or sit inside an input folder, nor be or hold the current directory, and no input
    file may really be stored in OUT (a shard that is a link into OUT, a Hugging Face cache snapshot whose blobs
    OUT is). An existing non-empty OUT needs `overwrite`; a folder holding an adapter is replaced only by a
    command that writes one (`writes_adapter`: convert, combine, extract), and only if rslora-tools wrote it.
    """
    target = output_target(out)
    cwd = Path.cwd().resolve()
    if target == cwd or _inside(cwd, target):
        raise OutputError(
            f"{out}: is the current directory or holds it; OUT is replaced by a new folder, so give "
            "one of its own (e.g. ./merged)"
        )
    for folder in inputs:
        for entry, real in _input_files(folder):
            if entry is folder:
                if target == real or _inside(target, real) or _inside(real, target):
                    raise OutputError(f"{out}: the output folder may not be, contain or be inside an input ({folder})")
            elif real == target or _inside(real, target):
                raise OutputError(
                    f"{out}: the input file {entry} is stored there ({real}); replacing the output folder would "
                    "delete it. Choose another output folder"
                )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: exists and is not empty; pass [[overwrite=True]] to replace it")
        _check_replaceable_folder(out, target, writes_adapter)
    return target


# What --overwrite may replace (docs/reliability.md, "What --overwrite replaces"): an empty folder, or a folder
# or file this tool wrote. Anything else may be the input a user forgot to follow with OUT.
_MODEL_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt")


def _check_replaceable_folder(out: Path, folder: Path, writes_adapter: bool) -> None:
    """`--overwrite` replaces only an empty folder or one rslora-tools wrote (its rslora_tools.json says so); a
    folder holding an adapter (PEFT's or mlx-lm's `adapter_config.json`) only with another adapter."""
    names = sorted(p.name for p in folder.iterdir())
    if "adapter_config.json" in names and not writes_adapter:
        raise OutputError(
            f"{out}: holds an adapter; a merge never replaces one, even with [[overwrite=True]]. Did you forget OUT?"
        )
    if written_by_us(read_provenance(folder)):
        return
    rule = "[[overwrite=True]] replaces only an empty folder or one rslora-tools wrote"
    if "adapter_config.json" in names:
        raise OutputError(f"{out}: holds a PEFT adapter that rslora-tools did not write; {rule}. Did you forget OUT?")
    if "config.json" in names or any(n.endswith(_MODEL_FILES) or n.endswith(".index.json") for n in names):
        raise OutputError(f"{out}: holds a model that rslora-tools did not write; {rule}. Did you forget OUT?")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise OutputError(
        f"{out}: holds files that rslora-tools did not write ({shown}); {rule}: empty it or choose another OUT"
    )


def check_output_file(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse a single-file OUT that is an input file or inside an input folder; return the file really written."""
    target = output_target(out)
    for folder in inputs:
        for entry, real in _input_files(folder):
            if real == target or (entry is folder and _inside(target, real)):
                raise OutputError(f"{out}: the output file may not be an input or inside one ({entry})")
    if target.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name ending in .gguf")
    if target.exists():
        if not overwrite:
            raise OutputError(f"{out}: exists; pass [[overwrite=True]] to replace it")
        if not written_file(target):
            raise OutputError(
                f"{out}: is a file that rslora-tools did not write; [[overwrite=True]] replaces only a file "
                "rslora-tools wrote. Did you forget OUT?"
            )
    return target


GGUF_MARK = "rslora_tools.version"  # the key-value pair that marks a GGUF file this tool wrote


def written_file(path: Path) -> bool:
    """A single-file output of this tool: a GGUF file with the `rslora_tools.version` key."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        from gguf import GGUFReader  # a dependency; it maps the file and reads its key-value part

        return GGUFReader(path).get_field(GGUF_MARK) is not None
    except Exception:  # unreadable, or not a GGUF file gguf can read: not ours
        return False


def _temporary_name(out: Path, role: str) -> Path:
    return out.parent / f".{out.name}.rslora-tools-{role}-{os.getpid()}"


def remove_leftovers(out: Path) -> list[str]:
    """Remove what a killed run left beside OUT (its temporary folder or file); return what was removed.

    A run killed with SIGKILL (the OOM killer) cannot clean up. Its leftovers are named after OUT
    and its process id; those whose process no longer exists are removed, others left alone (a
    run still writing).
    """
    removed = []
    prefix = f".{out.name}.rslora-tools-"
    try:
        candidates = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    for path in candidates:
        role, _, pid = path.name[len(prefix) :].rpartition("-")
        if role not in ("tmp", "old") or not pid.isdigit() or _process_exists(int(pid)):
            continue
        with _signals_held():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, and belongs to someone else
        return True
    return True


def atomic_folder(out: Path, overwrite: bool) -> AbstractContextManager[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it is removed.

    `out` is the folder really written (`check_output_location`'s answer). An interruption before
    the replacement leaves OUT as it was; one during or after it is reported once OUT holds the
    complete new folder (`OutputInterrupted(complete=True)`).
    """
    tmp = _temporary_name(out, "tmp")

    def prepare() -> None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def commit() -> None:
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputError(f"{out}: appeared while writing and is not empty; nothing was replaced")
        _replace_folder(tmp, out)

    return _atomic(out, tmp, prepare, commit)


@contextmanager
def _atomic(out: Path, tmp: Path, prepare: Callable[[], None], commit: Callable[[], None]) -> Iterator[Path]:
    """Write into TMP, then `commit` it to OUT with signals held; clean up on any failure before the commit."""
    created: list[Path] = []
    committed = False
    try:
        with _sigterm_as_interrupt():
            created += _make_parents(out.parent)
            prepare()
            yield tmp
            with _signals_held() as received:
                commit()
                committed = True
                _written.append(out)
            if received:
                raise KeyboardInterrupt(f"signal {received[0]}")
    except KeyboardInterrupt as e:
        if committed:
            raise OutputInterrupted(str(out), complete=True) from e
        _remove_partial(tmp, created)
        raise OutputInterrupted(str(out), complete=False) from e
    except BaseException:
        if not committed:
            _remove_partial(tmp, created)
        raise


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put TMP at OUT. With an existing OUT, one atomic exchange where possible, else two renames."""
    if not out.exists():
        tmp.rename(out)
        return
    if _exchange(tmp, out):  # OUT is now the new folder; TMP holds the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _temporary_name(out, "old")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system cannot exchange: the two renames do it
    raise OSError(err, os.strerror(err), str(b))


def atomic_file(out: Path) -> AbstractContextManager[Path]:
    """Yield a temporary file path beside OUT; on success it replaces OUT, on any failure it is removed.

    Whether OUT may be written at all is `check_output_file`'s decision, made before.
    """
    tmp = _temporary_name(out, "tmp")
    return _atomic(out, tmp, lambda: None, lambda: os.replace(tmp, out))


def _make_parents(folder: Path) -> list[Path]:
    """Create FOLDER and its missing parents; return those created, deepest first (removed again on failure)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_partial(tmp: Path, created: list[Path]) -> None:
    """Remove what a failed write left: the temporary path and the parent folders it created."""
    with _signals_held():  # a second Ctrl-C must not leave half of it behind
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something else was put there meanwhile


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C, so both clean up the same way (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM that arrive inside are recorded in the yielded list instead of interrupting."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {}
    try:
        for signum in _HELD_SIGNALS:
            previous[signum] = signal.signal(signum, lambda n, _frame: received.append(n))
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def writing(
    out: Path, target: Path, *, overwrite: bool, what: str, warnings: list[str], single_file: bool = False
) -> Iterator[Path]:
    """The output skeleton every command uses once OUT is checked (`check_output_location`/`check_output_file`
    gave `target`) and the work is planned: what killed runs left beside OUT is removed (and said in `warnings`),
    the output is written into a temporary path (yielded) that replaces OUT atomically, and a failed write (a full
    disk) is one line that names OUT and `what` failed."""
    warnings += [
        f"removed {name}, left beside OUT by an earlier run that was killed" for name in remove_leftovers(target)
    ]
    try:
        with atomic_file(target) if single_file else atomic_folder(target, overwrite) as tmp:
            yield tmp
    except OSError as e:  # a full disk (ENOSPC), a read error, ...: the partial output is already removed
        raise write_failure(out, e, what) from e


def write_failure(out: Path, e: OSError, what: str) -> OutputError:
    """One line for a write that failed (full disk, read-only folder, ...); the partial output is removed by then."""
    where = f" ({e.filename})" if e.filename else ""
    return OutputError(f"{out}: {what} failed: {e.strerror or e}{where}; nothing was written")


SCRATCH_MARK = ".rslora-tools-scratch"  # in a working folder this tool made; also its lock


@contextmanager
def work_folder(folder: Path, what: str) -> Iterator[Path]:
    """A working folder this tool owns for one run: made here (or made by an earlier run of it), marked, locked.

    A folder of that name that rslora-tools did not make is refused (it may be the user's); one that
    another run holds is refused too, instead of two runs deleting each other's files.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputError(f"{folder}: exists and is not a folder ({what})")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / SCRATCH_MARK).is_file():
        raise OutputError(
            f"{folder}: exists and was not made by rslora-tools; it is not used as {what} (its files "
            "could be deleted). Move it, or choose another [[StreamOptions(scratch=...)]]"
        )
    created = _make_parents(folder)
    fd = os.open(folder / SCRATCH_MARK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{folder}: another run is using it as {what} (it is locked); wait for that run to "
                "finish, or give this one another [[StreamOptions(scratch=...)]]"
            ) from None
        yield folder
    finally:
        _remove_if_unused(folder)
        os.close(fd)
        for made in created[1:]:  # folders made to hold it, once the run removed it: removed when empty
            try:
                made.rmdir()
            except OSError:
                break


def _remove_if_unused(folder: Path) -> None:
    """A working folder that holds nothing but its mark (a run that failed before writing anything a re-run
    could use) is removed, not left behind."""
    try:
        if {p.name for p in folder.iterdir()} <= {SCRATCH_MARK}:
            (folder / SCRATCH_MARK).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass


def free_space(out: Path) -> int | None:
    """Free bytes on the file system OUT will be written to (its nearest existing ancestor)."""
    folder = out.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
