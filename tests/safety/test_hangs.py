"""Nothing hangs: FIFOs, pattern keys that backtrack or multiply, a Hub that never answers."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run
from safetensors.torch import load_file, save_file

NORM = "model.norm.weight"  # untouched by the adapter


@pytest.mark.parametrize("command", ["merge", "verify", "inspect", "convert"])
def test_a_fifo_never_blocks(tmp_path, command):
    """A FIFO as a base or merged shard: every command that reads it ends with one line, at once."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    merged = tmp_path / "merged"
    shutil.copytree(BASE, merged)
    target = merged if command == "verify" else base
    (target / "model.safetensors").unlink()
    os.mkfifo(target / "model.safetensors")
    args = {
        "merge": ["merge", base, ADAPTER, tmp_path / "out"],
        "verify": ["verify", merged, BASE, ADAPTER],
        "inspect": ["inspect", ADAPTER, "--base", base],
        "convert": ["convert", ADAPTER, tmp_path / "g.gguf", "--target", "llama.cpp", "--base", base],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "rslora_tools", *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "not a regular file" in done.stdout + done.stderr


def eva_like(tmp: Path, modules: int) -> tuple[Path, Path]:
    """A base of many small Linear weights and an adapter with one rank/alpha pattern key per module (as EVA
    writes)."""
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file(
        {f"model.layers.{i}.proj.weight": torch.randn(16, 16).to(torch.bfloat16) for i in range(modules)},
        base / "model.safetensors",
        metadata={"format": "pt"},
    )
    tensors, ranks, alphas = {}, {}, {}
    for i in range(modules):
        r = 2 + i % 5
        tensors[f"base_model.model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(r, 16) * 0.01
        tensors[f"base_model.model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(16, r) * 0.01
        ranks[f"model.layers.{i}.proj"] = r
        alphas[f"model.layers.{i}.proj"] = 1.5 * r
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 8,
                "use_rslora": True,
                "rank_pattern": ranks,
                "alpha_pattern": alphas,
            }
        )
    )
    return base, adapter


def test_one_pattern_key_per_module_is_not_quadratic(tmp_path, monkeypatch):
    """EVA-style configs: resolving every module must not try every key as a regular expression."""
    import re

    base, adapter = eva_like(tmp_path, 600)
    calls = {"n": 0}
    real_match, real_compile = re.match, re.compile

    def counted(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(re, "match", counted(real_match))
    monkeypatch.setattr(re, "compile", counted(real_compile))
    cli_run("merge", base, adapter, tmp_path / "out", "--json")
    cli_run("inspect", adapter, "--base", base, "--json")
    assert calls["n"] < 10 * 600  # the old lookup made ~600 x 600 regex calls per pattern dict
    from peft_oracle import assert_same_tensors, read_folder

    expected = {}
    tensors = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for i in range(600):
        r = 2 + i % 5
        a = lora[f"base_model.model.model.layers.{i}.proj.lora_A.weight"]
        b = lora[f"base_model.model.model.layers.{i}.proj.lora_B.weight"]
        w = tensors[f"model.layers.{i}.proj.weight"]
        expected[f"model.layers.{i}.proj.weight"] = (w.float() + (b @ a) * (1.5 * r / math.sqrt(r))).to(w.dtype)
    assert_same_tensors(read_folder(tmp_path / "out"), expected)


class SilentServer:
    """Accepts connections and never answers (a hung proxy or Hub)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "push"])
def test_a_hub_that_never_answers_times_out(tmp_path, command):
    server = SilentServer()
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "1",
        "HF_TOKEN": "hf_x",
        "HF_HUB_DISABLE_XET": "1",
    }
    args = ["merge", "org/base", "org/adapter", tmp_path / "out"] if command == "merge" else ["push", BASE, "me/x"]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rslora_tools", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
    finally:
        server.close()
    assert done.returncode == 1 and "did not answer in time" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
