"""`merge --stream --push-to-hub`: Hub to Hub (or local to Hub) a few shards at a time, against the loopback Hub.

The base is a 21-shard Llama (16 MB) built with transformers, the adapter a PEFT rsLoRA one with a
rank pattern. The real huggingface_hub client talks to tests/fake_hub.py (HF_HUB_DISABLE_XET=1:
the LFS path). Disk use is measured on a small tmpfs (conftest.small_disk, needs root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from helpers import ROOT, cli_run
from peft import LoraConfig
from peft_oracle import make_adapter, make_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream-models")
    base = make_llama(
        root / "base",
        torch.float32,
        max_shard_size="1MB",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=6,
        vocab_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
    )
    adapter = make_adapter(base, root / "adapter", config)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "org/base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return base, adapter


@pytest.fixture
def hub(fake_hub, models):
    base, adapter = models
    fake_hub.upload_local_folder("org/base", base)
    fake_hub.upload_local_folder("org/adapter", adapter)
    return fake_hub


def stream(repo: str, *more, code: int = 0, base: str = "org/base", adapter: str = "org/adapter") -> dict:
    result = cli_run("merge", base, adapter, "--push-to-hub", repo, "--stream", "--json", *more, code=code)
    return json.loads(result.stdout) if code == 0 else {"output": result.output}


@pytest.fixture
def plain(hub, tmp_path, monkeypatch) -> dict[str, bytes]:
    """What a plain merge then push gives (the reference for every streamed repo), made with a cache of its own."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "plain-home"))
    cli_run("merge", "org/base", "org/adapter", tmp_path / "plain-out", "--push-to-hub", "me/plain")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hub.requests.clear()
    hub.ranged.clear()
    hub.uploads.clear()
    return hub.files("me/plain")


def assert_same_repo(hub: FakeHub, repo: str, plain: dict[str, bytes], revision: str = "main") -> None:
    """The streamed repo holds what a plain merge pushed, byte for byte, but for the repo's name in the card and the
    command line the card and rslora_tools.json record (each its own, the stream's with --stream)."""
    files = hub.files(repo, revision)
    assert sorted(files) == sorted(plain)
    for name, content in plain.items():
        if name == "README.md":  # the card names its own repo, and the command that made it
            name_only = repo.split("/")[1].encode()
            card = files[name].replace(repo.encode(), b"me/plain").replace(b"# " + name_only, b"# plain")
            made, plain_made = card.split(b"## How it was made")[1], content.split(b"## How it was made")[1]
            assert b" --stream" in made and b" --stream" not in plain_made
            assert card.split(b"## How it was made")[0] == content.split(b"## How it was made")[0]
        elif name == "rslora_tools.json":
            assert_same_provenance(files[name], content)
        else:
            assert files[name] == content, name


def assert_same_provenance(streamed: bytes, plain: bytes) -> None:
    """rslora_tools.json of a streamed merge is a plain merge's, but for the command line it records."""
    record, plain_record = json.loads(streamed), json.loads(plain)
    assert "--stream" in record.pop("command") and "--stream" not in plain_record.pop("command")
    assert record == plain_record


def commits(hub: FakeHub, repo: str) -> list[str]:
    return list(hub.repos[repo].commits)


def shard_downloads(hub: FakeHub) -> list[str]:
    """Base shards downloaded (whole: not the range requests that read their headers)."""
    from urllib.parse import unquote

    ranged = [unquote(p) for p in hub.ranged]
    fetched = [p for m, p in hub.requests if m == "GET" and "/org/base/resolve/" in p and p.endswith(".safetensors")]
    for p in ranged:
        if p in fetched:
            fetched.remove(p)
    return [p.rsplit("/", 1)[1] for p in fetched]


def shard_oids(plain: dict[str, bytes]) -> set[str]:
    import hashlib

    return {hashlib.sha256(v).hexdigest() for k, v in plain.items() if k.endswith(".safetensors")}


