"""--device cuda: deltas computed on the GPU. Skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft_oracle import read_folder

from rslora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def test_cuda_merge_matches_cpu_within_rounding(tmp_path):
    base, adapter = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora"
    for device in ("cpu", "cuda"):
        result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), str(tmp_path / device), "--device", device])
        assert result.exit_code == 0, result.output
    cpu, cuda = read_folder(tmp_path / "cpu"), read_folder(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for k in cpu:
        assert cuda[k].dtype == cpu[k].dtype
        torch.testing.assert_close(cuda[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-2)

