"""Free space and full disks: refused before writing, or nothing left behind, with one true line."""

from __future__ import annotations

import pytest
from helpers import ADAPTER, BASE, cli_run

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"  # untouched by the adapter


@pytest.fixture
def tiny_disk(small_disk):
    """A 24 KB file system: smaller than a merge of the fixtures."""
    return small_disk("24k")


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import importlib

    merge_module = importlib.import_module("rslora_tools.execute.folder_writer")

    monkeypatch.setattr(merge_module, "free_space", lambda out: 1000)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", code=1)
    assert "writes 46.7 KB but only 1.0 KB is free there" in result.output  # the fixture's weights and side files
    assert list(tmp_path.iterdir()) == []


def test_small_disk_is_refused_by_the_free_space_check(tiny_disk):
    result = cli_run("merge", BASE, ADAPTER, tiny_disk / "out", code=1)
    assert "is free there" in result.output
    assert list(tiny_disk.iterdir()) == []


def test_full_disk_midway_leaves_nothing(tiny_disk, monkeypatch):
    import importlib

    merge_module = importlib.import_module("rslora_tools.execute.folder_writer")

    monkeypatch.setattr(merge_module, "free_space", lambda out: None)  # free space unknown: no early refusal
    result = cli_run("merge", BASE, ADAPTER, tiny_disk / "out", code=1)
    assert "No space left on device" in result.output and "nothing was written" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tiny_disk.iterdir()) == []


def test_convert_on_a_full_disk_names_the_output(small_disk):
    tiny_disk = small_disk("12k")
    for out in ("c", "g.gguf"):
        args = ["convert", ADAPTER, tiny_disk / out, "--target", "llama.cpp" if out.endswith(".gguf") else "unit"]
        if out.endswith(".gguf"):
            args += ["--base", BASE]
        result = cli_run(*args, code=1)
        line = result.output.strip()
        assert str(tiny_disk / out) in line and "nothing was written" in line and "unexpected" not in line, line
        assert list(tiny_disk.iterdir()) == []
