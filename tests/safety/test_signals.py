"""Ctrl-C and SIGTERM at any moment: one true line, exit 130, nothing half-written, no abort."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run
from peft_oracle import save_module
from safetensors.torch import save_file

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"  # untouched by the adapter


@pytest.fixture(scope="module")
def slow_merge_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A base and a high-rank adapter whose merge takes a second or two (compute-bound)."""
    folder = tmp_path_factory.mktemp("slow")
    n, r, layers = 1024, 1024, 8
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(n, n, bias=False) for _ in range(layers)])
    base = save_module(net, folder / "base")
    adapter = folder / "adapter"
    adapter.mkdir()
    tensors = {}
    for i in range(layers):
        tensors[f"base_model.model.{i}.lora_A.weight"] = torch.randn(r, n) * 0.01
        tensors[f"base_model.model.{i}.lora_B.weight"] = torch.randn(n, r) * 0.01
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r}))
    return base, adapter


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_midway_leaves_nothing(slow_merge_inputs, tmp_path, sig):
    base, adapter = slow_merge_inputs
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter), str(out), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.rslora-tools-tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_second_interrupt_during_the_clean_up_does_not_leave_it_half_done(tmp_path, monkeypatch):
    import rslora_tools.execute.executor as executor
    import rslora_tools.formats.output as output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    real_rmtree = shutil.rmtree

    def rmtree_interrupted(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, while the temporary folder is removed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(executor, "_produce_group", interrupted)
    monkeypatch.setattr(output.shutil, "rmtree", rmtree_interrupted)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "a" / "out", code=130)
    assert "interrupted; nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_push_says_out_is_complete(tmp_path, monkeypatch):
    import rslora_tools.hub.push as push

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(push, "push_folder", interrupted)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--push-to-hub", "me/merged", code=130)
    assert "interrupted during the push" in result.output and "is complete on disk" in result.output
    assert "rslora-tools push" in result.output and (tmp_path / "out" / "model.safetensors").is_file()


_STUCK_WORKER = """
import sys, time
from rslora_tools.execute import executor, run
run.STOP_WAIT_SECONDS = 0.5
real = executor._produce
def stuck(run, step, writer):
    if step.tensor.name.endswith("q_proj.weight"):
        time.sleep(60)  # a worker inside a long torch operation that does not look at the stop flag
    return real(run, step, writer)
executor._produce = stuck
from rslora_tools.cli import main
sys.argv = ["rslora-tools", *sys.argv[1:]]
main()
"""


def test_ctrl_c_with_a_worker_still_busy_exits_cleanly(tmp_path):
    """The process neither waits for the busy worker nor aborts under it ("terminate called ..."), and cleans up."""
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_WORKER, "merge", str(BASE), str(ADAPTER), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.rslora-tools-tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 20
    assert proc.returncode == 130 and err.strip() == "Error: interrupted; nothing was written", err
    assert list(tmp_path.iterdir()) == []
