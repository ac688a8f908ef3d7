"""The small exception hierarchy that the CLI maps to one-line messages and exit codes."""

from __future__ import annotations


class RsloraError(Exception):
    """Base class: a problem the user can fix. The CLI prints `Error: <message>` and exits 1."""


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