def test_streamed_repo_equals_a_plain_merge_in_one_commit(hub, plain, tmp_path):
    scratch = tmp_path / "scratch"
    report = stream("me/streamed", "--scratch", scratch, "--commit-message", "Merged, streamed", "--private")
    assert_same_repo(hub, "me/streamed", plain)
    assert len(commits(hub, "me/streamed")) == 2  # the repo's creation, then the whole model at once
    repo = hub.repos["me/streamed"]
    assert repo.messages[repo.branches["main"]] == "Merged, streamed" and repo.private
    assert report["push"]["files"] == len(plain) - 1  # all but the .gitattributes the repo was created with
    assert report["phases"]["download"]["bytes"] == report["model_bytes"] == report["phases"]["upload"]["bytes"]
    assert report["disk_bound"] < report["model_bytes"] / 3
    assert report["out"] == "hf://me/streamed" and report["modules"] == 18
    assert not scratch.exists()  # emptied and removed after the commit
    # Nothing of the base stays in the Hugging Face cache: only the configs were cached.
    cached = [p.name for p in (tmp_path / "hf-home").rglob("*.safetensors")]
    assert cached == ["adapter_model.safetensors"]
    # Headers came by range requests; each shard was downloaded once.
    assert sorted(shard_downloads(hub)) == sorted(set(shard_downloads(hub))) and len(shard_downloads(hub)) == 21


def test_keep_cache_and_cached_shards_are_not_downloaded_again(hub, plain, tmp_path):
    stream("me/first", "--keep-cache", "--scratch", tmp_path / "s1")
    assert len(shard_downloads(hub)) == 21
    cached = sorted(p.name for p in (tmp_path / "hf-home").rglob("model-*.safetensors"))
    assert len(cached) == 21
    hub.requests.clear()
    hub.ranged.clear()
    report = stream("me/second", "--scratch", tmp_path / "s2")
    assert shard_downloads(hub) == [] and hub.ranged == []  # not even their headers
    assert len(report["skipped"]["cached"]) == 21 and report["phases"]["download"]["bytes"] == 0
    assert sorted(p.name for p in (tmp_path / "hf-home").rglob("model-*.safetensors")) == cached  # never deleted
    assert_same_repo(hub, "me/second", plain)


def test_local_base_streams_to_the_hub_without_writing_out(hub, plain, models, tmp_path):
    base, adapter = models
    report = stream("me/local", "--scratch", tmp_path / "s", base=str(base), adapter="org/adapter")
    assert report["phases"]["download"]["bytes"] == 0 and "cached" not in report["skipped"]
    files = hub.files("me/local")
    plain_prov = json.loads(plain["rslora_tools.json"])
    prov = json.loads(files["rslora_tools.json"])
    assert prov["base"] == {"spec": str(base)} and prov["adapter"] == plain_prov["adapter"]
    for name, content in plain.items():
        if name.endswith(".safetensors") or name.endswith(".index.json") or name == "config.json":
            assert files[name] == content, name


def test_create_pr_opens_one_pull_request(hub, plain, tmp_path):
    hub.add_commit("me/pr", {".gitattributes": plain[".gitattributes"], "README.md": b"an existing repo, main stays"})
    main_before = hub.repos["me/pr"].branches["main"]
    report = stream("me/pr", "--create-pr", "--scratch", tmp_path / "s")
    assert report["push"]["pr_url"].endswith("/me/pr/discussions/1")
    assert hub.repos["me/pr"].branches["main"] == main_before
    assert_same_repo(hub, "me/pr", plain, revision="refs/pr/1")


