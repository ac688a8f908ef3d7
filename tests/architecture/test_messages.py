"""Messages give advice that can be followed, in the caller's words.

Every flag a message names is an option of a command; every command a message suggests exists and takes the
options it is shown with. The library's errors name options marked, in the Python API's words
(`[[overwrite=True]]`, rslora_tools/errors.py), never as flags; the CLI says each as the flag declared on its field
(rslora_tools/cli/words.py), so a Python caller reads keywords and a CLI user flags.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import click
import pytest
from helpers import ADAPTER, BASE, cli_run

import rslora_tools
from rslora_tools.cli import cli
from rslora_tools.cli.words import as_flags, said_as_flags
from rslora_tools.errors import MARKED, OutputError, python_words

PACKAGE = Path(rslora_tools.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SUGGESTION = re.compile(r"rslora-tools (\w+)((?: [^`);,\"]*)?)")


def message_strings(path: Path) -> list[str]:
    """The string constants of a module that are not docstrings, comments or a flag's declaration (f-strings' literal
    parts joined), in command-line words (marked options said as their flags)."""
    return [as_flags(text) for text in marked_strings(path)]


def marked_strings(path: Path) -> list[str]:
    """message_strings as the code writes them, options marked."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    helps = {
        id(sub)
        for node in ast.walk(tree)  # a flag's help (rslora_tools.flags.Flag) is CLI words, not a message
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Flag"
        for sub in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in helps:
            continue
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
    return found


