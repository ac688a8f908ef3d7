"""What a push does to a repo (docs/reliability.md, "What a push does to a repo"), for `push`, every
`--push-to-hub` and `merge --stream`, against the loopback Hub with the real huggingface_hub client:
stale weight and adapter files are deleted in the same commit, an input's own repo is refused, side
files that link out of their folder are refused, a Hub base with both layouts is refused as a local
one is, and a shard push would skip (a hidden file) is refused before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run
from peft import LoraConfig
from peft_oracle import make_adapter, make_llama
from safetensors.torch import load_file, save_file

STALE = {
    "model.safetensors": b"an older merge",
    "adapter_config.json": b"{}",
    "adapter_model.safetensors": b"old",
    "pytorch_model.bin": b"pickle",
    "model-q4.gguf": b"GGUF",
    "notes.txt": b"kept",
    "original/consolidated.safetensors": b"kept too (not top-level)",
}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    """A base in 3+ shards and an adapter for it (a merge of it is an index and shards)."""
    root = tmp_path_factory.mktemp("publishing-models")
    base = make_llama(root / "base", torch.float32, max_shard_size="40KB")
    adapter = make_adapter(
        base, root / "adapter", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])
    )
    return base, adapter


@pytest.fixture
def hub(fake_hub, sharded):
    base, adapter = sharded
    fake_hub.upload_local_folder("org/base", base)
    fake_hub.upload_local_folder("org/adapter", adapter)
    return fake_hub


def weight_files(files: dict[str, bytes]) -> list[str]:
    return sorted(
        n
        for n in files
        if "/" not in n
        and (n.endswith((".safetensors", ".gguf", ".bin")) or n.startswith("adapter_") or n.endswith(".index.json"))
    )


# --- 1. a push makes the repo's weight and adapter files exactly the new ones ---------------------------------


@pytest.mark.parametrize("how", ["push", "--push-to-hub", "--stream"])
def test_a_push_deletes_stale_weight_and_adapter_files_in_the_same_commit(hub, sharded, tmp_path, how):
    hub.add_commit("me/merged", STALE)
    before = len(hub.repos["me/merged"].commits)
    out = tmp_path / "out"
    if how == "push":
        cli_run("merge", *sharded, out)
        result = cli_run("push", out, "me/merged", "--json")
    elif how == "--push-to-hub":
        result = cli_run("merge", "org/base", "org/adapter", out, "--push-to-hub", "me/merged", "--json")
    else:
        result = cli_run(
            "merge",
            "org/base",
            "org/adapter",
            "--push-to-hub",
            "me/merged",
            "--stream",
            "--json",
            "--scratch",
            tmp_path / "scratch",
        )
    pushed = json.loads(result.stdout)
    report = pushed if how == "push" else pushed["push"]
    files = hub.files("me/merged")
    new_weights = [n for n in weight_files(files)]
    assert "model.safetensors.index.json" in new_weights and "model.safetensors" not in new_weights
    assert all(n.startswith("model-") or n.endswith(".index.json") for n in new_weights), new_weights
    assert report["removed"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "model-q4.gguf",
        "model.safetensors",
        "pytorch_model.bin",
    ]
    assert files["notes.txt"] == b"kept" and "original/consolidated.safetensors" in files
    assert len(hub.repos["me/merged"].commits) == before + 1  # one commit adds and deletes
    if how == "push":
        hub.add_commit("me/merged", {"model.safetensors": b"pushed again by someone"})
        said = cli_run("push", out, "me/merged").output
        assert "removed from the repo in the same commit (stale weight or adapter files): model.safetensors" in said


def test_a_converted_adapter_pushed_over_a_merged_model_leaves_no_weights_behind(hub, tmp_path):
    hub.add_commit("me/thing", {"model.safetensors": b"merged weights", "config.json": b"{}"})
    cli_run("convert", ADAPTER, tmp_path / "conv", "--target", "vllm", "--push-to-hub", "me/thing")
    files = hub.files("me/thing")
    assert weight_files(files) == ["adapter_config.json", "adapter_model.safetensors"]


# --- 2. never into an input's own repo -------------------------------------------------------------------------


@pytest.mark.parametrize("repo", ["org/base", "org/adapter", "ORG/Adapter"])
def test_pushing_into_an_inputs_own_repo_is_refused_before_any_work(hub, tmp_path, repo):
    before = {r: dict(hub.files(r)) for r in ("org/base", "org/adapter")}
    result = cli_run("merge", "org/base", "org/adapter", tmp_path / "out", "--push-to-hub", repo, code=1)
    role = "base" if repo == "org/base" else "adapter"
    assert f"is the repo of the {role}" in result.output and "--create-pr" in result.output
    assert not (tmp_path / "out").exists()  # refused before the merge
    result = cli_run("merge", "org/base", "org/adapter", "--push-to-hub", repo, "--stream", code=1)
    assert f"is the repo of the {role}" in result.output
    assert {r: dict(hub.files(r)) for r in ("org/base", "org/adapter")} == before
    assert not hub.uploads


def test_a_pull_request_or_another_branch_of_an_input_repo_is_allowed(hub, tmp_path):
    out = tmp_path / "out"
    cli_run("merge", "org/base", "org/adapter", out, "--push-to-hub", "org/adapter", "--create-pr")
    assert "adapter_config.json" in hub.files("org/adapter")  # main is untouched: the merge is in a PR
    pr = [b for b in hub.repos["org/adapter"].branches if b.startswith("refs/pr/")]
    assert pr and "model.safetensors.index.json" in hub.files("org/adapter", pr[0])
    result = cli_run("push", out, "org/adapter", code=1)  # the folder's rslora_tools.json names its inputs
    assert "is the repo of the adapter" in result.output
    cli_run("push", out, "org/adapter", "--revision", "merged")
    assert "model.safetensors.index.json" in hub.files("org/adapter", "merged")
    assert "model.safetensors.index.json" not in hub.files("org/adapter")


# --- 3. side files that link out of their folder -------------------------------------------------------------


def test_a_side_file_linking_out_of_a_folder_is_never_copied_or_published(hub, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(BASE, base)
    shutil.copytree(ADAPTER, adapter)
    (adapter / "chat_template.jinja").symlink_to(secret)
    result = cli_run("merge", base, adapter, tmp_path / "out", "--push-to-hub", "me/leak", code=1)
    assert "'chat_template.jinja' is a link that leaves the folder" in result.output
    result = cli_run("convert", adapter, tmp_path / "conv", "--target", "vllm", "--push-to-hub", "me/leak", code=1)
    assert "is a link that leaves the folder" in result.output
    (adapter / "chat_template.jinja").unlink()
    (base / "tokenizer.json").unlink()  # the fixture's own, replaced by a link out of the folder
    (base / "tokenizer.json").symlink_to(secret)
    result = cli_run("merge", base, adapter, "--push-to-hub", "me/leak", "--stream", code=1)
    assert "'tokenizer.json' is a link that leaves the folder" in result.output
    folder = tmp_path / "to-push"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "notes.md").symlink_to(secret)
    assert "is a link that leaves the folder" in cli_run("push", folder, "me/leak", code=1).output
    assert "me/leak" not in hub.repos and not (tmp_path / "out").exists() and not (tmp_path / "conv").exists()


# --- 6. one rule for a base with both layouts, local or on the Hub -------------------------------------------


def test_a_hub_base_with_both_a_single_file_and_an_index_is_refused_as_a_local_one(hub, sharded, tmp_path):
    base, _ = sharded
    both = dict(hub.files("org/base"))
    both["model.safetensors"] = (BASE / "model.safetensors").read_bytes()
    hub.add_commit("org/both", both)
    expected = (
        "holds both model.safetensors and model.safetensors.index.json; transformers loads model.safetensors "
        "and ignores the index, so which one is the model is ambiguous: remove the other one"
    )
    for args in (
        ["merge", "org/both", "org/adapter", tmp_path / "out"],
        ["merge", "org/both", "org/adapter", "--push-to-hub", "me/x", "--stream"],
    ):
        result = cli_run(*args, code=1)
        assert result.output.strip() == f"Error: org/both: {expected}"
    local = tmp_path / "both"
    shutil.copytree(base, local)
    shutil.copy(BASE / "model.safetensors", local / "model.safetensors")
    assert (
        cli_run("merge", local, "org/adapter", tmp_path / "out", code=1).output.strip()
        == f"Error: {local}: {expected}"
    )


# --- 16. what a push would skip is refused --------------------------------------------------------------------


def test_a_folder_whose_index_names_a_hidden_shard_is_not_pushed(hub, sharded, tmp_path):
    out = tmp_path / "out"
    cli_run("merge", *sharded, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (out / first).rename(out / f".{first}")
    index["weight_map"] = {k: (f".{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli_run("push", out, "me/hidden", code=1)
    assert f"names shard '.{first}', which is a hidden file, which a push skips" in result.output
    assert "me/hidden" not in hub.repos


def test_a_stream_checks_each_base_shard_against_the_sha256_the_hub_lists(hub, sharded, tmp_path):
    """A Hub serving other bytes for a shard at the same commit (same size) makes no scrambled model."""
    shards = sorted(n for n in hub.files("org/base") if n.startswith("model-"))
    tensors = load_file(sharded[0] / shards[-1])
    tampered = {k: torch.full_like(v, 0.5) for k, v in tensors.items()}
    path = tmp_path / "tampered.safetensors"
    save_file(tampered, path, metadata={"format": "pt"})
    hub.served[shards[-1]] = path.read_bytes()
    assert len(hub.served[shards[-1]]) == len(hub.files("org/base")[shards[-1]])
    result = cli_run(
        "merge",
        "org/base",
        "org/adapter",
        "--push-to-hub",
        "me/x",
        "--stream",
        "--scratch",
        tmp_path / "scratch",
        code=1,
    )
    assert f"{shards[-1]}: the bytes received have sha256" in result.output and "the Hub lists" in result.output
    assert len(hub.repos["me/x"].commits) == 1  # created, nothing committed


def test_the_card_links_no_page_the_project_does_not_own_and_shows_only_what_the_folder_holds(tmp_path):
    """The card linked pypi.org/project/rslora-tools (not this project's) and told users to load a tokenizer from a
    folder that has none (issue 36)."""
    from helpers import ADAPTER, BASE, cli_run

    from rslora_tools.hub.card import model_card, project_url

    bare = tmp_path / "bare"  # the fixture base without its tokenizer
    shutil.copytree(BASE, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    cli_run("merge", bare, ADAPTER, tmp_path / "merged")
    card = model_card(tmp_path / "merged", "me/merged")
    assert "pypi.org" not in card and "AutoTokenizer" not in card
    url = project_url()  # [project.urls] in pyproject.toml; none declared: the card names the tool without a link
    assert f"[rslora-tools]({url})" in card if url else "with rslora-tools 0." in card
    cli_run("merge", BASE, ADAPTER, tmp_path / "with-tokenizer")
    assert 'tokenizer = AutoTokenizer.from_pretrained("me/merged")' in model_card(
        tmp_path / "with-tokenizer", "me/merged"
    )
