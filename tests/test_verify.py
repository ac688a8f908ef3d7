"""verify vouches only for what a loader loads, and says which recipe it checked.

(The other checks of what a loader loads are in test_trust_two.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from rslora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, ADAPTER = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora"


def run(*args, code: int | None = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def test_a_merged_folder_that_also_holds_the_adapter_is_a_folder_problem(tmp_path):
    """transformers loads a folder with adapter_config.json as that adapter on its base: the merge applied twice."""
    out = tmp_path / "out"
    run("merge", BASE, ADAPTER, out)
    assert run("verify", out, BASE, ADAPTER).output.startswith("EXACT")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ADAPTER / name, out / name)
    result = run("verify", out, BASE, ADAPTER, code=1)
    assert ("problem: adapter_config.json, adapter_model.safetensors in the merged folder: transformers and PEFT load "
            "such a folder as an adapter and apply it (again) on top of the merged weights; remove them from the "
            "merged model") in result.output
    assert "MISMATCH" in result.output and "1 folder problem(s)" in result.output


def test_the_verdict_names_the_recipe_taken_from_the_merged_folders_record(tmp_path):
    out = tmp_path / "out"
    run("merge", BASE, ADAPTER, ADAPTER, out, "--weights", "0.7,0.4")
    result = run("verify", out, BASE, ADAPTER, ADAPTER)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("EXACT") and line.endswith("; recipe from rslora_tools.json of MERGED: --weights 0.7,0.4")
    report = json.loads(run("verify", out, BASE, ADAPTER, ADAPTER, "--json").stdout)
    assert report["recipe"]["from"] == "rslora_tools.json of MERGED" and report["recipe"]["weights"] == [0.7, 0.4]
    given = run("verify", out, BASE, ADAPTER, ADAPTER, "--weights", "0.7,0.4").output.strip().splitlines()[-1]
    assert given.startswith("EXACT") and "recipe from" not in given  # the arguments: nothing to say
    assert run("verify", out, BASE, ADAPTER, ADAPTER, "--weights", "1,1", code=1).output.count("mismatch:") > 0


def test_a_trained_on_recipe_taken_from_the_record_is_named_too(tmp_path):
    out = tmp_path / "out"
    run("merge", BASE, ADAPTER, out, "--trained-on", "nf4")
    line = run("verify", out, BASE, ADAPTER).output.strip().splitlines()[-1]
    assert line.startswith("EXACT")
    assert line.endswith("; recipe from rslora_tools.json of MERGED: --trained-on nf4 (no double quant, blocksize 64)")