def options_of(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


COMMANDS = {name: options_of(command) for name, command in cli.commands.items()}
EVERY_OPTION = set().union(*COMMANDS.values())
LIBRARY = [p for p in sorted(PACKAGE.rglob("*.py")) if "cli" not in p.relative_to(PACKAGE).parts]
EVERYWHERE = sorted(PACKAGE.rglob("*.py"))


def test_every_flag_a_message_names_is_an_option_of_a_command():
    unknown = {
        (p.relative_to(PACKAGE).as_posix(), flag)
        for p in EVERYWHERE
        for text in message_strings(p)
        for flag in FLAG.findall(text)
        if flag not in EVERY_OPTION | {"--help", "--version"} and not flag.endswith("-")
    }  # "--to-{x}"
    assert unknown == set()


def test_every_suggested_command_exists_and_takes_the_options_shown():
    wrong = []
    for path in EVERYWHERE:
        for text in message_strings(path):
            for name, rest in SUGGESTION.findall(text):
                if name not in COMMANDS and not re.match(r" ?(--|[A-Z][A-Z_]+\b|\S*/)", rest):
                    continue  # prose ("rslora-tools did not write"), or "rslora-tools {version}"
                if name not in COMMANDS:
                    wrong.append(f"{path.name}: rslora-tools {name}{rest}: no such command")
                    continue
                wrong += [
                    f"{path.name}: rslora-tools {name}{rest}: {flag} is not an option of {name}"
                    for flag in FLAG.findall(rest)
                    if flag not in COMMANDS[name]
                ]
    assert wrong == []


def test_every_marked_option_is_a_flag_of_a_command():
    """Every `[[...]]` a message marks is said as a flag some command declares (or a command that exists)."""
    unknown = []
    for p in EVERYWHERE:
        for text in marked_strings(p):
            for words in MARKED.findall(text):
                if words.startswith("X"):  # made by an expression (flags.marked)
                    continue
                try:
                    said_as_flags(words)
                except KeyError:
                    unknown.append(f"{p.relative_to(PACKAGE).as_posix()}: [[{words}]]")
    assert unknown == []


def error_strings(path: Path) -> list[str]:
    """The string constants (f-strings' literal parts joined) of the errors a module raises or makes."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        called = getattr(node.func, "id", getattr(node.func, "attr", "")) if isinstance(node, ast.Call) else ""
        if (isinstance(node, ast.Raise) and node.exc is not None) or called.endswith("Error"):
            for sub in ast.walk(node):
                if isinstance(sub, ast.JoinedStr):
                    found.append("".join(v.value if isinstance(v, ast.Constant) else "X" for v in sub.values))
                elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    found.append(sub.value)
    return found


def test_library_errors_name_options_marked_never_as_flags():
    """A library error says an option in the Python API's words, marked; a flag in one would reach Python callers."""
    flags = {
        (p.relative_to(PACKAGE).as_posix(), flag)
        for p in LIBRARY
        for text in error_strings(p)
        for flag in FLAG.findall(MARKED.sub("", text))
    }
    assert flags == set()


def test_each_flag_is_said_back_from_its_python_words():
    """The words flags.api_words gives each declared flag (its field's, or its Flag.api) are said as that flag: a
    renamed field or flag cannot leave a message naming a keyword or flag that does not exist."""
    from rslora_tools.cli.words import flag_table
    from rslora_tools.commands import options as command_options
    from rslora_tools.execute import options as merge_options
    from rslora_tools.flags import api_words, flags_of
    from rslora_tools.hub.target import PushTarget

    classes = [merge_options.MergeOptions, merge_options.StreamOptions, PushTarget]
    classes += [getattr(command_options, n) for n in ("ConvertOptions", "CombineOptions", "ExtractOptions")]
    classes += [command_options.VerifyOptions, command_options.InspectOptions]
    wrong = []
    for options in classes:
        fields = {f.name for f in dataclasses.fields(options)}
        for field, _, declared in flags_of(options):
            for index, flag in enumerate(declared):
                for said, name in zip(api_words(field, index, flag), (flag.name, flag.secondary)):
                    alone = said + "...)" if said.endswith("(") else said.removesuffix("=")
                    if said_as_flags(alone) != name or flag_table()[said] != name:
                        wrong.append(f"{options.__name__}.{field}: {said!r} is not said {name}")
                    if flag.api is None and said.partition("=")[0] not in fields:
                        wrong.append(f"{options.__name__}.{field}: {said!r} names no field")
    assert wrong == []


@pytest.mark.parametrize(
    ("marked", "python", "command_line"),
    [
        (
            "pass [[overwrite=True]] to replace it",
            "pass overwrite=True to replace it",
            "pass --overwrite to replace it",
        ),
        (
            "pass [[initial=INIT]] or [[base_is_residual=True]]",
            "pass initial=INIT or base_is_residual=True",
            "pass --initial INIT or --base-is-residual",
        ),
        (
            "[[rank=8]] and [[energy]] go together",
            "rank=8 and energy go together",
            "--rank 8 and --energy go together",
        ),
        (
            "[[StreamOptions(scratch=...)]] and [[StreamOptions(keep_cache=True)]] go with [[stream=StreamOptions()]]",
            "StreamOptions(scratch=...) and StreamOptions(keep_cache=True) go with stream=StreamOptions()",
            "--scratch and --keep-cache go with --stream",
        ),
        ("[[StreamOptions(scratch=DIR)]]", "StreamOptions(scratch=DIR)", "--scratch DIR"),
        (
            "[[push=PushTarget(REPO_ID)]] [[rslora=False]]",
            "push=PushTarget(REPO_ID) rslora=False",
            "--push-to-hub REPO_ID --classic",
        ),
        (
            '[[to="rslora"]], [[trained_on_scheme(double_quant=False)]]',
            'to="rslora", trained_on_scheme(double_quant=False)',
            "--to-rslora, --no-double-quant",
        ),
        (
            "or `[[rslora_tools.push(FOLDER, REPO_ID, revision=BRANCH)]]`",
            "or `rslora_tools.push(FOLDER, REPO_ID, revision=BRANCH)`",
            "or `rslora-tools push FOLDER REPO_ID --revision BRANCH`",
        ),
        (
            "instead ([[rslora_tools.inspect_adapter(ADAPTER, base=BASE)]]) and",
            "instead (rslora_tools.inspect_adapter(ADAPTER, base=BASE)) and",
            "instead (rslora-tools inspect ADAPTER --base BASE) and",
        ),
        ("the --dry-run-like words", "the --dry-run-like words", "the --dry-run-like words"),
    ],
)
def test_python_and_command_line_words(marked, python, command_line):
    assert python_words(marked) == python
    assert as_flags(marked) == command_line


def test_a_python_caller_reads_keywords_and_a_cli_user_flags(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as caught:
        rslora_tools.merge(BASE, ADAPTER, out, overwrite=False)
    assert "--" not in str(caught.value) and "overwrite" in str(caught.value), str(caught.value)
    line = cli_run("merge", BASE, ADAPTER, out, code=1).output
    assert "--overwrite" in line and "overwrite=True" not in line, line
