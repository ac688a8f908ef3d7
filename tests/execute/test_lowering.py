"""Lowering decides each tensor's step once; --device auto; progress through a callback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings

import pytest
from helpers import ADAPTER, BASE, cli_run

from rslora_tools import merge, verify
from rslora_tools.compute import kernel
from rslora_tools.execute.lowering import Device, StepKind, lower
from rslora_tools.plan.merge import plan_merge


def test_every_tensor_gets_one_step_and_the_report_reads_it(tmp_path):
    checkpoint, adapter, plan = plan_merge(BASE, ADAPTER)
    lowered = lower(plan, checkpoint, adapter, Device("cpu"))
    assert [s.tensor.name for s in lowered.steps] == [t.name for t in plan.tensors]
    kinds = {s.tensor.name: s.kind for s in lowered.steps}
    changed = StepKind.KERNEL if kernel.available() else StepKind.TORCH
    assert {kinds[t.name] for t in plan.tensors if t.untouched} == {StepKind.COPY_BASE}
    assert {kinds[t.name] for t in plan.tensors if not t.untouched} == {changed}
    report = json.loads(cli_run("merge", BASE, ADAPTER, tmp_path / "o", "--dry-run", "--json").stdout)
    assert {c["tensor"]: c["by"] for c in report["changes"]} == {
        name: kind.value for name, kind in kinds.items() if kind is not StepKind.COPY_BASE
    }
    assert report["tensors_copied"] == sum(k is StepKind.COPY_BASE for k in kinds.values())


def test_device_auto_takes_the_kernel_where_it_applies(tmp_path):
    """auto: the kernel for what it supports, CUDA (when present) or the CPU for the rest."""
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "o", "--dry-run", "--json", "--device", "auto")
    report = json.loads(result.stdout)
    if kernel.available():
        assert {c["by"] for c in report["changes"]} == {"kernel"} and report["device"] == "cpu"
    cli_run("merge", BASE, ADAPTER, tmp_path / "auto", "--device", "auto")
    cli_run("merge", BASE, ADAPTER, tmp_path / "cpu")
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (
        tmp_path / "cpu" / "model.safetensors"
    ).read_bytes()


def test_device_auto_with_the_kernel_never_imports_torch(tmp_path):
    """A local merge the kernel does loads only what it uses: no torch, and neither the push and stream code nor
    OpenSSL (hashlib), each megabytes of a merge's ~30 MB (docs/benchmarks.md)."""
    if not kernel.available():
        pytest.skip("merge kernel not built or CPU without AVX2/FMA/F16C")
    unused = ["torch", "_hashlib", "huggingface_hub", "rslora_tools.hub.push", "rslora_tools.execute.hub_stream"]
    code = (
        "import sys; from rslora_tools.cli import main; sys.argv = ['rslora-tools', 'merge', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"print(sorted(set({unused!r}) & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(BASE), str(ADAPTER), str(tmp_path / "out"), "-q", "--device", "auto"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_unknown_device_is_refused():
    with pytest.raises(Exception, match="unknown device"):
        Device("tpu")


def test_progress_callback_gets_every_byte_once(tmp_path):
    calls: list[tuple[int, int, str]] = []
    report = merge(
        BASE,
        ADAPTER,
        tmp_path / "out",
        progress=lambda n, total: calls.append((n, total, threading.current_thread().name)),
    )
    assert sum(n for n, _, _ in calls) == report.bytes_written
    assert {total for _, total, _ in calls} == {report.bytes_written}
    assert len(calls) >= report.tensors_merged  # untouched neighbours are copied together
    checked: list[tuple[int, int]] = []
    result = verify(tmp_path / "out", BASE, ADAPTER, progress=lambda n, total: checked.append((n, total)))
    assert result.verdict == "exact" and sum(n for n, _ in checked) == checked[0][1] == report.bytes_written


def test_progress_true_draws_nothing_and_says_so(tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(BASE, ADAPTER, tmp_path / "out", progress=True)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert capsys.readouterr().err == ""
