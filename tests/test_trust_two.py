"""Trust, round two: verify judges what a loader loads, nothing hangs or balloons, every message is true.

(OUT against the inputs and the atomic swap are in test_output_safety.py; the bad inputs that end
in one line are rows of the generated table in test_reliability.py.)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rslora_tools.cli import cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BASE, ADAPTER = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora"
NORM = "model.norm.weight"  # untouched by the adapter


def run(*args, code: int | None = 0, env: dict | None = None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def verdict(out: Path, base: Path = BASE, adapter: Path = ADAPTER) -> dict:
    return json.loads(run("verify", out, base, adapter, "--json", code=None).stdout)


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- verify judges what a loader would load -------------------------------------------------------------


def test_verify_sees_an_unmerged_single_file_beside_the_merged_index(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    run("merge", base, ADAPTER, tmp_path / "out", "--max-shard-size", "20KB")
    assert verdict(tmp_path / "out", base)["verdict"] == "exact"
    shutil.copy(BASE / "model.safetensors", tmp_path / "out" / "model.safetensors")  # transformers loads this one
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "mismatch" and "transformers loads model.safetensors" in report["problems"][0]


def test_verify_sees_a_quantization_config_added(tmp_path):
    run("merge", BASE, ADAPTER, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "mismatch" and any("quantization_config" in p for p in report["problems"])


def test_verify_sees_a_config_dtype_the_loader_would_cast_to(tmp_path):
    run("merge", BASE, ADAPTER, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "float16"
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert verdict(tmp_path / "out")["verdict"] == "mismatch"


def test_verify_wants_copied_tensors_byte_exact(tmp_path):
    """An untouched bf16 tensor rewritten as fp16 (or one ulp off) is a mismatch, not 'within rounding'."""
    run("merge", BASE, ADAPTER, tmp_path / "out")
    edit_tensors(tmp_path / "out" / "model.safetensors", lambda t: t.update({NORM: t[NORM].to(torch.float16)}))
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "mismatch" and any(NORM in p and "F16" in p for p in report["problems"])
    run("merge", BASE, ADAPTER, tmp_path / "out", "--overwrite")
    edit_tensors(tmp_path / "out" / "model.safetensors", lambda t: t[NORM].view(torch.int16)[0].add_(1))
    report = verdict(tmp_path / "out")
    check = next(c for c in report["tensors"] if c["name"] == NORM)
    assert check["status"] == "mismatch" and report["verdict"] == "mismatch"


def test_verify_accepts_a_merge_made_with_dtype(tmp_path):
    run("merge", BASE, ADAPTER, tmp_path / "out", "--dtype", "fp32")
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "exact" and report["tensors_checked"] == report["tensors_total"]


def with_f4_tensor(folder: Path) -> None:
    """Append a tensor of a dtype torch cannot hold (F4, 4-bit floats) to a single-file checkpoint."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header["quant.packed"] = {"dtype": "F4", "shape": [32], "data_offsets": [len(data), len(data) + 16]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(range(16)))


