"""The `rslora-tools` group and the process around a command: error mapping, exit codes, signals, memory.

Exit codes, the same for every command: 0 success; 1 an error (one `Error: ...` line, naming the
file or tensor, and what to do; RSLORA_TOOLS_DEBUG=1 shows the traceback); 2 a usage error
(click's, or an option the command refused: `OptionError`); 130 interrupted (Ctrl-C or SIGTERM),
with a line that says what the interruption left.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any

import click

from .._version import __version__
from ..errors import OptionError, OutputInterrupted, PushAfterWriteError, RsloraError
from .words import as_flags

DEBUG_ENV = "RSLORA_TOOLS_DEBUG"
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class _Command(click.Command):
    """A command whose refused options (`OptionError`) are usage errors: its usage line, the message, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptionError as e:
            raise click.UsageError(_one_line(as_flags(e.message)), ctx=ctx) from None


class _Group(click.Group):
    """Maps library errors to one line `Error: ...` and their exit codes; a traceback only with
    RSLORA_TOOLS_DEBUG=1."""

    command_class = _Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        from ..formats.provenance import COMMAND, command_line

        COMMAND.set(command_line(list(args)))  # recorded in rslora_tools.json for the model card
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        from ..formats.output import forget_written

        forget_written()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except RsloraError as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException(_one_line(_worded(e))) from None
        except OutputInterrupted as e:
            _COMMAND["interrupted"] = True
            raise _Interrupted(_worded_interruption(e)) from None
        except KeyboardInterrupt:
            _COMMAND["interrupted"] = True
            raise _Interrupted(_interrupted()) from None
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        except Exception as e:  # an unexpected failure: still one line, unless debugging
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            raise click.ClickException(
                f"unexpected {type(e).__name__}: {_one_line(str(e))} (set {DEBUG_ENV}=1 for a traceback)"
            ) from None
        finally:
            _COMMAND["finished"] = True


class _Interrupted(click.ClickException):
    exit_code = EXIT_INTERRUPTED


def _worded(e: RsloraError) -> str:
    """The library's message, with the command-line words its fields call for."""
    if isinstance(e, PushAfterWriteError):
        out, repo = e.fields.get("out"), e.fields.get("repo_id")
        return f"{as_flags(e.message)} ({out} is complete on disk; push it later with: rslora-tools push {out} {repo})"
    return as_flags(e.message)


def _worded_interruption(e: OutputInterrupted) -> str:
    repo = getattr(e, "repo_id", None)
    if repo is not None:  # a push after the output was written (commands.common.PushInterrupted)
        return (
            f"interrupted during the push; {e.out} is complete on disk; push it later with: rslora-tools push "
            f"{e.out} {repo}"
        )
    return str(e)


_COMMAND = {"finished": False, "interrupted": False}


def _interrupted() -> str:
    """What an interruption left: nothing, or an output already complete (replaced before the signal came)."""
    from ..formats.output import written_outputs

    done = written_outputs()
    if done:
        return f"interrupted after {done[-1]} was written completely; it holds the new output"
    return "interrupted; nothing was written"


def _on_signal(signum: int, frame: object) -> None:
    """SIGINT and SIGTERM: interrupt the command (which cleans up and says what is left); ignored once it is done."""
    if not _COMMAND["finished"]:
        _COMMAND["interrupted"] = True
        raise KeyboardInterrupt(f"signal {signum}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(name="rslora-tools", cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="rslora-tools")
def cli() -> None:
    """Merge, convert and inspect PEFT LoRA and rsLoRA adapters, exactly as PEFT does.

    \b
    Examples:
      rslora-tools merge base-model/ my-adapter/ merged/
      rslora-tools merge base-model/ my-adapter/ merged/ --dtype bf16 --max-shard-size 5GB
      rslora-tools convert my-adapter/ for-vllm/ --target vllm
      rslora-tools inspect my-adapter/ --base base-model/
      rslora-tools merge org/base org/adapter merged/ --push-to-hub me/merged
      rslora-tools verify merged/ base-model/ my-adapter/

    Exit codes: 0 success, 1 an error, 2 a usage error, 130 interrupted.
    """


def main() -> None:
    # SIGTERM interrupts like Ctrl-C, and neither interrupts the exit once the command has finished
    # (its message is already true then).
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    # Worker threads copy and write while torch computes: idle OpenMP workers must sleep rather
    # than spin, or they take the CPU the other workers need. Read once, when torch first loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A short-lived process that allocates few cyclic objects: reference counting frees them;
    # the cyclic collector would only rescan torch's import graph (when loaded) again and again.
    gc.disable()
    _return_freed_memory()
    try:
        cli(prog_name="rslora-tools")
    except SystemExit as e:
        _exit_now_if_interrupted(e.code)
        raise
    finally:  # the command is over: a signal now must not kill the exit (Python restores SIG_DFL when it shuts down)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_now_if_interrupted(code: object) -> None:
    """After an interruption, exit without Python's shutdown: a worker, or a thread torch runs for it, may still be
    inside a long torch operation (a second signal can cut the wait for them short).

    Python's shutdown would otherwise tear down the interpreter under that thread, which aborts
    the process ("terminate called without an active exception"). The output was cleaned up
    already and the message printed.
    """
    import threading

    workers = any(t.name.startswith("rslora-tools-") and t.is_alive() for t in threading.enumerate())
    if workers or _COMMAND["interrupted"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else EXIT_ERROR)


def _return_freed_memory() -> None:
    """glibc: serve every allocation of 128 KiB or more with its own mapping, given back on free.

    By default glibc raises that threshold after the first such free, and later blocks (a
    merge's row blocks and fp32 factors) then come from heaps that keep what was freed, so
    peak memory drifts from run to run. A fixed threshold keeps it at what is really in use.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass
