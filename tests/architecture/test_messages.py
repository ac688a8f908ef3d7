"""Messages give advice that can be followed, in the caller's words.

Every flag a message names is an option of a command; every command a message suggests exists and takes the
options it is shown with; the library's messages name flags the Python API can say in its own words
(errors.API_WORDS), and a Python caller reads those words, a CLI user the flags.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import pytest
from helpers import ADAPTER, BASE, cli_run

import rslora_tools
from rslora_tools.cli import cli
from rslora_tools.errors import API_WORDS, OutputError, api_words

PACKAGE = Path(rslora_tools.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SUGGESTION = re.compile(r"rslora-tools (\w+)((?: [^`);,\"]*)?)")


def message_strings(path: Path) -> list[str]:
    """The string constants of a module that are not docstrings, comments or a flag's declaration (f-strings' literal
    parts joined)."""
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


def test_every_flag_a_library_message_names_has_python_words():
    missing = {
        flag for p in LIBRARY for text in message_strings(p) for flag in FLAG.findall(text) if flag not in API_WORDS
    }
    assert missing == set()


def test_the_python_words_of_a_flag_name_the_field_it_is_declared_on():
    """API_WORDS says a one-flag option as its field (rslora_tools/flags.py declares which field a flag sets): a
    renamed field or flag cannot leave a message telling Python callers a keyword that does not exist."""
    from rslora_tools.commands import options as command_options
    from rslora_tools.execute import options as merge_options
    from rslora_tools.flags import flags_of
    from rslora_tools.hub.target import PushTarget

    classes = [
        merge_options.MergeOptions,
        PushTarget,
        *(
            getattr(command_options, n)
            for n in ("ConvertOptions", "CombineOptions", "ExtractOptions", "VerifyOptions", "InspectOptions")
        ),
    ]
    wrong = []
    for options in classes:
        for field, _, declared in flags_of(options):
            if len(declared) != 1 or declared[0].name not in API_WORDS:
                continue  # a field several flags make up says each in its own words (PushTarget(private=True))
            flag = declared[0]
            said = API_WORDS[flag.name]
            expected = (
                {f"{field}=True"}
                if flag.is_flag and flag.secondary is None
                else {f"{field}=True", f"{field}="}
                if flag.secondary
                else {f"{field}="}
            )
            if said not in expected and not said.startswith(f"{options.__name__}("):
                wrong.append(f"{options.__name__}.{field}: {flag.name} is said {said!r}")
    assert wrong == []


@pytest.mark.parametrize(
    ("cli_words", "python_words"),
    [
        ("pass --overwrite to replace it", "pass overwrite=True to replace it"),
        ("pass --initial INIT or --base-is-residual", "pass initial=INIT or base_is_residual=True"),
        ("--rank 8 and --energy go together", "rank=8 and energy go together"),
        (
            "--scratch and --keep-cache go with --stream",
            "StreamOptions(scratch=...) and StreamOptions(keep_cache=True) go with stream=StreamOptions()",
        ),
        (
            "or `rslora-tools push FOLDER REPO_ID --revision BRANCH`",
            "or `rslora_tools.push(FOLDER, REPO_ID, revision=BRANCH)`",
        ),
        ("instead (rslora-tools merge BASE ADAPTER OUT) and", "instead (rslora_tools.merge(BASE, ADAPTER, OUT)) and"),
        ("the --dry-run-like --unknown flag", "the --dry-run-like --unknown flag"),
    ],
)
def test_api_words(cli_words, python_words):
    assert api_words(cli_words) == python_words


def test_a_python_caller_reads_keywords_and_a_cli_user_flags(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as caught:
        rslora_tools.merge(BASE, ADAPTER, out, overwrite=False)
    assert "--" not in str(caught.value) and "overwrite" in str(caught.value), str(caught.value)
    line = cli_run("merge", BASE, ADAPTER, out, code=1).output
    assert "--overwrite" in line and "overwrite=True" not in line, line
