"""The README quickstart: merging the shipped fixtures gives PEFT's golden output."""

from __future__ import annotations

import torch
from helpers import ADAPTER, BASE, FIXTURES, cli_run
from peft_oracle import read_folder
from safetensors.torch import load_file


def test_quickstart_merge_equals_golden(tmp_path):
    out = tmp_path / "merged"
    result = cli_run("merge", BASE, ADAPTER, out)
    assert "Merged 14 LoRA modules (rsLoRA" in result.stdout
    golden = load_file(FIXTURES / "golden" / "tiny-llama-rslora-merged.safetensors")
    merged = read_folder(out)
    assert set(merged) == set(golden)
    for k, v in golden.items():
        assert torch.equal(merged[k], v), k


def test_fixture_inputs_are_not_modified(tmp_path):
    before = {p: p.read_bytes() for p in FIXTURES.rglob("*") if p.is_file()}
    cli_run("merge", BASE, ADAPTER, tmp_path / "o")
    after = {p: p.read_bytes() for p in FIXTURES.rglob("*") if p.is_file()}
    assert before == after


def test_quickstart_follow_up_commands(tmp_path):
    """The README's follow-up commands on the fixtures: verify, inspect, convert."""
    cli_run("merge", BASE, ADAPTER, tmp_path / "merged")
    assert cli_run("verify", tmp_path / "merged", BASE, ADAPTER).output.startswith("EXACT: 21 tensors checked")
    result = cli_run("inspect", ADAPTER, "--runtime", "vllm")
    assert "info: vLLM 0.7.0 to 0.31.x would apply 0.7071x to 1.882x" in result.output
    result = cli_run("inspect", ADAPTER, "--runtime", "vllm@0.31.0")
    assert "warning: vLLM (0.7.0 to 0.31.x) would apply" in result.output
    assert "unit-scale form" in cli_run("convert", ADAPTER, tmp_path / "for-sglang", "--target", "sglang").output
    assert "copied unchanged" in cli_run("convert", ADAPTER, tmp_path / "for-vllm", "--target", "vllm").output
