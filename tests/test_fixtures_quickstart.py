"""The README quickstart: merging the shipped fixtures gives PEFT's golden output."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from peft_oracle import read_folder
from safetensors.torch import load_file

from rslora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_quickstart_merge_equals_golden(tmp_path):
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["merge", str(FIXTURES / "tiny-llama"), str(FIXTURES / "tiny-llama-rslora"), str(out)])
    assert result.exit_code == 0, result.output
    assert "Merged 14 LoRA modules (rsLoRA" in result.stdout
    golden = load_file(FIXTURES / "golden" / "tiny-llama-rslora-merged.safetensors")
    merged = read_folder(out)
    assert set(merged) == set(golden)
    for k, v in golden.items():
        assert torch.equal(merged[k], v), k


def test_fixture_inputs_are_not_modified(tmp_path):
    before = {p: p.read_bytes() for p in FIXTURES.rglob("*") if p.is_file()}
    CliRunner().invoke(cli, ["merge", str(FIXTURES / "tiny-llama"), str(FIXTURES / "tiny-llama-rslora"), str(tmp_path / "o")])
    after = {p: p.read_bytes() for p in FIXTURES.rglob("*") if p.is_file()}
    assert before == after


def test_quickstart_follow_up_commands(tmp_path):
    """The README's follow-up commands on the fixtures: verify, inspect, convert."""
    base, adapter = str(FIXTURES / "tiny-llama"), str(FIXTURES / "tiny-llama-rslora")
    runner = CliRunner()
    assert runner.invoke(cli, ["merge", base, adapter, str(tmp_path / "merged")]).exit_code == 0
    result = runner.invoke(cli, ["verify", str(tmp_path / "merged"), base, adapter])
    assert result.exit_code == 0 and result.output.startswith("EXACT: 21 tensors checked")
    result = runner.invoke(cli, ["inspect", adapter, "--runtime", "vllm"])
    assert result.exit_code == 0 and "info: vLLM 0.7.0 to 0.31.x would apply 0.7071x to 1.882x" in result.output
    result = runner.invoke(cli, ["inspect", adapter, "--runtime", "vllm@0.31.0"])
    assert result.exit_code == 0 and "warning: vLLM (0.7.0 to 0.31.x) would apply" in result.output
    result = runner.invoke(cli, ["convert", adapter, str(tmp_path / "for-sglang"), "--target", "sglang"])
    assert result.exit_code == 0 and "unit-scale form" in result.output
    result = runner.invoke(cli, ["convert", adapter, str(tmp_path / "for-vllm"), "--target", "vllm"])
    assert result.exit_code == 0 and "copied unchanged" in result.output
