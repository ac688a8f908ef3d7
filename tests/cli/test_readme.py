"""The README as a newcomer follows it (and docs/layouts.md, docs/quantized-bases.md): its sample outputs are what the
commands print, and its exit-code table is
what they return.

Each `<!-- output of: COMMAND -->` block is the output of COMMAND (`<!-- output of (exit N): COMMAND -->`: one
that exits with N), run in order in a fresh folder holding the
fixtures, as a user runs it (a new process, stdout and stderr together); timings may differ. Regenerate the blocks
with `RSLORA_TOOLS_WRITE_DOCS=1 pytest tests/cli/test_readme.py`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES, ROOT, cli_run

README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- output of( \(exit (\d+)\))?: (.+?) -->\n```text\n(.*?)```", re.S)
TIMING = re.compile(r"\d+\.\d+ s\b")


def run_as_user(command: str, cwd: Path) -> subprocess.CompletedProcess:
    args = shlex.split(command)
    assert args[0] == "rslora-tools"
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "rslora_tools", *args[1:]],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder with the fixtures in it, as the README's commands expect (run from the repository's root)."""
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    return tmp_path


@pytest.mark.parametrize(
    "page", [README, ROOT / "docs" / "layouts.md", ROOT / "docs" / "quantized-bases.md"], ids=lambda p: p.name
)
def test_the_sample_outputs_are_what_the_commands_print(user_folder, page):
    text = page.read_text()
    blocks = BLOCK.findall(text)
    assert len(blocks) >= 4, f"{page.name} lost its sample outputs"
    made = text
    for exit_note, code, command, shown in blocks:
        done = run_as_user(command, user_folder)
        assert done.returncode == int(code or 0), (command, done.stdout)
        if os.environ.get("RSLORA_TOOLS_WRITE_DOCS") == "1":
            made = made.replace(
                f"<!-- output of{exit_note}: {command} -->\n```text\n{shown}```",
                f"<!-- output of{exit_note}: {command} -->\n```text\n{done.stdout}```",
            )
            continue
        assert TIMING.sub("N s", shown) == TIMING.sub("N s", done.stdout), (
            f"{page.name}'s output of `{command}` is stale"
        )
    if made != text:
        page.write_text(made)


def exit_code_rows() -> list[tuple[int, str]]:
    section = README.read_text().split("## Conventions", 1)[1]
    return [
        (int(code), example)
        for code, example in re.findall(r"^\| (\d+) \| [^|]+ \| `(rslora-tools [^`]+)` \|$", section, re.M)
    ]


@pytest.mark.parametrize(("code", "example"), exit_code_rows())
def test_each_exit_code_as_the_readme_says(user_folder, code, example):
    done = run_as_user(example, user_folder)
    assert done.returncode == code, done.stdout
    if code:
        assert done.stdout.strip().splitlines()[-1].startswith("Error: "), done.stdout


def test_the_exit_code_table_covers_every_code(tmp_path, monkeypatch):
    """0, 1 and 2 by the table's examples (above); 130 by a merge interrupted midway."""
    assert {code for code, _ in exit_code_rows()} == {0, 1, 2}
    assert "| 130 | interrupted" in README.read_text()
    import rslora_tools.execute.executor as executor

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "_produce_group", interrupted)
    result = cli_run("merge", FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora", tmp_path / "out", code=130)
    assert "interrupted; nothing was written" in result.output
