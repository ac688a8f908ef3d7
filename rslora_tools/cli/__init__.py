"""Stage 8, CLI: `rslora-tools`, a thin layer over the commands: flags to options, progress bars, printing.

One module per command (its click options, the mapping of its flags to the command's options,
its printer), plus the shared option decorators (`options`), progress bars (`progress`), what
every command prints alike (`render`) and the group with the process set-up and the
error-to-exit-code mapping (`app`). No rule lives here.
"""

from . import combine, convert, extract, inspect, merge, push, verify  # noqa: F401  (each registers its command)
from .app import cli, main

__all__ = ["cli", "main"]
