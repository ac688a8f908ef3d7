"""merge --dry-run: the plan, what computes each tensor, what matches nothing; nothing written."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import ADAPTER, BASE, cli_run, edit_tensors
from safetensors.torch import load_file, save_file

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"  # untouched by the adapter


def test_dry_run_plan(tmp_path):
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run")
    assert "model.layers.*.self_attn.o_proj.weight (x2): LoRA (linear) at scale 8" in result.output
    assert "memory needed" in result.output and "free (fits)" in result.output
    report = json.loads(cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run", "--json").stdout)
    assert len(report["changes"]) == 14 and report["memory_bytes"] > 0 and report["free_bytes"] > 0
    o = next(c for c in report["changes"] if c["tensor"] == "model.layers.0.self_attn.o_proj.weight")
    assert (o["scale"], o["rank"], o["alpha"]) == (8.0, 4, 16)
    assert not (tmp_path / "out").exists()


def test_dry_run_says_what_computes_each_tensor(tmp_path, monkeypatch):
    from rslora_tools.compute import kernel

    report = json.loads(cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run", "--json").stdout)
    o = next(c for c in report["changes"] if c["tensor"] == "model.layers.0.self_attn.o_proj.weight")
    assert o["by"] == ("kernel" if kernel.available() else "torch")
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run")
    assert "model.layers.*.self_attn.o_proj.weight (x2): LoRA (linear) at scale 8 [torch]" in result.output


def test_dry_run_lists_every_unmatched_tensor(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for layer in (0, 1):
        for ab in ("A", "B"):
            key = f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{ab}.weight"
            tensors[key.replace(f"layers.{layer}.", f"layers.{layer + 7}.")] = tensors.pop(key)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = cli_run("merge", BASE, adapter, tmp_path / "out", "--dry-run", code=1)
    assert result.output.count("matches nothing in the base") == 4
    assert "4 of the adapter's tensors match no base tensor" in result.output
    report = json.loads(cli_run("merge", BASE, adapter, tmp_path / "out", "--dry-run", "--json", code=1).stdout)
    assert len(report["unmatched"]) == 4
    assert not (tmp_path / "out").exists()


def test_lora_on_an_integer_weight_is_refused_by_inspect_and_the_dry_run(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    edit_tensors(
        base / "model.safetensors",
        lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"].to(torch.int64)}
        ),
    )
    result = cli_run("merge", base, ADAPTER, tmp_path / "out", "--dry-run", code=1)
    assert "dtype I64" in result.output and "unexpected" not in result.output
    report = json.loads(cli_run("inspect", ADAPTER, "--base", base, "--json", code=1).stdout)
    assert any("dtype I64" in lint["message"] for lint in report["lints"] if lint["level"] == "error")
