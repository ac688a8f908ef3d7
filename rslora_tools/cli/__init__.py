"""Stage 8, CLI: `rslora-tools`, a thin layer over the commands: flags to options, progress bars, printing.

One module per command (its click options, the mapping of its flags to the command's options,
its printer), plus the shared option decorators (`options`), progress bars (`progress`), what
every command prints alike (`render`) and the group with the process set-up and the
error-to-exit-code mapping (`app`). No rule lives here.

`main`, the console script, imports the rest only once it runs, inside the handler of an early Ctrl-C: an
interrupt while Python loads the commands is one line and exit 130, not a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["cli", "main"]


def main() -> None:
    try:
        from . import combine, convert, extract, inspect, merge, push, verify  # noqa: F401  (each registers its command)
        from .app import main as run

        run()
    except KeyboardInterrupt:  # before the command's own handler is installed (app.main), or after it is done
        print("Error: interrupted; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None


def __getattr__(name: str) -> Any:
    if name == "cli":
        from . import combine, convert, extract, inspect, merge, push, verify  # noqa: F401
        from .app import cli

        return cli
    raise AttributeError(name)
