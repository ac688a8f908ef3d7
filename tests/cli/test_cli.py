"""CLI behaviour: exit codes, one-line errors, --json, refusals, atomic output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run
from peft import LoraConfig
from peft_oracle import make_adapter, make_llama, save_module
from safetensors.torch import load_file, save_file


def copy_adapter(tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    dst = tmp_path / "adapter"
    shutil.copytree(ADAPTER, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def assert_clean_error(result, *fragments: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("Warning:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_and_version():
    cli_run("--help")
    result = cli_run("merge", "--help", code=None)
    assert result.exit_code == 0 and "Examples:" in result.output
    assert cli_run("--version").output.startswith("rslora-tools, version ")


def test_json_report(tmp_path):
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--json", code=None)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["convention"] == "rslora"
    assert report["modules"] == 14
    assert report["tensors_merged"] == 14 and report["tensors_total"] == 21
    assert report["scale_min"] == pytest.approx(8.5 / 8**0.5) and report["scale_max"] == pytest.approx(16 / 2)
    assert report["shards"] == ["model.safetensors"]
    assert report["dtype"] == "BF16" and report["device"] == "cpu"


def test_quiet_prints_nothing(tmp_path):
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "-q", code=None)
    assert result.exit_code == 0 and result.output == ""


def test_dry_run_writes_nothing(tmp_path):
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dry-run", code=None)
    assert result.exit_code == 0 and "Would merge 14 LoRA modules" in result.output
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path):
    cli_run("merge", BASE, code=2)
    cli_run("merge", BASE, ADAPTER, tmp_path / "o", "--dtype", "int4", code=2)
    cli_run("merge", BASE, ADAPTER, tmp_path / "o", "--max-shard-size", "lots", code=2)


def test_existing_output_needs_overwrite(tmp_path):
    """--overwrite replaces a folder rslora-tools wrote; a folder of the user's own files is never replaced
    (docs/reliability.md, "What --overwrite replaces")."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(cli_run("merge", BASE, ADAPTER, out, code=None), "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert_clean_error(cli_run("merge", BASE, ADAPTER, out, "--overwrite", code=None), "did not write", "keep.txt")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    cli_run("merge", BASE, ADAPTER, out)  # empty: written
    (out / "notes.txt").write_text("added later")
    cli_run("merge", BASE, ADAPTER, out, "--overwrite")  # rslora-tools wrote it: replaced
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()


def test_empty_existing_output_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")


