"""The small exception hierarchy that the CLI maps to one-line messages and exit codes.

Errors say what is wrong and what to do, and carry what they are about as fields
(`RsloraError.fields`: a path, a repo id, a tensor, the options fields). A message names an option
in the Python API's words, marked: `[[overwrite=True]]`, `[[initial=INIT]]`, `[[energy]]`,
`[[StreamOptions(scratch=DIR)]]`, a command it suggests as a call, `[[rslora_tools.push(FOLDER, REPO_ID)]]`.
`str(error)` drops the marks (a Python caller reads `pass overwrite=True`); the CLI says each marked
option as the flag declared on its field (rslora_tools/cli/words.py: `pass --overwrite`). So a
Python caller is never told to pass a flag, nor a CLI user a keyword, and no table translates them.
"""

from __future__ import annotations

import re
from typing import Any

# An option or command a message names, in the Python API's words (see the module's docstring).
MARKED = re.compile(r"\[\[(.+?)\]\](?!\])")


def python_words(message: str) -> str:
    """`message` as the Python API says it: its marked options and commands unmarked."""
    return MARKED.sub(lambda m: m.group(1), message)


class RsloraError(Exception):
    """Base class: a problem the user can fix. The CLI prints `Error: <message in CLI words>` and exits 1."""

    def __init__(self, message: str = "", **fields: Any):
        super().__init__(message)
        self.fields: dict[str, Any] = fields

    @property
    def message(self) -> str:
        """The message with its options marked (`[[overwrite=True]]`), for a front end to say in its own words."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return python_words(self.message)


def marked_message(e: BaseException) -> str:
    """An error's message with its options marked (`RsloraError.message`; any other exception's str), to be put in
    another message or said by a front end."""
    return e.message if isinstance(e, RsloraError) else str(e)


class OptionError(RsloraError):
    """Options that cannot go together, or an option's value out of range: a usage error (the CLI exits 2).

    `fields["options"]`: the names of the options fields it is about (("initial", "base_is_residual")), or
    `fields["argument"]` ("OUT") when it is about an argument."""


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
