"""Hub workflow against a loopback stand-in of the Hub HTTP API, with the real huggingface_hub client.

Xet is disabled (HF_HUB_DISABLE_XET=1): uploads take the legacy LFS path here; Xet transfers
are exercised only against the real Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub
from helpers import ADAPTER, BASE, cli_run

TOKEN = "hf_fake_token"  # the fake Hub's token (conftest.fake_hub)


@pytest.fixture
def hub(fake_hub, tmp_path):
    server = fake_hub
    # The base repo also holds what a merge must never download: a pickle and another weights variant.
    base = tmp_path / "base-upload"
    shutil.copytree(BASE, base)
    (base / "pytorch_model.bin").write_bytes(b"not a real pickle")
    (base / "original").mkdir()
    (base / "original" / "consolidated.safetensors").write_bytes((BASE / "model.safetensors").read_bytes())
    server.upload_local_folder("org/base", base)
    adapter = tmp_path / "adapter-upload"
    shutil.copytree(ADAPTER, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (adapter / "adapter_model.bin").write_bytes(b"pickle that must never be fetched")
    server.upload_local_folder("org/adapter", adapter)
    return server


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def downloaded(hub: FakeHub) -> list[str]:
    return [p for m, p in hub.requests if m == "GET" and "/resolve/" in p]


def test_merge_from_repo_ids_push_and_download_again(hub, tmp_path):
    revision = hub.repos["org/base"].branches["main"]
    hub.add_commit("org/base", {"README.md": b"a later commit"})  # the pinned revision must be what is used
    cli_run("merge", f"org/base@{revision}", "org/adapter", tmp_path / "out", "--push-to-hub", "me/merged")
    cli_run("merge", BASE, ADAPTER, tmp_path / "local")
    out = local_files(tmp_path / "out")
    assert out["model.safetensors"] == local_files(tmp_path / "local")["model.safetensors"]
    # Only what the merge reads was downloaded: no pickle, no other weight variant.
    fetched = downloaded(hub)
    assert not [p for p in fetched if p.endswith(".bin") or "/original/" in p], fetched
    assert any(f"/org/base/resolve/{revision}/model.safetensors" in p for p in fetched)
    assert all("rslora-tools/" in ua for ua, (m, p) in zip(hub.user_agents, hub.requests) if "/api/" in p)
    # The repo holds every local file plus a generated card; OUT itself got no README.
    remote = hub.files("me/merged")
    assert "README.md" not in out
    for name, content in out.items():
        assert remote[name] == content, name
    card = remote["README.md"].decode()
    assert "base_model: org/base" in card and "base_model_relation: merge" in card
    assert "library_name: transformers" in card and "- rslora" in card and "org/adapter" in card
    from huggingface_hub import ModelCard

    data = ModelCard(card).data.to_dict()  # huggingface_hub's own parsing of the metadata
    assert (data["base_model"], data["base_model_relation"], data["library_name"]) == (
        "org/base",
        "merge",
        "transformers",
    )
    assert f"rslora-tools merge org/base@{revision} org/adapter out --push-to-hub me/merged" in card
    # Downloading the pushed repo gives the same bytes.
    from huggingface_hub import snapshot_download

    again = Path(snapshot_download("me/merged", endpoint=hub.url, cache_dir=str(tmp_path / "c2"), token=TOKEN))
    for name, content in out.items():
        assert (again / name).read_bytes() == content


def test_base_auto_and_hf_uri(hub, tmp_path):
    result = cli_run("merge", "auto", "hf://org/adapter", tmp_path / "out", "--json")
    report = json.loads(result.stdout)
    assert report["modules"] == 14
    provenance = json.loads((tmp_path / "out" / "rslora_tools.json").read_text())
    assert provenance["base"]["repo_id"] == "org/base" and provenance["adapter"]["repo_id"] == "org/adapter"
    assert len(provenance["base"]["commit"]) == 40


def test_base_mismatch_is_a_warning(hub, tmp_path):
    hub.upload_local_folder("org/other-base", BASE)
    result = cli_run("merge", "org/other-base", "org/adapter", tmp_path / "out")
    assert "Warning: the adapter was trained on 'org/base' but BASE is 'org/other-base'" in result.output


def test_offline_merge_from_the_cache_sends_no_request(hub, tmp_path, monkeypatch):
    cli_run("merge", "org/base", "org/adapter", tmp_path / "online")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    cli_run("merge", "org/base", "org/adapter", tmp_path / "offline")
    assert hub.requests == []
    assert (
        local_files(tmp_path / "offline")["model.safetensors"] == local_files(tmp_path / "online")["model.safetensors"]
    )
    result = cli_run("merge", "org/base", "org/never-downloaded", tmp_path / "x", code=1)
    assert "HF_HUB_OFFLINE" in result.output and hub.requests == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("org/base", "org/missing"), "org/missing: no such repo on the Hub"),
        (("org/base@nope", "org/adapter"), "revision 'nope' not found"),
        (("not a repo!", "org/adapter"), "not a Hub repo id"),
    ],
)
def test_download_errors_are_one_line(hub, tmp_path, args, says):
    result = cli_run("merge", *args, tmp_path / "out", code=1)
    assert says in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_push_without_valid_token_is_401(hub, tmp_path, monkeypatch):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = cli_run("push", tmp_path / "out", "me/merged", code=1)
    assert "not authorized (401)" in result.output and "hf_wrong" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "me/merged" not in hub.repos


def test_server_error_mid_upload(hub, tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    before = local_files(tmp_path / "out")
    hub.fail[r"/commit/"] = 500
    result = cli_run("push", tmp_path / "out", "me/merged", code=1)
    assert "answered 500" in result.output and "re-run the same push to resume" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert local_files(tmp_path / "out") == before  # the local folder is untouched
    hub.fail.clear()
    cli_run("push", tmp_path / "out", "me/merged")  # a re-run completes
    assert hub.files("me/merged")["model.safetensors"] == before["model.safetensors"]


def test_push_failure_after_merge_keeps_the_complete_output(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--push-to-hub", "me/merged", code=1)
    assert "is complete on disk" in result.output and "rslora-tools push" in result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_push_options_private_branch_pr_and_message(hub, tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    cli_run("push", tmp_path / "out", "me/merged", "--private", "--commit-message", "first")
    repo = hub.repos["me/merged"]
    assert repo.private and repo.messages[repo.branches["main"]] == "first"
    cli_run("push", tmp_path / "out", "me/merged", "--revision", "dev")
    assert "dev" in repo.branches and "model.safetensors" in hub.files("me/merged", "dev")
    report = json.loads(cli_run("push", tmp_path / "out", "me/merged", "--create-pr", "--json").stdout)
    assert report["pr_url"] and "refs/pr/1" in repo.branches


def test_user_readme_is_kept(hub, tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    (tmp_path / "out" / "README.md").write_text("# mine\n")
    report = json.loads(cli_run("push", tmp_path / "out", "me/merged", "--json").stdout)
    assert not report["card_written"] and hub.files("me/merged")["README.md"] == b"# mine\n"


def test_convert_from_the_hub_and_push_an_adapter(hub, tmp_path):
    cli_run("convert", "org/adapter", tmp_path / "vllm", "--target", "vllm", "--push-to-hub", "me/adapter-vllm")
    remote = hub.files("me/adapter-vllm")
    assert "adapter_model.bin" not in remote and "adapter_config.json" in remote
    # The fixture adapter has no README: push generated an adapter card.
    card = remote["README.md"].decode()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card
    assert "base_model:adapter:org/base" in card and "org/adapter" in card
    provenance = json.loads(remote["rslora_tools.json"])
    assert provenance["adapter"]["repo_id"] == "org/adapter" and provenance["target"] == "vllm"


def test_push_card_for_a_converted_adapter_without_readme(hub, tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(ADAPTER, adapter)
    (adapter / "README.md").unlink(missing_ok=True)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    cli_run("convert", adapter, tmp_path / "c", "--to-classic")
    cli_run("push", tmp_path / "c", "me/adapter-classic")
    card = hub.files("me/adapter-classic")["README.md"].decode()
    assert "library_name: peft" in card and "base_model: org/base" in card
    assert "base_model_relation: adapter" in card and "base_model:adapter:org/base" in card
    assert "classic LoRA" in card


def test_readme_workflow_in_a_subprocess(hub, tmp_path):
    """The README's Hub command, as a user runs it: env vars only, a fresh process."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "fresh-home"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TQDM_DISABLE": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rslora_tools",
            "merge",
            "org/base",
            "org/adapter",
            str(tmp_path / "out"),
            "--push-to-hub",
            "me/merged",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert (
        "Pushed" in result.stderr
        and hub.files("me/merged")["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
    )


def test_hf_uri_with_subfolder_and_pickle_only_base(hub, tmp_path):
    files = {f"adapters/mine/{p.name}": p.read_bytes() for p in ADAPTER.iterdir() if p.is_file()}
    files["adapters/other/adapter_model.bin"] = b"never fetched"
    hub.add_commit("org/many", files)
    cli_run("merge", BASE, "hf://org/many/adapters/mine", tmp_path / "out")
    assert not [p for m, p in hub.requests if "adapters/other" in p and "/resolve/" in p]
    hub.add_commit("org/pickled", {"config.json": (BASE / "config.json").read_bytes(), "pytorch_model.bin": b"x"})
    result = cli_run("merge", "org/pickled", "org/adapter", tmp_path / "out2", code=1)
    assert "pickle-only checkpoints are refused" in result.output and not (tmp_path / "out2").exists()
    assert not [p for m, p in hub.requests if p.endswith("pytorch_model.bin")]


def test_offline_with_a_cached_base_missing_one_shard_names_the_shard(hub, tmp_path, monkeypatch):
    """A sharded base in the cache with one shard gone: offline, the error names that shard."""
    from safetensors.torch import load_file, save_file

    sharded = tmp_path / "sharded-upload"
    sharded.mkdir()
    shutil.copy(BASE / "config.json", sharded / "config.json")
    tensors = load_file(BASE / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}})
    )
    hub.upload_local_folder("org/sharded", sharded)
    cli_run("merge", "org/sharded", "org/adapter", tmp_path / "online")
    for link in (tmp_path / "hf-home" / "hub").rglob("model-00002-of-00002.safetensors"):
        link.unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli_run("merge", "org/sharded", "org/adapter", tmp_path / "offline", code=1)
    assert "model-00002-of-00002.safetensors" in result.output and "no model.safetensors" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_combine_from_the_hub_and_push(hub, tmp_path):
    cli_run(
        "combine",
        "org/adapter",
        ADAPTER,
        tmp_path / "combined",
        "--weights",
        "0.5,0.5",
        "--push-to-hub",
        "me/combined",
    )
    remote = hub.files("me/combined")
    assert set(remote) >= {"adapter_config.json", "adapter_model.safetensors", "README.md", "rslora_tools.json"}
    card = remote["README.md"].decode()
    assert "library_name: peft" in card and "base_model:adapter:org/base" in card
    assert "combining" in card and "org/adapter" in card and "weight 0.5" in card
    provenance = json.loads(remote["rslora_tools.json"])
    assert provenance["operation"] == "combine" and provenance["adapters"][0]["repo_id"] == "org/adapter"


