"""A newcomer's first hour (issue 25): true messages, consistent flags, `push` like `hf`, what the files say.

Messages a user reads are compared in full, with the temporary folder's path replaced by <tmp>.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest
from helpers import ADAPTER, BASE, ROOT, cli_run

import rslora_tools


def error_line(result, tmp: Path | None = None) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    return lines[0].replace(str(tmp), "<tmp>") if tmp is not None else lines[0]


@pytest.fixture
def in_repo_root(monkeypatch):
    """Commands run from the repository's root, as the README's are (`fixtures/...` relative paths)."""
    monkeypatch.chdir(ROOT)


# --- 1, 3: a mistyped path; a repo that cannot be fetched ------------------------------------------------------


def test_a_mistyped_local_path_is_a_missing_folder_with_the_closest_name(in_repo_root, tmp_path):
    result = cli_run("merge", "fixtures/tiny-lama", "fixtures/tiny-llama-rslora", tmp_path / "out", code=1)
    assert (
        error_line(result)
        == "Error: fixtures/tiny-lama: base model folder not found (did you mean fixtures/tiny-llama?)"
    )
    result = cli_run("inspect", "fixtures/tiny-llama-rsloar", code=1)
    assert error_line(result) == (
        "Error: fixtures/tiny-llama-rsloar: adapter folder not found (did you mean fixtures/tiny-llama-rslora?)"
    )
    result = cli_run("inspect", "fixtures/zzz", code=1)
    assert error_line(result) == "Error: fixtures/zzz: adapter folder not found"


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_repo_that_cannot_be_fetched_says_why_in_this_tools_words(tmp_path, monkeypatch):
    endpoint = closed_port()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    unreachable = error_line(cli_run("inspect", "org/nothing", code=1))
    assert re.fullmatch(
        rf"Error: org/nothing: the Hub at {re.escape(endpoint)} cannot be reached \(.*[Cc]onnect.*\) and the repo is "
        r"not in the local cache; check the network or HF_ENDPOINT \('org/nothing' is not a local folder either\)",
        unreachable,
    ), unreachable
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = error_line(cli_run("inspect", "org/nothing", code=1))
    assert offline == (
        "Error: org/nothing: not in the local cache, and HF_HUB_OFFLINE=1 forbids downloading; run once "
        "online (HF_HUB_OFFLINE=0) to download it ('org/nothing' is not a local folder either)"
    )
    assert "local_files_only" not in unreachable + offline


# --- 2: BASE auto with a relative recorded base ------------------------------------------------------------------


def test_merge_auto_finds_a_relative_base_from_the_adapters_folder(tmp_path, monkeypatch):
    """The fixture adapter records `fixtures/tiny-llama`, relative to where it was made (the repository's root)."""
    assert (
        json.loads((ADAPTER / "adapter_config.json").read_text())["base_model_name_or_path"] == "fixtures/tiny-llama"
    )
    monkeypatch.chdir(tmp_path)
    result = cli_run("merge", "auto", ADAPTER, tmp_path / "out")
    assert (
        f"Warning: BASE auto: the adapter records its base as the relative path 'fixtures/tiny-llama'; using "
        f"{ROOT / 'fixtures' / 'tiny-llama'}, found from the adapter's folder"
    ) in result.output
    cli_run("verify", tmp_path / "out", BASE, ADAPTER)


def test_merge_auto_says_where_it_looked(tmp_path, monkeypatch):
    lone = tmp_path / "lone" / "adapter"
    shutil.copytree(ADAPTER, lone)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = error_line(cli_run("merge", "auto", lone, tmp_path / "out", code=1), tmp_path)
    assert line.startswith("Error: fixtures/tiny-llama: ")
    assert line.endswith(
        "; BASE auto: the adapter records its base as 'fixtures/tiny-llama', which as a relative path "
        f"is in none of <tmp>/work, <tmp>/lone/adapter, <tmp>/lone, <tmp>, "
        f"{', '.join(str(p) for p in tmp_path.parents)}; pass BASE"
    ), line


# --- 5: wording ------------------------------------------------------------------------------------------------


def test_runtimes_whose_every_release_behaves_alike_are_named_alone(tmp_path):
    result = cli_run("convert", ADAPTER, tmp_path / "p", "--target", "peft")
    assert result.output.startswith(
        f"Wrote {tmp_path / 'p'}: PEFT already applies PEFT's scale to every module; copied unchanged\n"
    )
    result = cli_run("convert", ADAPTER, tmp_path / "s", "--target", "sglang")
    assert "SGLang ignores use_rslora" in result.output and "all releases" not in result.output
    result = cli_run("convert", ADAPTER, tmp_path / "g.gguf", "--target", "llama.cpp", "--base", BASE)
    assert "all releases" not in result.output


def test_counts_agree_with_their_nouns(tmp_path):
    result = cli_run("combine", ADAPTER, tmp_path / "c")
    assert f"Wrote {tmp_path / 'c'}: 1 adapter combined by cat (weights 1), 14 modules," in result.output
    assert "; 1 shard, " in cli_run("merge", BASE, ADAPTER, tmp_path / "m").output


def test_the_quantization_line_labels_its_percentages(tmp_path):
    out = cli_run("merge", BASE, ADAPTER, tmp_path / "q", "--trained-on", "nf4").output
    assert re.search(
        r"quantization moved the weights by [\d.]+% of their norm, [\d.e-]+x the adapter's own delta "
        r"\(which is [\d.]+% of their norm\); median of 14 of 14 targeted weights",
        out,
    ), out


def test_progress_bars_count_in_the_units_the_summary_uses(monkeypatch):
    from rslora_tools.cli.progress import byte_progress
    from rslora_tools.formats.sizes import human_size

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with byte_progress("Merging", True) as progress:
        progress(439_400_000, 439_400_000)
    assert human_size(439_400_000) == "439.4 MB" and "439M" in terminal.getvalue(), terminal.getvalue()


# --- 6, 7, 9: flags --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("convert", ADAPTER, "OUT", "--to-rslora", "--to-classic"),
            "--to-rslora and --to-classic exclude each other",
        ),
        (("merge", BASE, ADAPTER, "OUT", "--private"), "--private goes with --push-to-hub REPO_ID"),
        (("merge", BASE, ADAPTER, "OUT", "--create-pr"), "--create-pr goes with --push-to-hub REPO_ID"),
        (
            ("convert", ADAPTER, "OUT", "--target", "vllm", "--commit-message", "x"),
            "--commit-message goes with --push-to-hub REPO_ID",
        ),
        (("merge", BASE, ADAPTER, ADAPTER, "OUT", "--weights", "1"), "--weights has 1 weight for 2 adapters"),
        (("extract", BASE, BASE, "OUT", "--rank", "4", "--energy", "0.9"), None),
        (("combine", ADAPTER, ADAPTER, "OUT", "--method", "ties", "--density", "2"), None),
    ],
)
def test_conflicting_orphan_and_out_of_range_flags_are_usage_errors(tmp_path, args, message):
    args = [tmp_path / "out" if a == "OUT" else a for a in args]
    result = cli_run(*args, code=2)
    assert result.output.startswith("Usage: rslora-tools ") and not (tmp_path / "out").exists()
    if message is not None:
        assert error_line(result) == f"Error: {message}"