@pytest.mark.parametrize("which", ["base", "adapter", "inside-base"])
def test_output_may_not_be_an_input(tmp_path, which):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    adapter = copy_adapter(tmp_path)
    out = {"base": base, "adapter": adapter, "inside-base": base / "merged"}[which]
    assert_clean_error(cli_run("merge", base, adapter, out, "--overwrite", code=None), "may not be")
    assert (base / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file()


def test_missing_inputs(tmp_path):
    assert_clean_error(
        cli_run("merge", tmp_path / "nope", ADAPTER, tmp_path / "o", code=None), "base model folder not found"
    )
    assert_clean_error(
        cli_run("merge", BASE, tmp_path / "nope", tmp_path / "o", code=None), "adapter folder not found"
    )
    (tmp_path / "empty").mkdir()
    assert_clean_error(cli_run("merge", BASE, tmp_path / "empty", tmp_path / "o", code=None), "no adapter_config.json")


@pytest.mark.parametrize(
    "edit,fragments",
    [
        (
            lambda c: c.update(peft_type="BOFT"),
            ["peft_type is 'BOFT'", "merges LORA, LOHA, LOKR, ADALORA, VERA adapters"],
        ),
        (lambda c: c.update(layer_replication=[[0, 2], [1, 2]]), ["layer_replication"]),
        (lambda c: c.update(init_lora_weights="pissa"), ["pissa", "--initial INIT", "--base-is-residual"]),
        (lambda c: c.update(init_lora_weights="pissa_niter_4"), ["pissa_niter_4"]),
        (lambda c: c.update(init_lora_weights="olora"), ["olora"]),
        (lambda c: c.update(init_lora_weights="corda"), ["corda"]),
        (lambda c: c.update(init_lora_weights="loftq"), ["loftq"]),
        (lambda c: c.update(init_lora_weights="lora_ga"), ["lora_ga"]),
        (lambda c: c.update(alora_invocation_tokens=[1, 2]), ["aLoRA"]),
        (lambda c: c.update(use_qalora=True), ["QALoRA"]),
        (lambda c: c.update(kasa_config={"x": 1}), ["KaSA"]),
        (lambda c: c.update(use_bdlora={"block": 2}), ["BD-LoRA"]),
        (lambda c: c.update(arrow_config={"top_k": 2}), ["Arrow"]),
        (lambda c: c.update(r="eight"), ["'r' must be a positive integer"]),
        (lambda c: c.update(lora_alpha=None, use_rslora="yes"), ["'use_rslora' must be true or false"]),
        (lambda c: c.update(rank_pattern={"o_proj": 2}), ["config gives rank 2", "saved tensors have rank 4"]),
        (lambda c: c.pop("peft_type"), ["missing 'peft_type'"]),
    ],
)
def test_refusals(tmp_path, edit, fragments):
    adapter = copy_adapter(tmp_path, edit_config=edit)
    result = cli_run("merge", BASE, adapter, tmp_path / "out", code=None)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_invalid_json_config(tmp_path):
    adapter = copy_adapter(tmp_path)
    (adapter / "adapter_config.json").write_text("{not json")
    assert_clean_error(cli_run("merge", BASE, adapter, tmp_path / "out", code=None), "not valid JSON")


def test_adapter_tensor_matching_no_base_tensor(tmp_path):
    def rename(t):
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = t.pop(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        )
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = t.pop(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        )

    adapter = copy_adapter(tmp_path, edit_tensors=rename)
    assert_clean_error(
        cli_run("merge", BASE, adapter, tmp_path / "out", code=None), "layers.7.self_attn.q_proj", "matches no tensor"
    )


def test_shape_mismatch(tmp_path):
    def grow(t):
        k = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        t[k] = torch.zeros(40, t[k].shape[1])

    adapter = copy_adapter(tmp_path, edit_tensors=grow)
    assert_clean_error(
        cli_run("merge", BASE, adapter, tmp_path / "out", code=None), "q_proj", "base weight is [32, 32]"
    )


def test_lora_without_b(tmp_path):
    adapter = copy_adapter(
        tmp_path, edit_tensors=lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    )
    assert_clean_error(cli_run("merge", BASE, adapter, tmp_path / "out", code=None), "not both LoRA A and B")


def test_pickle_only_adapter_is_refused(tmp_path):
    adapter = copy_adapter(tmp_path)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    assert_clean_error(cli_run("merge", BASE, adapter, tmp_path / "out", code=None), "pickle", "--allow-pickle")
    result = cli_run("merge", BASE, adapter, tmp_path / "out", "--allow-pickle", code=None)
    assert result.exit_code == 0, result.output
    reference = tmp_path / "ref"
    cli_run("merge", BASE, ADAPTER, reference)
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_lora_bias_on_layer_without_bias(tmp_path):
    biased = make_llama(tmp_path / "biased", torch.float32, attention_bias=True)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"], init_lora_weights=False)
    adapter = make_adapter(biased, tmp_path / "adapter", cfg)
    plain = make_llama(tmp_path / "plain", torch.float32)
    assert_clean_error(cli_run("merge", plain, adapter, tmp_path / "out", code=None), "lora_bias", "has no bias")


def test_conv_groups_refused(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=2)

    net = Net()
    base = save_module(net, tmp_path / "base")
    r = 2
    tensors = {
        "base_model.model.conv.lora_A.weight": torch.randn(r, 4, 3, 3),
        "base_model.model.conv.lora_B.weight": torch.randn(4, r // 2, 1, 1),
    }
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 4}))
    assert_clean_error(cli_run("merge", base, adapter, tmp_path / "out", code=None), "groups > 1")