def test_upload_failing_halfway_resumes_without_uploading_again(hub, plain, tmp_path):
    scratch = tmp_path / "scratch"
    hub.uploads.clear()

    def fail_after_five(oid: str) -> None:
        if len(hub.uploads) == 5:
            hub.fail[r"^/lfs-upload/"] = 400

    hub.on_upload = fail_after_five
    failed = stream("me/resumed", "--scratch", scratch, code=1)["output"]
    assert failed.startswith("Error: me/resumed: the Hub answered 400") and "re-run" in failed
    assert failed.count("\n") == 1
    assert len(commits(hub, "me/resumed")) == 1  # nothing committed: the repo shows no half model
    first = list(hub.uploads)
    assert len(first) == 5 and (scratch / "rslora-tools-stream-me--resumed" / "rslora-tools-stream.json").is_file()
    hub.fail.clear()
    hub.on_upload = None
    hub.requests.clear()
    report = stream("me/resumed", "--scratch", scratch)
    assert not set(first) & set(hub.uploads[5:])  # no finished shard went up twice
    assert len(report["skipped"]["uploaded_before"]) == 5
    # The shards already uploaded were neither downloaded nor merged again.
    assert len(set(shard_downloads(hub))) <= 21 - 5 + 1
    assert_same_repo(hub, "me/resumed", plain)


def test_a_shard_the_hub_already_stores_is_not_sent_again(hub, plain, tmp_path):
    """Without a journal (another machine, a lost scratch folder), the pre-upload skips blobs the Hub has."""
    stream("me/twice", "--scratch", tmp_path / "a" / "s")
    sent = len(hub.uploads)
    assert set(hub.uploads) >= shard_oids(plain)
    report = stream("me/twice", "--scratch", tmp_path / "b" / "s")  # the same command, another scratch folder
    assert hub.uploads[sent:] == []
    assert len(report["skipped"]["hub_had"]) == 21 and report["phases"]["upload"]["bytes"] == 0
    assert_same_repo(hub, "me/twice", plain)


def test_ctrl_c_leaves_the_repo_unchanged_and_a_rerun_resumes(hub, plain, tmp_path):
    scratch = tmp_path / "scratch"
    hub.upload_rate = 2e6  # 16 MB at 2 MB/s: time to interrupt after a few shards
    hub.uploads.clear()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rslora_tools",
            "merge",
            "org/base",
            "org/adapter",
            "--push-to-hub",
            "me/interrupted",
            "--stream",
            "--scratch",
            str(scratch),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(hub.uploads) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted;" in err and "run the same command again to resume" in err
    assert len(commits(hub, "me/interrupted")) == 1
    first = list(hub.uploads)
    assert len(first) >= 3
    hub.upload_rate = None
    report = stream("me/interrupted", "--scratch", scratch)
    assert not set(first) & set(hub.uploads[len(first) :])
    assert len(report["skipped"]["uploaded_before"]) >= 3
    assert_same_repo(hub, "me/interrupted", plain)
    assert not scratch.exists()


def test_peak_disk_stays_under_the_stated_bound_on_a_small_disk(hub, plain, small_disk, tmp_path, monkeypatch):
    disk = small_disk("6m")
    monkeypatch.setenv("HF_HOME", str(disk / "hf-home"))  # the cache (configs, adapter) and the scratch folder
    scratch = disk / "scratch"
    dry = stream("me/small", "--scratch", scratch, "--dry-run")
    size = shutil.disk_usage(disk).total
    assert dry["model_bytes"] > 2 * size and dry["disk_bound"] < size
    assert dry["disk_bound"] <= dry["free_bytes"]
    assert "me/small" not in hub.repos  # a dry run uploads nothing
    baseline = shutil.disk_usage(disk).used
    peak, done = [baseline], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shutil.disk_usage(disk).used)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = stream("me/small", "--scratch", scratch)
    finally:
        done.set()
        sampler.join()
    assert peak[0] - baseline <= report["disk_bound"], (peak[0] - baseline, report["disk_bound"])
    assert_same_repo(hub, "me/small", plain)


def test_not_enough_space_is_refused_before_anything_is_uploaded(hub, small_disk, monkeypatch):
    disk = small_disk("1m")
    result = stream("me/full", "--scratch", disk / "scratch", code=1)["output"]
    assert result.startswith("Error: ") and "needs up to" in result and "nothing was uploaded" in result
    assert "me/full" not in hub.repos