@pytest.mark.parametrize(("spelling", "dtype"), [("bfloat16", "BF16"), ("float16", "F16"), ("float32", "F32")])
def test_dtype_takes_the_torch_spellings(tmp_path, spelling, dtype):
    report = json.loads(cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dtype", spelling, "--json").stdout)
    assert report["dtype"] == dtype


# --- 8: silent no-ops ------------------------------------------------------------------------------------------


def test_a_base_without_config_json_is_merged_and_verified_with_a_warning(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    (base / "config.json").unlink()
    merged = cli_run("merge", base, ADAPTER, tmp_path / "out").output
    assert (
        f"Warning: {base} has no config.json, so the merged model has none either: transformers cannot load it "
        "without one (copy the base model's config.json into OUT)"
    ) in merged
    checked = cli_run("verify", tmp_path / "out", base, ADAPTER).output
    assert (
        f"Warning: {tmp_path / 'out'} has no config.json (nor has BASE): transformers cannot load it without one; "
        "copy the base model's config.json into it"
    ) in checked


def test_extract_with_target_modules_that_name_nothing_is_refused(tmp_path):
    tuned = cli_run("merge", BASE, ADAPTER, tmp_path / "tuned") and tmp_path / "tuned"
    result = cli_run("extract", BASE, tuned, tmp_path / "out", "--rank", "4", "--target-modules", "nonexist", code=1)
    assert error_line(result) == (
        "Error: --target-modules 'nonexist' names no module of the models that LoRA can "
        "express (a module's name or its last part: down_proj, embed_tokens, gate_proj, "
        "k_proj, lm_head, o_proj, ...)"
    )
    assert not (tmp_path / "out").exists()


# --- 10, 11: push like hf upload; the model card ---------------------------------------------------------------


def test_push_with_hfs_argument_order_names_the_right_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_run("merge", BASE, ADAPTER, "merged")
    result = cli_run("push", "me/x", "merged", code=2)
    assert error_line(result) == (
        "Error: 'me/x' is not a folder but 'merged' is: the order is FOLDER REPO_ID "
        "(hf upload takes REPO_ID PATH); run: rslora-tools push merged me/x"
    )


def test_push_dry_run_shows_the_files_and_the_card_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", closed_port())  # nothing may be asked of a Hub
    cli_run("merge", BASE, ADAPTER, tmp_path / "merged", "--verify", "--token", "hf_secret_value")
    text = cli_run("push", tmp_path / "merged", "me/x", "--dry-run").output
    assert text.startswith("Would push 8 files to me/x in one commit (")
    for name in (
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "rslora_tools.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ):
        assert f"\n  {name}  " in text
    assert "base_model_relation" not in text  # local inputs: no Hub base to relate to
    assert "- Verified after merging (`--verify`): exact, 21 tensors recomputed and compared" in text
    assert "rslora-tools merge tiny-llama tiny-llama-rslora merged --verify --token '***'" in text
    assert "hf_secret_value" not in text + (tmp_path / "merged" / "rslora_tools.json").read_text()
    preview = json.loads(cli_run("push", tmp_path / "merged", "me/x", "--dry-run", "--json").stdout)
    assert preview["dry_run"] and "README.md" in preview["files"] and preview["card"].startswith("---\n")
    assert not (tmp_path / "merged" / "README.md").exists()  # FOLDER is never changed


def test_a_failed_stream_leaves_no_empty_scratch_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", closed_port())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cli_run("merge", BASE, ADAPTER, "--push-to-hub", "me/x", "--stream", code=1)
    assert not (tmp_path / "cache").exists()


# --- 12-14: the documents -----------------------------------------------------------------------------------------


def test_the_changelog_has_one_of_each_heading_per_release_and_names_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.split(r"^## ", text, flags=re.M)[1:]
    assert releases[0].startswith("[Unreleased]")
    assert releases[1].startswith(f"[{rslora_tools.__version__}] - ")
    for release in releases:
        headings = re.findall(r"^### (\w+)", release, re.M)
        assert len(headings) == len(set(headings)), release.splitlines()[0]


def test_the_readme_quickstart_outputs_are_ignored_by_git():
    ignored = set((ROOT / ".gitignore").read_text().split())
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"<!-- output of: (rslora-tools .+?) -->", quickstart)
    outputs = {f"/{word}" for command in commands for word in command.split()[2:] if re.fullmatch(r"[\w-]+/", word)}
    assert outputs and outputs <= ignored, outputs - ignored


def test_the_readme_leads_with_contents_install_and_quickstart():
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings[:3] == ["Install", "Quickstart", "Common tasks"], headings
    assert {"Commands", "Conventions", "Documentation", "Tests"} <= set(headings)
    assert "**Contents:**" in readme.split("## Install")[0]
    assert len(readme.splitlines()) < 350
    for link in re.findall(r"\]\((docs/[\w.-]+\.md)", readme):
        assert (ROOT / link).is_file(), link
    assert os.path.getsize(ROOT / "docs" / "commands.md") > 0
