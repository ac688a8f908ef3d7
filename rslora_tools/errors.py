"""The small exception hierarchy that the CLI maps to one-line messages and exit codes.

Errors say what is wrong in the library's words and carry what they are about as fields
(`RsloraError.fields`: a path, a repo id, a tensor); advice in command-line words (a flag, a
command to run) is added by the CLI from those fields, never by the library.
"""

from __future__ import annotations

from typing import Any


class RsloraError(Exception):
    """Base class: a problem the user can fix. The CLI prints `Error: <message>` and exits 1."""

    def __init__(self, message: str = "", **fields: Any):
        super().__init__(message)
        self.fields: dict[str, Any] = fields


class OptionError(RsloraError):
    """Options that cannot go together, or an option's value out of range: a usage error (the CLI exits 2)."""


class PushAfterWriteError(RsloraError):
    """The output is complete on disk, but publishing it failed (`fields`: out, repo_id; the cause is chained)."""


class InputError(RsloraError):
    """A file or folder is missing, unreadable, corrupt or inconsistent."""


class AdapterConfigError(InputError):
    """`adapter_config.json` is invalid or describes something that cannot be merged."""


class UnsupportedAdapterError(RsloraError):
    """A PEFT feature or variant that rslora-tools refuses, with the reason."""


class MismatchError(RsloraError):
    """The adapter does not fit the base checkpoint (missing modules, shape mismatches)."""


class OutputError(RsloraError):
    """The output location cannot be used (exists, overlaps an input, disk full)."""


class HubError(RsloraError):
    """A Hub request failed (unknown repo or revision, no access, offline without a cached copy, ...)."""


class OutputInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while an output was written; `complete` says whether OUT holds the new output.

    False: OUT is as it was before the command (nothing was written). True: the signal came while
    the finished output was being put in place, and OUT holds the complete new output.
    """

    def __init__(self, out: str, *, complete: bool):
        super().__init__(out)
        self.out = out
        self.complete = complete

    def __str__(self) -> str:
        if self.complete:
            return f"interrupted after {self.out} was written completely; it holds the new output"
        return "interrupted; nothing was written"


class StreamInterrupted(OutputInterrupted):
    """Ctrl-C or SIGTERM during a streamed push: what is on the Hub stays there (uncommitted) for a re-run."""

    def __init__(self, message: str):
        super().__init__(message, complete=False)
        self.message = message

    def __str__(self) -> str:
        return self.message
