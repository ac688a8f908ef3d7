"""Trust: verify, dry run, free space and full disks, signals, read-only inputs, NaN refusal."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from peft_oracle import make_adapter, peft_merged_state_dict, save_module
from safetensors.torch import load_file, save_file

from rslora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, ADAPTER = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora"
Q = "model.layers.0.self_attn.q_proj.weight"


def run(*args, code: int = 0):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def merged(tmp_path: Path, name: str = "out") -> Path:
    run("merge", BASE, ADAPTER, tmp_path / name)
    return tmp_path / name


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- verify -------------------------------------------------------------------------------------------


def test_verify_exact(tmp_path):
    out = merged(tmp_path)
    result = run("verify", out, BASE, ADAPTER)
    assert result.output.startswith("EXACT: 21 tensors checked: 21 exact")
    report = json.loads(run("verify", out, BASE, ADAPTER, "--json").stdout)
    assert report["verdict"] == "exact" and report["mismatched"] == 0 and report["problems"] == []


def test_verify_a_merge_made_by_peft(llama_fp32, tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, rank_pattern={"v_proj": 4})
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    from peft import PeftModel
    from peft_oracle import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(llama_fp32), str(adapter)).merge_and_unload()
    model.save_pretrained(tmp_path / "peft-merged")
    report = json.loads(run("verify", tmp_path / "peft-merged", llama_fp32, adapter, "--json").stdout)
    assert report["verdict"] == "exact", report["problems"]


def test_verify_tells_rounding_from_mismatch(tmp_path):
    out = merged(tmp_path)
    edit_tensors(out, lambda t: t[Q].view(torch.int16)[0, 0].add_(1))  # one ulp away
    result = run("verify", out, BASE, ADAPTER)
    assert result.output.splitlines()[-1].startswith("WITHIN ROUNDING")
    assert "1 ulp" in result.output

    def corrupt(t):
        t[Q][3, 4] += 0.5
    edit_tensors(out, corrupt)
    result = run("verify", out, BASE, ADAPTER, code=1)
    assert f"mismatch: {Q}" in result.output and result.output.splitlines()[-1].startswith("MISMATCH")


def test_verify_sample(tmp_path):
    out = merged(tmp_path)
    report = json.loads(run("verify", out, BASE, ADAPTER, "--sample", "5", "--json").stdout)
    assert report["tensors_checked"] == 5 and report["tensors_total"] == 21
    assert all(t["changed"] for t in report["tensors"])  # changed tensors are sampled first
    edit_tensors(out, lambda t: t["model.layers.1.mlp.down_proj.weight"].mul_(2))
    run("verify", out, BASE, ADAPTER, "--sample", "14", code=1)


@pytest.mark.parametrize(("damage", "says"), [
    (lambda out: (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "vocab_size": 7})), "vocab_size"),
    (lambda out: (out / "config.json").unlink(), "config.json is missing"),
    (lambda out: edit_tensors(out, lambda t: t.pop("model.norm.weight")), "missing from the merged folder"),
    (lambda out: edit_tensors(out, lambda t: t.update(extra=torch.zeros(2))), "unexpected tensor"),
    (lambda out: (out / "model.safetensors").write_bytes(b"\x00" * 7), "cannot be read"),
])
def test_verify_catches_folder_problems(tmp_path, damage, says):
    out = merged(tmp_path)
    damage(out)
    result = run("verify", out, BASE, ADAPTER, code=1)
    assert says in result.output


def test_verify_catches_index_disagreements(llama_sharded, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    adapter = make_adapter(llama_sharded, tmp_path / "a", cfg)
    run("merge", llama_sharded, adapter, tmp_path / "out")
    assert json.loads(run("verify", tmp_path / "out", llama_sharded, adapter, "--json").stdout)["verdict"] == "exact"
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = 123
    index_path.write_text(json.dumps(index))
    assert "total_size" in run("verify", tmp_path / "out", llama_sharded, adapter, code=1).output
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert "cannot be read" in run("verify", tmp_path / "out", llama_sharded, adapter, code=1).output


def test_merge_verify_failure_writes_nothing(tmp_path, monkeypatch):
    import importlib

    verify_module = importlib.import_module("rslora_tools.commands.verify")

    real = verify_module.merged_tensor

    def wrong(t, *args, **kwargs):
        value = real(t, *args, **kwargs)
        return value * 2 if t.name == Q else value

    monkeypatch.setattr(verify_module, "merged_tensor", wrong)
    result = run("merge", BASE, ADAPTER, tmp_path / "out", "--verify", code=1)
    assert "verification of the merged output failed" in result.output and Q in result.output
    assert list(tmp_path.iterdir()) == []


def test_merge_verify_passes(tmp_path):
    report = json.loads(run("merge", BASE, ADAPTER, tmp_path / "out", "--verify", "--json").stdout)
    assert report["verify"]["verdict"] == "exact" and report["verify"]["tensors_checked"] == 21


# --- dry run ------------------------------------------------------------------------------------------


def test_dry_run_plan(tmp_path):
    result = run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run")
    assert "model.layers.*.self_attn.o_proj.weight (x2): LoRA (linear) at scale 8" in result.output
    assert "memory needed" in result.output and "free (fits)" in result.output
    report = json.loads(run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run", "--json").stdout)
    assert len(report["changes"]) == 14 and report["memory_bytes"] > 0 and report["free_bytes"] > 0
    o = next(c for c in report["changes"] if c["tensor"] == "model.layers.0.self_attn.o_proj.weight")
    assert (o["scale"], o["rank"], o["alpha"]) == (8.0, 4, 16)
    assert not (tmp_path / "out").exists()


def test_dry_run_says_what_computes_each_tensor(tmp_path, monkeypatch):
    from rslora_tools.compute import kernel

    report = json.loads(run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run", "--json").stdout)
    o = next(c for c in report["changes"] if c["tensor"] == "model.layers.0.self_attn.o_proj.weight")
    assert o["by"] == ("kernel" if kernel.available() else "torch")
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    result = run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run")
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
    result = run("merge", BASE, adapter, tmp_path / "out", "--dry-run", code=1)
    assert result.output.count("matches nothing in the base") == 4
    assert "4 adapter tensor(s) match no base tensor" in result.output
    report = json.loads(run("merge", BASE, adapter, tmp_path / "out", "--dry-run", "--json", code=1).stdout)
    assert len(report["unmatched"]) == 4
    assert not (tmp_path / "out").exists()


# --- disk space, full disk, signals ---------------------------------------------------------------------


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    import importlib

    merge_module = importlib.import_module("rslora_tools.commands.merge")

    monkeypatch.setattr(merge_module, "free_space", lambda out: 1000)
    result = run("merge", BASE, ADAPTER, tmp_path / "out", code=1)
    assert "writes 40.1 KB but only 1.0 KB is free there" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(small_disk):
    return small_disk("24k")


def test_small_disk_is_refused_by_the_free_space_check(tiny_disk):
    result = run("merge", BASE, ADAPTER, tiny_disk / "out", code=1)
    assert "is free there" in result.output
    assert list(tiny_disk.iterdir()) == []


def test_full_disk_midway_leaves_nothing(tiny_disk, monkeypatch):
    import importlib

    merge_module = importlib.import_module("rslora_tools.commands.merge")

    monkeypatch.setattr(merge_module, "free_space", lambda out: None)  # free space unknown: no early refusal
    result = run("merge", BASE, ADAPTER, tiny_disk / "out", code=1)
    assert "No space left on device" in result.output and "nothing was written" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tiny_disk.iterdir()) == []


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
    proc = subprocess.Popen([sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter), str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.rslora-tools-tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted; nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --- inputs are read-only; NaN refusal ---------------------------------------------------------------------


def test_inputs_are_never_modified(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(BASE, base)
    shutil.copytree(ADAPTER, adapter)
    before = (tree_digest(base), tree_digest(adapter))
    run("merge", base, adapter, tmp_path / "m", "--verify")
    run("verify", tmp_path / "m", base, adapter)
    run("convert", adapter, tmp_path / "c", "--target", "unit")
    run("convert", adapter, tmp_path / "g.gguf", "--target", "llama.cpp", "--base", base)
    run("inspect", adapter, "--base", base)
    assert (tree_digest(base), tree_digest(adapter)) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_adapter_weights_are_refused(tmp_path, bad):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = bad
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    result = run("merge", BASE, adapter, tmp_path / "out", code=1)
    assert "NaN or Inf" in result.output and key in result.output and "--allow-nonfinite" in result.output
    assert not (tmp_path / "out").exists()
    assert "NaN or Inf" in run("convert", adapter, tmp_path / "c", "--to-classic", code=1).output
    run("merge", BASE, adapter, tmp_path / "out", "--allow-nonfinite")
    merged_q = load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    assert not torch.isfinite(merged_q).all()
    expected = peft_merged_state_dict(BASE, adapter)["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(merged_q.isnan(), expected.isnan())