def test_verify_checks_tensors_torch_cannot_load(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    with_f4_tensor(base)
    run("merge", base, ADAPTER, tmp_path / "out")
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "exact" and report["tensors_checked"] == report["tensors_total"] == 22
    path = tmp_path / "out" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\xff")  # the F4 tensor's last byte
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "mismatch" and report["mismatched"] == 1


def test_verify_of_an_unreadable_folder_claims_no_sample(tmp_path):
    run("merge", BASE, ADAPTER, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"\0" * 7)
    result = run("verify", tmp_path / "out", BASE, ADAPTER, code=1)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("MISMATCH: 0 tensors checked:") and "sample" not in last


# --- no hang ------------------------------------------------------------------------------------------


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
    done = subprocess.run([sys.executable, "-m", "rslora_tools", *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and "not a regular file" in done.stdout + done.stderr


def eva_like(tmp: Path, modules: int) -> tuple[Path, Path]:
    """A base of many small Linear weights and an adapter with one rank/alpha pattern key per module (as EVA writes)."""
    base, adapter = tmp / "base", tmp / "adapter"
    base.mkdir()
    adapter.mkdir()
    save_file({f"model.layers.{i}.proj.weight": torch.randn(16, 16).to(torch.bfloat16) for i in range(modules)},
              base / "model.safetensors", metadata={"format": "pt"})
    tensors, ranks, alphas = {}, {}, {}
    for i in range(modules):
        r = 2 + i % 5
        tensors[f"base_model.model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(r, 16) * 0.01
        tensors[f"base_model.model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(16, r) * 0.01
        ranks[f"model.layers.{i}.proj"] = r
        alphas[f"model.layers.{i}.proj"] = 1.5 * r
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_rslora": True, "rank_pattern": ranks, "alpha_pattern": alphas}))
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
    run("merge", base, adapter, tmp_path / "out", "--json")
    run("inspect", adapter, "--base", base, "--json")
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


@pytest.mark.parametrize("command", ["merge", "push"])
def test_a_hub_that_never_answers_times_out(tmp_path, command):
    server = SilentServer()
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "1", "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_XET": "1"}
    args = ["merge", "org/base", "org/adapter", tmp_path / "out"] if command == "merge" else ["push", BASE, "me/x"]
    try:
        done = subprocess.run([sys.executable, "-m", "rslora_tools", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=180)
    finally:
        server.close()
    assert done.returncode == 1 and "did not answer in time" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- memory -------------------------------------------------------------------------------------------


def peak_rss_mb(args: list) -> float:
    """Run the CLI in a child process; its peak resident memory in MB.

    Read from /proc (VmHWM, which starts afresh at exec), not from getrusage, whose maximum
    includes the moments before exec when the child was a copy of this big test process.
    """
    code = ("import re, sys; from rslora_tools.cli import main; sys.argv = ['rslora-tools', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def test_the_nan_check_reads_in_blocks(tmp_path):
    """A 256 MB tensor saved whole in the adapter: checking it for NaN/Inf must not read it whole."""
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.score.weight"] = torch.zeros(8192, 8192)  # 256 MB of fp32
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    from rslora_tools.compute import kernel

    limit = 128 if kernel._kernel() is not None else 128 + 300  # without the compiled counter, torch counts (and loads)
    assert peak_rss_mb(["convert", adapter, tmp_path / "c", "--to-classic"]) < limit


def test_verify_compares_in_blocks(tmp_path):
    """verify on a 64 MB tensor that differs by rounding everywhere: a few copies of it, not ~60 bytes per element."""
    w = torch.randn(4096, 4096).to(torch.bfloat16)
    base = tmp_path / "base"
    base.mkdir()
    save_file({"layer.weight": w}, base / "model.safetensors", metadata={"format": "pt"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.layer.lora_A.weight": torch.randn(8, 4096) * 0.01,
               "base_model.model.layer.lora_B.weight": torch.randn(4096, 8) * 0.01},
              adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 8}))
    run("merge", base, adapter, tmp_path / "out")
    edit_tensors(tmp_path / "out" / "model.safetensors", lambda t: t["layer.weight"].view(torch.int16).add_(
        (torch.arange(4096 * 4096).reshape(4096, 4096) % 2).to(torch.int16)))  # half the elements one ulp up
    assert json.loads(run("verify", tmp_path / "out", base, adapter, "--json").stdout)["verdict"] == "within rounding"
    assert peak_rss_mb(["verify", tmp_path / "out", base, adapter, "-q"]) < 700  # was ~2.4 GB


def test_a_huge_header_costs_memory_in_proportion(tmp_path):
    """A base with 400k tiny tensors (a 48 MB header): at most a plain merge plus 4x the header, in all.

    Measured on the benchmark machine: 3.4x the header (at 800k tensors, a 97 MB header: 362 MB; it
    was 964 MB, and 1.16 GB before the header parser kept entries as tuples). The header is scanned
    in place, its tensors kept in compact arrays (safetensors_file.TensorTable), and the output's
    header written a megabyte at a time."""
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(BASE / "config.json", base / "config.json")
    raw = (BASE / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    header.pop("__metadata__", None)
    count = 400_000
    for i in range(count):
        header[f"extra.block_{i}.some_long_parameter_name.weight"] = {
            "dtype": "F32", "shape": [1], "data_offsets": [len(data) + 4 * i, len(data) + 4 * i + 4]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (base / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(4 * count))
    peak = peak_rss_mb(["merge", base, ADAPTER, tmp_path / "out", "-q"])
    plain = peak_rss_mb(["merge", BASE, ADAPTER, tmp_path / "plain", "-q"])
    assert peak < 24 + count * 1.3 / 1024  # MB: the runtime, and 1.3 KB per tensor
    assert peak < plain + 4 * len(blob) / 2**20, (peak, plain, len(blob) / 2**20)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    assert len(merged) == 21 + count


# --- leftovers and true messages ---------------------------------------------------------------------------


def test_leftovers_of_a_killed_run_are_removed_and_mentioned(tmp_path):
    leftover = tmp_path / ".out.rslora-tools-tmp-999999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a shard")
    result = CliRunner().invoke(cli, ["merge", str(BASE), str(ADAPTER), str(tmp_path / "out")])
    assert result.exit_code == 0 and "removed .out.rslora-tools-tmp-999999999" in result.output
    assert not leftover.exists() and (tmp_path / "out" / "model.safetensors").is_file()
    mine = tmp_path / f".out2.rslora-tools-tmp-{os.getppid()}"  # a live process's: left alone
    mine.mkdir()
    run("merge", BASE, ADAPTER, tmp_path / "out2")
    assert mine.exists()


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
    result = run("merge", BASE, ADAPTER, tmp_path / "a" / "out", code=130)
    assert "interrupted; nothing was written" in result.output
    assert list(tmp_path.iterdir()) == []


def test_convert_on_a_full_disk_names_the_output(tiny_disk):
    for out in ("c", "g.gguf"):
        args = ["convert", ADAPTER, tiny_disk / out, "--target", "llama.cpp" if out.endswith(".gguf") else "unit"]
        if out.endswith(".gguf"):
            args += ["--base", BASE]
        result = run(*args, code=1)
        line = result.output.strip()
        assert str(tiny_disk / out) in line and "nothing was written" in line and "unexpected" not in line, line
        assert list(tiny_disk.iterdir()) == []


@pytest.fixture
def tiny_disk(small_disk):
    return small_disk("12k")


def test_an_interrupted_push_says_out_is_complete(tmp_path, monkeypatch):
    import rslora_tools.commands.common as common

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "push_folder", interrupted)
    result = run("merge", BASE, ADAPTER, tmp_path / "out", "--push-to-hub", "me/merged", code=130)
    assert "interrupted during the push" in result.output and "is complete on disk" in result.output
    assert "rslora-tools push" in result.output and (tmp_path / "out" / "model.safetensors").is_file()


def test_lora_on_an_integer_weight_is_refused_by_inspect_and_the_dry_run(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    edit_tensors(base / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"].to(torch.int64)}))
    result = run("merge", base, ADAPTER, tmp_path / "out", "--dry-run", code=1)
    assert "dtype I64" in result.output and "unexpected" not in result.output
    report = json.loads(run("inspect", ADAPTER, "--base", base, "--json", code=1).stdout)
    assert any("dtype I64" in lint["message"] for lint in report["lints"] if lint["level"] == "error")




_STUCK_WORKER = """
import sys, time
from rslora_tools.execute import executor
executor.STOP_WAIT_SECONDS = 0.5
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

    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WORKER, "merge", str(BASE), str(ADAPTER), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
