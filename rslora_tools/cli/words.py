"""Library messages in command-line words: each option a message marks (`[[overwrite=True]]`, rslora_tools/errors.py)
said as the flag declared on its field (`--overwrite`), each command it suggests as a command line.

The table is made from the declarations (rslora_tools/flags.py `api_words`): a flag's Python words are
its field's (`overwrite=True`, `initial=` + a value) or its own `Flag.api` ("StreamOptions(scratch=").
"""

from __future__ import annotations

import functools
import re

from ..errors import MARKED, RsloraError, marked_message
from ..flags import api_words, flags_of

API_FUNCTIONS = {"inspect_adapter": "inspect"}  # a command whose function's name differs from it
_CALL = re.compile(r"rslora_tools\.(\w+)\((.*)\)$")
_OPTION = re.compile(r"^(\w+=\w+\(|\w+\(\w+=|\w+=)(.*)$")  # "push=PushTarget(" / "StreamOptions(scratch=" / "rank="


@functools.cache
def flag_table() -> dict[str, str]:
    """Each option's Python words (`overwrite=True`, `StreamOptions(scratch=`) -> its flag, from every options class
    of a command."""
    from ..commands import options as commands
    from ..execute.options import MergeOptions, StreamOptions
    from ..hub.target import PushTarget

    classes = [MergeOptions, StreamOptions, PushTarget, commands.ConvertOptions, commands.CombineOptions]
    classes += [commands.ExtractOptions, commands.VerifyOptions, commands.InspectOptions]
    table = {}
    for options in classes:
        for field, _, flags in flags_of(options):
            for index, flag in enumerate(flags):
                for said, name in zip(api_words(field, index, flag), (flag.name, flag.secondary)):
                    table[said] = name or flag.name
    return table


def as_flags(message: str) -> str:
    """`message` in command-line words: `pass [[overwrite=True]]` -> `pass --overwrite`."""
    return MARKED.sub(_said, message)


def _said(marked: re.Match[str]) -> str:
    try:
        return said_as_flags(marked.group(1))
    except KeyError:  # no command declares it (tests/architecture/test_messages.py keeps the library free of them)
        return marked.group(1)


def error_as_flags(e: BaseException) -> str:
    """An error's message in command-line words."""
    return as_flags(marked_message(e)) if isinstance(e, RsloraError) else str(e)


def said_as_flags(words: str) -> str:
    """One marked option or command in command-line words (KeyError for one no command declares)."""
    call = _CALL.match(words)
    if call:
        args = [said_as_flags(a) if "=" in a or "(" in a else a for a in _arguments(call.group(2))]
        return " ".join(["rslora-tools", API_FUNCTIONS.get(call.group(1), call.group(1)), *args])
    table = flag_table()
    if words in table:  # a switch, or a flag that stands for one value: `overwrite=True`, `to="rslora"`
        return table[words]
    option = _OPTION.match(words)
    key, value = (option.group(1), option.group(2)) if option else (words + "=", "")
    if "(" in key:  # a field of a nested options object: its value ends at the object's closing parenthesis
        value = value.removesuffix(")")
    flag = table[key]
    return flag if value in ("", "...") else f"{flag} {value}"


def _arguments(text: str) -> list[str]:
    """A call's arguments, split at the commas outside parentheses."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    return [*args, text[start:].strip()] if text.strip() else args
