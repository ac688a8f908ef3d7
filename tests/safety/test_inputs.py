"""Inputs are read-only; adapter weights with NaN or Inf are refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run, tree_digest
from peft_oracle import peft_merged_state_dict
from safetensors.torch import load_file, save_file

Q = "model.layers.0.self_attn.q_proj.weight"


def test_inputs_are_never_modified(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(BASE, base)
    shutil.copytree(ADAPTER, adapter)
    before = (tree_digest(base), tree_digest(adapter))
    cli_run("merge", base, adapter, tmp_path / "m", "--verify")
    cli_run("verify", tmp_path / "m", base, adapter)
    cli_run("convert", adapter, tmp_path / "c", "--target", "unit")
    cli_run("convert", adapter, tmp_path / "g.gguf", "--target", "llama.cpp", "--base", base)
    cli_run("inspect", adapter, "--base", base)
    assert (tree_digest(base), tree_digest(adapter)) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_adapter_weights_are_refused(tmp_path, bad):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = bad
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = cli_run("merge", BASE, adapter, tmp_path / "out", code=1)
    assert "NaN or Inf" in result.output and key in result.output and "--allow-nonfinite" in result.output
    assert not (tmp_path / "out").exists()
    assert "NaN or Inf" in cli_run("convert", adapter, tmp_path / "c", "--to-classic", code=1).output
    cli_run("merge", BASE, adapter, tmp_path / "out", "--allow-nonfinite")
    merged_q = load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert not torch.isfinite(merged_q).all()
    expected = peft_merged_state_dict(BASE, adapter)["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(merged_q.isnan(), expected.isnan())
