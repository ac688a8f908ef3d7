"""The Python API does what the CLI does: the README's Python section, run as written against the loopback Hub."""

from __future__ import annotations

import json
import os
import re

import pytest
from helpers import ADAPTER, BASE, FIXTURES, ROOT
from safetensors import safe_open

import rslora_tools
from rslora_tools import MergeOptions, OptionError, PushTarget, RsloraError, merge


@pytest.fixture
def hub(fake_hub):
    fake_hub.upload_local_folder("org/base", FIXTURES / "tiny-llama")
    fake_hub.upload_local_folder("org/adapter", FIXTURES / "tiny-llama-rslora")
    return fake_hub


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_section_runs_as_written(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").symlink_to(FIXTURES)
    exec(compile(readme_python_block(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("14 3.0052") and printed[0].endswith(" 8.0")
    assert printed[1] == "exact" and printed[2].startswith(hub.url) and "wrong scale" in printed[-1]
    with safe_open(tmp_path / "merged-bf16" / "model.safetensors", "pt") as f:  # the Hub merge, in bf16
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert (
        hub.files("me/merged-bf16")["model.safetensors"]
        == (tmp_path / "merged-bf16" / "model.safetensors").read_bytes()
    )
    assert hub.repos["me/merged-bf16"].private
    record = json.loads((tmp_path / "stacked" / "rslora_tools.json").read_text())  # the stacked merge
    assert record["weights"] == [0.7, 0.4] and [a.get("repo_id") for a in record["adapters"]] == ["org/adapter", None]
    streamed = hub.files("me/merged-streamed")  # the stream equals the plain merge
    assert streamed["model.safetensors"] == (tmp_path / "merged" / "model.safetensors").read_bytes()


def test_keyword_arguments_are_the_options_fields_and_are_checked(tmp_path):
    with pytest.raises(OptionError, match="unknown dtype 'int4'"):
        merge(FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora", tmp_path / "out", dtype="int4")
    with pytest.raises(TypeError, match="unknown option 'dtpye'"):
        merge(FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora", tmp_path / "out", dtpye="bf16")
    with pytest.raises(OptionError, match=r"stream=StreamOptions\(\) sends the merged model to the Hub: pass push="):
        MergeOptions(stream=rslora_tools.StreamOptions())
    assert MergeOptions(dtype="bfloat16", max_shard_size="5GB", trained_on="nf4").dtype == "BF16"
    assert not (tmp_path / "out").exists()


def test_errors_carry_what_they_are_about(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    with pytest.raises(RsloraError) as caught:
        merge(FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora", tmp_path / "out", overwrite=True)
    assert "did not write" in str(caught.value)
    assert os.listdir(tmp_path / "out") == ["mine.txt"]
    with pytest.raises(OptionError):
        PushTarget("me/x@dev")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_shard_size=-1), "invalid size -1; it must be a positive number of bytes"),
        (dict(max_shard_size=0), "invalid size 0"),
        (dict(weights="0.7,x"), "weights='0.7,x' is not a comma-separated list of numbers"),
        (dict(weights=[float("nan")]), "weights must be finite numbers"),
    ],
)
def test_bad_values_are_option_errors_in_the_python_api(tmp_path, kwargs, message):
    """max_shard_size=-1 wrote one shard per tensor; a weights string was read character by character."""
    import rslora_tools
    from rslora_tools.errors import OptionError

    with pytest.raises(OptionError, match=re.escape(message)):
        rslora_tools.merge(BASE, ADAPTER, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_weights_string_and_no_adapter_in_the_python_api(tmp_path):
    import rslora_tools
    from rslora_tools.errors import OptionError

    report = rslora_tools.merge(BASE, [ADAPTER, ADAPTER], tmp_path / "out", weights="0.5,0.5")
    assert report.weights == [0.5, 0.5]
    with pytest.raises(OptionError, match="no ADAPTER given"):
        rslora_tools.merge(BASE, [], tmp_path / "none")