def test_traceback_only_with_debug(tmp_path):
    adapter = copy_adapter(tmp_path, edit_config=lambda c: c.update(peft_type="IA3"))
    result = cli_run("merge", BASE, adapter, tmp_path / "out", env={"RSLORA_TOOLS_DEBUG": "1"}, code=None)
    assert result.exit_code == 1 and result.exception is not None
    assert type(result.exception).__name__ == "UnsupportedAdapterError"


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import importlib

    executor = importlib.import_module("rslora_tools.execute.executor")

    calls = {"n": 0}
    real = executor._produce

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(executor, "_produce", failing)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", code=None)
    assert_clean_error(result, "interrupted", code=130)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_base_shard(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-100])
    assert_clean_error(
        cli_run("merge", base, ADAPTER, tmp_path / "out", code=None), "model.safetensors", "truncated or corrupt"
    )


def test_index_naming_a_file_outside_the_folder(tmp_path):
    base = make_llama(tmp_path / "base", torch.float32, max_shard_size="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../evil.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_error(cli_run("merge", base, ADAPTER, tmp_path / "out", code=None), "not a plain file name")


def test_unsupported_quantized_base_refused(tmp_path):
    """Quantization methods other than bitsandbytes, GPTQ and AWQ are refused with the method named;
    a config that says bitsandbytes over unquantized weights is refused too."""
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "hqq", "nbits": 4}
    (base / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli_run("merge", base, ADAPTER, tmp_path / "out", code=None), "'hqq'", "unquantized")
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(cli_run("merge", base, ADAPTER, tmp_path / "out", code=None), "no quantized weight")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    assert_clean_error(
        cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--device", "cuda", code=None), "CUDA is not available"
    )
    assert not (tmp_path / "out").exists()


def test_package_api_and_lazy_imports():
    import subprocess
    import sys

    import rslora_tools
    import rslora_tools.commands.merge  # noqa: F401  (importing the module must not shadow the function)

    assert callable(rslora_tools.merge) and rslora_tools.merge.__name__ == "merge"
    from rslora_tools import convert, inspect_adapter, push, verify

    assert all(callable(f) for f in (convert, inspect_adapter, push, verify))
    code = "import sys, rslora_tools.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    """`rslora-tools merge ... --dry-run | true`: the reader is gone before the report is printed; no error message,
    exit 141 as a shell tool killed by SIGPIPE."""
    import subprocess
    import sys

    script = (
        f"{sys.executable} -m rslora_tools merge {BASE} {ADAPTER} {tmp_path / 'out'} --dry-run | true; "
        "exit ${PIPESTATUS[0]}"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.stderr == "" and done.returncode == 141, (done.returncode, done.stderr)
    assert not (tmp_path / "out").exists()


def test_every_command_takes_q_and_prints_nothing_on_stdout_when_it_succeeds(tmp_path):
    """The README's promise: `-q` on every command (inspect and push had none; verify still printed its verdict)."""
    from rslora_tools.cli import cli

    assert all(any("-q" in p.opts for p in command.params) for command in cli.commands.values()), [
        name for name, command in cli.commands.items() if not any("-q" in p.opts for p in command.params)
    ]
    out = tmp_path / "out"
    runs = [
        ("merge", BASE, ADAPTER, out),
        ("verify", out, BASE, ADAPTER),
        ("inspect", ADAPTER),
        ("convert", ADAPTER, tmp_path / "classic", "--to-classic"),
        ("combine", ADAPTER, tmp_path / "combined"),
        ("extract", BASE, out, tmp_path / "extracted", "--rank", "4"),
        ("push", out, "me/merged", "--dry-run"),
    ]
    for args in runs:
        result = cli_run(*args, "-q")
        assert result.stdout == "", (args, result.stdout)
