"""The small exception hierarchy that the CLI maps to one-line messages and exit codes.

Errors say what is wrong and what to do, and carry what they are about as fields
(`RsloraError.fields`: a path, a repo id, a tensor). A message names options as the command
line spells them (`--overwrite`, `--initial INIT`); `str(error)` gives it in the Python API's
words (`overwrite=True`, `initial=INIT`), from one table (`API_WORDS`), and the CLI prints
`error.cli_message`. So a Python caller is never told to pass a flag, nor a CLI user a keyword.
"""

from __future__ import annotations

import re
from typing import Any

# A flag as the Python API says it. Flags that take a value end in "=" (`--initial INIT` -> `initial=INIT`);
# every flag a library message names has an entry (tests/architecture/test_messages.py checks).
API_WORDS: dict[str, str] = {
    "--overwrite": "overwrite=True",
    "--dry-run": "dry_run=True",
    "--allow-nonfinite": "allow_nonfinite=True",
    "--allow-pickle": "allow_pickle=True",
    "--base-is-residual": "base_is_residual=True",
    "--bake": "bake=True",
    "--verify": "verify=True",
    "--rslora": "rslora=True",
    "--exact": "exact=True",
    "--classic": "rslora=False",
    "--to-rslora": 'to="rslora"',
    "--to-classic": 'to="classic"',
    "--stream": "stream=StreamOptions()",
    "--keep-cache": "StreamOptions(keep_cache=True)",
    "--no-resume": "StreamOptions(no_resume=True)",
    "--scratch": "StreamOptions(scratch=",
    "--push-to-hub": "push=PushTarget(",
    "--create-pr": "PushTarget(create_pr=True)",
    "--private": "PushTarget(private=True)",
    "--commit-message": "PushTarget(commit_message=",
    "--double-quant": "trained_on_scheme(double_quant=True)",
    "--quant-blocksize": "trained_on_scheme(blocksize=",
    "--initial": "initial=",
    "--trained-on": "trained_on=",
    "--weights": "weights=",
    "--target": "target=",
    "--rank": "rank=",
    "--dtype": "dtype=",
    "--device": "device=",
    "--token": "token=",
    "--revision": "revision=",
    "--base-revision": "base_revision=",
    "--adapter-revision": "adapter_revision=",
    "--method": "method=",
    "--max-error": "max_error=",
    "--energy": "energy=",
    "--density": "density=",
    "--base": "base=",
    "--seed": "seed=",
    "--sample": "sample=",
    "--alpha": "alpha=",
    "--max-shard-size": "max_shard_size=",
    "--target-modules": "target_modules=",
    "--runtime": "runtimes=",
    "--json": "the returned report",
    "--expert-layout": "expert_layout=",
    "--key-layout": "key_layout=",
    "--keep-quantization": "keep_quantization=True",
    "--outtype": "outtype=",
    "--llama-cpp": "llama_cpp=",
}
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?: ([A-Z][A-Z0-9_]*|\d[\w.]*|'[^']*'))?")
# A command a message suggests, up to the end of its backquotes, parentheses or clause.
_COMMAND = re.compile(r"rslora-tools (merge|convert|verify|push|combine|extract|inspect)\b([^`);,]*)")
API_FUNCTIONS = {"inspect": "inspect_adapter"}  # a command's function, where its name differs


def api_words(message: str) -> str:
    """`message` with its command-line flags and suggested commands in the Python API's words (see API_WORDS)."""
    return _flags_as_keywords(_COMMAND.sub(_command_as_call, message))


def _command_as_call(m: re.Match[str]) -> str:
    """`rslora-tools push FOLDER REPO_ID --revision BRANCH` -> `rslora_tools.push(FOLDER, REPO_ID,
    revision=BRANCH)`."""
    words, args, i = m.group(2).split(), [], 0
    while i < len(words):
        if (
            words[i].startswith("--")
            and words[i] in API_WORDS
            and API_WORDS[words[i]].endswith("=")
            and i + 1 < len(words)
            and not words[i + 1].startswith("--")
        ):
            args.append(f"{words[i]} {words[i + 1]}")
            i += 2
        else:
            args.append(words[i])
            i += 1
    trailing = " " if m.group(2).endswith(" ") else ""
    return f"rslora_tools.{API_FUNCTIONS.get(m.group(1), m.group(1))}({', '.join(args)}){trailing}"


def _flags_as_keywords(message: str) -> str:

    def word(m: re.Match[str]) -> str:
        flag, value = m.group(1), m.group(2)
        said = API_WORDS.get(flag)
        if said is None:
            return m.group(0)
        if not said.endswith(("=", "(")):  # a switch: its value is the next word's business
            return said + (f" {value}" if value else "")
        if "(" in said:  # a field of a nested options object: StreamOptions(scratch=DIR)
            return f"{said}{value or '...'})"
        return f"{said}{value}" if value else said[:-1]  # `rank=8`; alone, the field's name

    return _FLAG.sub(word, message)


class RsloraError(Exception):
    """Base class: a problem the user can fix. The CLI prints `Error: <cli_message>` and exits 1."""

    def __init__(self, message: str = "", **fields: Any):
        super().__init__(message)
        self.fields: dict[str, Any] = fields

    @property
    def cli_message(self) -> str:
        """The message as the command line says it (flags as flags)."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return api_words(self.cli_message)


def cli_message(e: BaseException) -> str:
    """An error's message in command-line words (`RsloraError.cli_message`; any other exception's str)."""
    return e.cli_message if isinstance(e, RsloraError) else str(e)


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