def test_dry_run_prints_the_bound(hub, tmp_path):
    result = cli_run(
        "merge",
        "org/base",
        "org/adapter",
        "--push-to-hub",
        "me/dry",
        "--stream",
        "--dry-run",
        "--scratch",
        tmp_path / "s",
    )
    assert "disk: up to" in result.output and "model" in result.output and "fits" in result.output
    assert "me/dry" not in hub.repos
    assert not (tmp_path / "s").exists()  # a dry run writes nothing, not even the scratch folder
    assert shard_downloads(hub) == []


@pytest.mark.parametrize(
    "args, says, code",
    [
        (["--stream"], "pass --push-to-hub REPO_ID", 2),
        (["--scratch", "x"], "--scratch, --keep-cache and --no-resume go with --stream", 2),
        (["--stream", "--push-to-hub", "me/x", "--verify"], "--verify does not go with --stream", 2),
        (["--stream", "--push-to-hub", "me/x", "merged-out/"], "with --stream there is no OUT", 1),
        (["--stream", "--push-to-hub", "me/x@dev"], "me/x@dev: not a Hub repo id", 2),
    ],
)
def test_wrong_flags_are_one_line(hub, args, says, code):
    """A flag mistake is a usage error (exit 2: the usage line, then the one error line); a bad input is exit 1."""
    result = cli_run("merge", "org/base", "org/adapter", *args, code=code)
    lines = result.output.strip().splitlines()
    assert says in lines[-1] and lines[-1].startswith("Error: ")
    assert len(lines) == (1 if code == 1 else 4) and (code == 1 or lines[0].startswith("Usage: rslora-tools merge"))


def test_offline_and_hub_errors_are_one_line(hub, monkeypatch, tmp_path):
    result = cli_run(
        "merge", "org/nothing", "org/adapter", "--push-to-hub", "me/x", "--stream", "--scratch", tmp_path / "s", code=1
    )
    assert "org/nothing: no such repo on the Hub" in result.output and result.output.count("\n") == 1
    hub.fail[r"/api/repos/create"] = 403
    result = cli_run(
        "merge", "org/base", "org/adapter", "--push-to-hub", "me/x", "--stream", "--scratch", tmp_path / "s", code=1
    )
    assert "forbidden (403)" in result.output and result.output.count("\n") == 1
    hub.fail.clear()
    cli_run("merge", "org/base", "org/adapter", tmp_path / "warm")  # everything in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli_run(
        "merge", "org/base", "org/adapter", "--push-to-hub", "me/x", "--stream", "--scratch", tmp_path / "s", code=1
    )
    assert "HF_HUB_OFFLINE=1 is set; pushing needs the network" in result.output


@pytest.mark.parametrize(
    "more",
    [
        ["--max-shard-size", "3MB"],  # output shards that each read several base shards
        ["--dtype", "bf16"],
    ],
)
def test_streamed_options_equal_the_plain_merge_with_them(hub, plain, tmp_path, more):
    cli_run("merge", "org/base", "org/adapter", tmp_path / "out", *more)
    report = stream("me/options", "--scratch", tmp_path / "s", *more)
    files = hub.files("me/options")
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert sorted(files) == sorted([*local, "README.md", ".gitattributes"])
    for name, content in local.items():
        if name == "rslora_tools.json":
            assert_same_provenance(files[name], content)
        else:
            assert files[name] == content, name
    assert report["disk_bound"] < report["model_bytes"]


