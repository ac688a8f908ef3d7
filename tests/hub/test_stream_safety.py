"""A streamed merge (`merge --stream --push-to-hub`) and the folders and servers around it, against the loopback Hub:
its working folder is its own (never a user's DIR/out) and locked, its journal is checked, a server that ignores
byte ranges is read only as far as the header, and a base shard that changes after planning is refused (locally
too, for every merge).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from helpers import ADAPTER, BASE, cli_run
from peft import LoraConfig
from peft_oracle import make_adapter, make_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stream-safety-models")
    base = make_llama(root / "base", torch.float32, max_shard_size="40KB")
    adapter = make_adapter(base, root / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return base, adapter


@pytest.fixture
def hub(fake_hub, models):
    fake_hub.upload_local_folder("org/base", models[0])
    fake_hub.upload_local_folder("org/adapter", models[1])
    return fake_hub


def stream(repo: str, *more, code: int = 0):
    return cli_run("merge", "org/base", "org/adapter", "--push-to-hub", repo, "--stream", *more, code=code)


def work(scratch: Path, repo: str) -> Path:
    return scratch / f"rslora-tools-stream-{repo.replace('/', '--')}"


# --- 10. --scratch DIR: a folder of its own inside DIR ---------------------------------------------------------


def test_scratch_never_touches_the_users_folders_of_any_name(hub, tmp_path):
    scratch = tmp_path / "mine"
    for name in ("out", "base", "view", "extras", "rslora-tools-stream.json"):
        path = scratch / name
        if "." in name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("the user's")
        else:
            path.mkdir(parents=True)
            (path / "keep.txt").write_text("the user's")
    stream("me/x", "--scratch", scratch)
    assert sorted(p.name for p in scratch.iterdir()) == ["base", "extras", "out", "rslora-tools-stream.json", "view"]
    assert all((scratch / n / "keep.txt").read_text() == "the user's" for n in ("out", "base", "view", "extras"))
    assert (scratch / "rslora-tools-stream.json").read_text() == "the user's"


def test_a_folder_of_the_working_folders_name_that_the_tool_did_not_make_is_refused(hub, tmp_path):
    scratch = tmp_path / "s"
    mine = work(scratch, "me/x")
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    result = stream("me/x", "--scratch", scratch, code=1)
    assert "exists and was not made by rslora-tools" in result.output
    assert (mine / "thesis.tex").read_text() == "years of work"


# --- 11. two runs into one repo --------------------------------------------------------------------------------


def test_a_second_run_with_the_same_scratch_folder_is_refused_while_the_first_holds_it(hub, tmp_path):
    scratch = tmp_path / "s"
    folder = work(scratch, "me/x")
    folder.mkdir(parents=True)
    marker = folder / ".rslora-tools-scratch"
    fd = os.open(marker, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a run in progress holds it
        result = stream("me/x", "--scratch", scratch, code=1)
        assert "another run is using it" in result.output and result.output.count("\n") == 1
        assert not hub.uploads
    finally:
        os.close(fd)
    stream("me/x", "--scratch", scratch)  # free again: it runs, and removes the folder it owns
    assert not folder.exists()


# --- 14. the journal ----------------------------------------------------------------------------------------------


def failed_halfway(hub: FakeHub, scratch: Path, repo: str) -> Path:
    """A run whose uploads fail after the first shard: the journal stays in the working folder."""

    def fail_after_one(oid: str) -> None:
        hub.fail[r"^/lfs-upload/"] = 400

    hub.on_upload = fail_after_one
    stream(repo, "--scratch", scratch, code=1)
    hub.on_upload = None
    hub.fail.clear()
    journals = list(scratch.rglob("rslora-tools-stream.json"))
    assert journals == [work(scratch, repo) / "rslora-tools-stream.json"] or len(journals) == 1
    return journals[0]


@pytest.mark.parametrize("damage", ["size", "sha256", "missing key", "not json"])
def test_a_corrupt_journal_names_itself_and_how_to_start_over(hub, tmp_path, damage):
    scratch = tmp_path / "s"
    journal = failed_halfway(hub, scratch, "me/j")
    data = json.loads(journal.read_text())
    entry = data["uploaded"][0]
    if damage == "size":
        entry["size"] = "12 MB"
    elif damage == "sha256":
        entry["sha256"] = "xyz"
    elif damage == "missing key":
        del entry["sha256"]
    journal.write_text("{broken" if damage == "not json" else json.dumps(data))
    result = stream("me/j", "--scratch", scratch, code=1)
    line = result.output.strip()
    assert line.startswith(f"Error: {journal}: the journal of an earlier --stream run cannot be read (")
    assert line.endswith("pass --no-resume to start over, or delete it") and "unexpected" not in line
    stream("me/j", "--scratch", scratch, "--no-resume")
    assert "model.safetensors.index.json" in hub.files("me/j")


def test_a_rerun_after_the_repo_was_deleted_starts_over(hub, tmp_path):
    scratch = tmp_path / "s"
    failed_halfway(hub, scratch, "me/gone")
    del hub.repos["me/gone"]
    hub.lfs.pop("me/gone", None)
    report = json.loads(stream("me/gone", "--scratch", scratch, "--json").stdout)
    assert report["skipped"]["uploaded_before"] == []
    assert "model.safetensors.index.json" in hub.files("me/gone")


# --- 12. a server that ignores Range ------------------------------------------------------------------------------


def test_a_server_ignoring_byte_ranges_is_read_no_further_than_the_header(hub, tmp_path):
    """Planning reads each shard's header by a range request; a server answering with the whole file (200) must not
    make the client read (and hold) the shard: the connection is dropped after the header."""
    big = tmp_path / "big"
    shutil.copytree(BASE, big)
    raw = (BASE / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    size = 64 << 20
    header["extra.big"] = {"dtype": "U8", "shape": [size], "data_offsets": [len(data), len(data) + size]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (big / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(size))
    hub.upload_local_folder("org/big", big)
    hub.upload_local_folder("org/small-adapter", ADAPTER)
    hub.ignore_range = True
    result = cli_run(
        "merge", "org/big", "org/small-adapter", "--push-to-hub", "me/x", "--stream", "--dry-run", "--json"
    )
    assert json.loads(result.stdout)["dry_run"] is True
    sent = [b for path, b in hub.sent.items() if "org/big/resolve" in path and path.endswith("model.safetensors")]
    assert sent and max(sent) < size // 2, sent  # the client stopped reading after the header (a socket buffer more)
    code = (
        "import re, sys; from rslora_tools.cli import main; sys.argv = ['rslora-tools', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "merge",
            "org/big",
            "org/small-adapter",
            "--push-to-hub",
            "me/x",
            "--stream",
            "--dry-run",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mb < 64 * 1.5 + 40, peak_mb  # not the 64 MB shard on top of the run's own ~100 MB


# --- 4. a base shard that changes after planning -----------------------------------------------------------------


def test_a_local_base_shard_replaced_after_planning_is_refused(tmp_path, monkeypatch):
    import rslora_tools.execute.folder_writer as merging

    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    real = merging.check_inputs_finite

    def replace_shard(*args, **kwargs):  # between planning and writing, another process rewrites the shard
        raw = bytearray((base / "model.safetensors").read_bytes())
        raw[-4:] = b"\x00\x00\x80\x7f"
        (base / "model.safetensors.new").write_bytes(raw)
        os.replace(base / "model.safetensors.new", base / "model.safetensors")
        header = bytearray(raw)
        (n,) = struct.unpack("<Q", header[:8])
        text = header[8 : 8 + n].replace(b'"format":"pt"', b'"format":"PT"')
        (base / "model.safetensors").write_bytes(header[:8] + text + header[8 + n :])
        return real(*args, **kwargs)

    monkeypatch.setattr(merging, "check_inputs_finite", replace_shard)
    result = cli_run("merge", base, ADAPTER, tmp_path / "out", code=1)
    assert re.search(r"model\.safetensors: changed since the merge was planned \(its header differs\)", result.output)
    assert not (tmp_path / "out").exists()


def test_a_streamed_merge_names_the_shard_the_repo_lacks(fake_hub, models, tmp_path):
    """A Hub base whose index names a shard the repo lacks said only "the Hub answered 404: 404 Client Error."."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(models[0], base)
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    fake_hub.upload_local_folder("org/base", base)
    fake_hub.upload_local_folder("org/adapter", models[1])
    line = stream("me/merged", code=1).output
    assert f"shard {shards[-1].name} that the index lists is not in the repo" in line, line