def test_stacked_merge_card_names_every_adapter(hub, tmp_path):
    cli_run(
        "merge",
        "org/base",
        "org/adapter",
        ADAPTER,
        tmp_path / "stacked",
        "--weights",
        "1,-1",
        "--push-to-hub",
        "me/stacked",
    )
    card = hub.files("me/stacked")["README.md"].decode()
    assert "merged one after another" in card and "org/adapter" in card and "weight -1" in card


def test_extract_from_the_hub_and_push(hub, tmp_path):
    """TUNED = the fixture base with the fixture adapter merged: extracted from two Hub repos, pushed with a card."""
    cli_run("merge", BASE, ADAPTER, tmp_path / "tuned")
    hub.upload_local_folder("org/tuned", tmp_path / "tuned")
    cli_run(
        "extract",
        "org/base",
        "org/tuned",
        tmp_path / "extracted",
        "--energy",
        "0.999",
        "--push-to-hub",
        "me/extracted",
    )
    remote = hub.files("me/extracted")
    card = remote["README.md"].decode()
    assert "extracted from" in card and "org/tuned" in card and "base_model:adapter:org/base" in card
    config = json.loads(remote["adapter_config.json"])
    assert config["base_model_name_or_path"] == "org/base" and config["use_rslora"] is True


def test_inspect_fails_when_base_is_another_repo_than_the_adapter_records(hub):
    cli_run("inspect", "org/adapter", "--base", "org/base")
    hub.upload_local_folder("org/other-base", BASE)
    result = cli_run("inspect", "org/adapter", "--base", "org/other-base", code=1)
    assert "error: the adapter was trained on 'org/base' but BASE is 'org/other-base' [base-differs]" in result.output