def test_several_adapters_stream_as_they_merge(hub, plain, tmp_path):
    args = ["org/adapter", "org/adapter", "--weights", "0.5,0.25"]
    cli_run("merge", "org/base", *args[:2], tmp_path / "out", *args[2:])
    result = cli_run(
        "merge", "org/base", *args, "--push-to-hub", "me/stacked", "--stream", "--scratch", tmp_path / "s"
    )
    assert "Merged 2 adapters" in result.output and "into hf://me/stacked" in result.output
    assert "streamed in" in result.output and "Pushed 26 files to me/stacked in one commit" in result.output
    files = hub.files("me/stacked")
    for path in (tmp_path / "out").iterdir():
        if path.name == "rslora_tools.json":
            assert_same_provenance(files[path.name], path.read_bytes())
        else:
            assert files[path.name] == path.read_bytes(), path.name


def fp8_weights(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' own FP8 quantizer (128x128 blocks)."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=[128, 128], scale_fmt=None)
    return Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one(name, w)


INT4 = dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=True)
INT8 = dict(num_bits=8, type="int", strategy="channel", symmetric=False)


def int_weights(name: str, w: torch.Tensor, weights: dict) -> dict[str, torch.Tensor]:
    """compressed-tensors' own compressor (W4A16 groups of 64, or W8A16 per channel), as tests/merge uses it."""
    from compressed_tensors.quantization import QuantizationArgs
    from quant_builders import ct_compress

    stored, _, _ = ct_compress(w, QuantizationArgs(**weights))
    return {name[: -len("weight")] + key: value for key, value in stored.items()}


QUANTIZED = {
    "fp8": (fp8_weights, {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    "int4": (
        lambda n, w: int_weights(n, w, INT4),
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": INT4}},
        },
    ),
    "int8-channel": (
        lambda n, w: int_weights(n, w, INT8),
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": INT8}},
        },
    ),
}


@pytest.mark.parametrize("keep", [False, True], ids=["as-trained", "keep-quantization"])
@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_a_quantized_base_streams_as_it_merges(fake_hub, tmp_path, keep, kind, monkeypatch):
    """A block-scaled FP8 base (DeepSeek-V3's format) or a compressed-tensors W4A16 / W8A16 one on the Hub, 1 MB
    shards,
    streamed to the Hub: the repo holds what a plain merge pushes, with or without --keep-quantization."""
    from safetensors.torch import load_file, save_file

    quantize, quantization_config = QUANTIZED[kind]
    root = tmp_path / "models"
    base = make_llama(
        root / "bf16",
        torch.bfloat16,
        max_shard_size="1MB",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        vocab_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    quantized = root / kind
    quantized.mkdir()
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, w in load_file(base / shard).items():
            tensors |= quantize(name, w) if name.endswith("proj.weight") else {name: w}
        weight_map |= {name: shard for name in tensors}
        save_file(tensors, quantized / shard, metadata={"format": "pt"})
    index["weight_map"] = weight_map
    (quantized / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (quantized / "config.json").write_text(json.dumps(config))
    adapter = make_adapter(
        base, root / "adapter", LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj"])
    )
    fake_hub.upload_local_folder("org/quantized", quantized)
    fake_hub.upload_local_folder("org/q-adapter", adapter)
    more = ("--keep-quantization",) if keep else ()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "plain-home"))
    cli_run("merge", "org/quantized", "org/q-adapter", tmp_path / "plain-out", "--push-to-hub", "me/plain", *more)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    report = stream("me/streamed", *more, base="org/quantized", adapter="org/q-adapter")
    assert report["quantization"]["mode"] == ("kept" if keep else "dequantized")
    if kind == "fp8" or keep:  # measured as it merged
        assert_same_repo(fake_hub, "me/streamed", fake_hub.files("me/plain"))
        assert report["quantization"]["measured"]["tensors"] == 8
    else:  # an as-trained INT merge measures a sample after merging, which a stream (its shards gone) cannot
        assert report["quantization"]["measured"] is None
        streamed, plain = fake_hub.files("me/streamed"), fake_hub.files("me/plain")
        assert sorted(streamed) == sorted(plain)
        assert all(streamed[k] == plain[k] for k in plain if k not in ("README.md", "rslora_tools.json"))
