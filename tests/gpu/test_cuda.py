"""--device cuda: deltas computed on the GPU. Skipped where CUDA is absent."""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run
from peft_oracle import read_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]


def test_cuda_merge_matches_cpu_within_rounding(tmp_path):
    for device in ("cpu", "cuda"):
        cli_run("merge", BASE, ADAPTER, tmp_path / device, "--device", device)
    cpu, cuda = read_folder(tmp_path / "cpu"), read_folder(tmp_path / "cuda")
    assert set(cpu) == set(cuda)
    for k in cpu:
        assert cuda[k].dtype == cpu[k].dtype
        torch.testing.assert_close(cuda[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-2)
