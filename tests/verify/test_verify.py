"""verify vouches only for what a loader loads, and says which recipe it checked.

(The other checks of what a loader loads are in test_trust_two.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE, cli_run, edit_tensors, merged
from peft import LoraConfig
from peft_oracle import make_adapter

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"  # untouched by the adapter


def test_a_merged_folder_that_also_holds_the_adapter_is_a_folder_problem(tmp_path):
    """transformers loads a folder with adapter_config.json as that adapter on its base: the merge applied twice."""
    out = tmp_path / "out"
    cli_run("merge", BASE, ADAPTER, out)
    assert cli_run("verify", out, BASE, ADAPTER).output.startswith("EXACT")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ADAPTER / name, out / name)
    result = cli_run("verify", out, BASE, ADAPTER, code=1)
    assert (
        "problem: adapter_config.json, adapter_model.safetensors in the merged folder: transformers and PEFT load "
        "such a folder as an adapter and apply it (again) on top of the merged weights; remove them from the "
        "merged model"
    ) in result.output
    assert "MISMATCH" in result.output and "1 folder problem;" in result.output


def test_the_verdict_names_the_recipe_taken_from_the_merged_folders_record(tmp_path):
    out = tmp_path / "out"
    cli_run("merge", BASE, ADAPTER, ADAPTER, out, "--weights", "0.7,0.4")
    result = cli_run("verify", out, BASE, ADAPTER, ADAPTER)
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("EXACT") and line.endswith("; recipe from rslora_tools.json of MERGED: --weights 0.7,0.4")
    report = json.loads(cli_run("verify", out, BASE, ADAPTER, ADAPTER, "--json").stdout)
    assert report["recipe"]["from"] == "rslora_tools.json of MERGED" and report["recipe"]["weights"] == [0.7, 0.4]
    given = cli_run("verify", out, BASE, ADAPTER, ADAPTER, "--weights", "0.7,0.4").output.strip().splitlines()[-1]
    assert given.startswith("EXACT") and "recipe from" not in given  # the arguments: nothing to say
    assert cli_run("verify", out, BASE, ADAPTER, ADAPTER, "--weights", "1,1", code=1).output.count("mismatch:") > 0


def test_a_trained_on_recipe_taken_from_the_record_is_named_too(tmp_path):
    out = tmp_path / "out"
    cli_run("merge", BASE, ADAPTER, out, "--trained-on", "nf4")
    line = cli_run("verify", out, BASE, ADAPTER).output.strip().splitlines()[-1]
    assert line.startswith("EXACT")
    assert line.endswith("; recipe from rslora_tools.json of MERGED: --trained-on nf4 (no double quant, blocksize 64)")


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_verify_exact(tmp_path):
    out = merged(tmp_path)
    result = cli_run("verify", out, BASE, ADAPTER)
    assert result.output.startswith("EXACT: 21 tensors checked: 21 exact")
    report = json.loads(cli_run("verify", out, BASE, ADAPTER, "--json").stdout)
    assert report["verdict"] == "exact" and report["mismatched"] == 0 and report["problems"] == []


def test_verify_a_merge_made_by_peft(llama_fp32, tmp_path):
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        rank_pattern={"v_proj": 4},
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    from peft import PeftModel
    from peft_oracle import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(llama_fp32), str(adapter)).merge_and_unload()
    model.save_pretrained(tmp_path / "peft-merged")
    report = json.loads(cli_run("verify", tmp_path / "peft-merged", llama_fp32, adapter, "--json").stdout)
    assert report["verdict"] == "exact", report["problems"]


def test_verify_tells_rounding_from_mismatch(tmp_path):
    out = merged(tmp_path)
    edit_tensors(out / "model.safetensors", lambda t: t[Q].view(torch.int16)[0, 0].add_(1))  # one ulp away
    result = cli_run("verify", out, BASE, ADAPTER)
    assert result.output.splitlines()[-1].startswith("WITHIN ROUNDING")
    assert "1 ulp" in result.output

    def corrupt(t):
        t[Q][3, 4] += 0.5

    edit_tensors(out / "model.safetensors", corrupt)
    result = cli_run("verify", out, BASE, ADAPTER, code=1)
    assert f"mismatch: {Q}" in result.output and result.output.splitlines()[-1].startswith("MISMATCH")


def test_verify_sample(tmp_path):
    out = merged(tmp_path)
    report = json.loads(cli_run("verify", out, BASE, ADAPTER, "--sample", "5", "--json").stdout)
    assert report["tensors_checked"] == 5 and report["tensors_total"] == 21
    assert all(t["changed"] for t in report["tensors"])  # changed tensors are sampled first
    edit_tensors(out / "model.safetensors", lambda t: t["model.layers.1.mlp.down_proj.weight"].mul_(2))
    cli_run("verify", out, BASE, ADAPTER, "--sample", "14", code=1)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            lambda out: (out / "config.json").write_text(
                json.dumps({**json.loads((out / "config.json").read_text()), "vocab_size": 7})
            ),
            "vocab_size",
        ),
        (lambda out: (out / "config.json").unlink(), "config.json is missing"),
        (
            lambda out: edit_tensors(out / "model.safetensors", lambda t: t.pop("model.norm.weight")),
            "missing from the merged folder",
        ),
        (
            lambda out: edit_tensors(out / "model.safetensors", lambda t: t.update(extra=torch.zeros(2))),
            "unexpected tensor",
        ),
        (lambda out: (out / "model.safetensors").write_bytes(b"\x00" * 7), "cannot be read"),
    ],
)
def test_verify_catches_folder_problems(tmp_path, damage, says):
    out = merged(tmp_path)
    damage(out)
    result = cli_run("verify", out, BASE, ADAPTER, code=1)
    assert says in result.output


def test_verify_catches_index_disagreements(llama_sharded, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    adapter = make_adapter(llama_sharded, tmp_path / "a", cfg)
    cli_run("merge", llama_sharded, adapter, tmp_path / "out")
    assert (
        json.loads(cli_run("verify", tmp_path / "out", llama_sharded, adapter, "--json").stdout)["verdict"] == "exact"
    )
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = 123
    index_path.write_text(json.dumps(index))
    assert "total_size" in cli_run("verify", tmp_path / "out", llama_sharded, adapter, code=1).output
    shard = sorted((tmp_path / "out").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert "cannot be read" in cli_run("verify", tmp_path / "out", llama_sharded, adapter, code=1).output


def test_merge_verify_failure_writes_nothing(tmp_path, monkeypatch):
    import importlib

    verify_module = importlib.import_module("rslora_tools.execute.recompute")  # the recompute merge --verify runs

    real = verify_module.merged_tensor

    def wrong(t, *args, **kwargs):
        value = real(t, *args, **kwargs)
        return value * 2 if t.name == Q else value

    monkeypatch.setattr(verify_module, "merged_tensor", wrong)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--verify", code=1)
    assert "verification of the merged output failed" in result.output and Q in result.output
    assert list(tmp_path.iterdir()) == []


def test_merge_verify_passes(tmp_path):
    report = json.loads(cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--verify", "--json").stdout)
    assert report["verify"]["verdict"] == "exact" and report["verify"]["tensors_checked"] == 21


def verdict(out: Path, base: Path = BASE, adapter: Path = ADAPTER) -> dict:
    return json.loads(cli_run("verify", out, base, adapter, "--json", code=None).stdout)


def test_verify_sees_an_unmerged_single_file_beside_the_merged_index(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    cli_run("merge", base, ADAPTER, tmp_path / "out", "--max-shard-size", "20KB")
    assert verdict(tmp_path / "out", base)["verdict"] == "exact"
    shutil.copy(BASE / "model.safetensors", tmp_path / "out" / "model.safetensors")  # transformers loads this one
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "mismatch" and "transformers loads model.safetensors" in report["problems"][0]


def test_verify_sees_a_quantization_config_added(tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "mismatch" and any("quantization_config" in p for p in report["problems"])


def test_verify_sees_a_config_dtype_the_loader_would_cast_to(tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "float16"
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    assert verdict(tmp_path / "out")["verdict"] == "mismatch"


def test_verify_wants_copied_tensors_byte_exact(tmp_path):
    """An untouched bf16 tensor rewritten as fp16 (or one ulp off) is a mismatch, not 'within rounding'."""
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    edit_tensors(tmp_path / "out" / "model.safetensors", lambda t: t.update({NORM: t[NORM].to(torch.float16)}))
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "mismatch" and any(NORM in p and "F16" in p for p in report["problems"])
    cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--overwrite")
    edit_tensors(tmp_path / "out" / "model.safetensors", lambda t: t[NORM].view(torch.int16)[0].add_(1))
    report = verdict(tmp_path / "out")
    check = next(c for c in report["tensors"] if c["name"] == NORM)
    assert check["status"] == "mismatch" and report["verdict"] == "mismatch"


def test_verify_accepts_a_merge_made_with_dtype(tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out", "--dtype", "fp32")
    report = verdict(tmp_path / "out")
    assert report["verdict"] == "exact" and report["tensors_checked"] == report["tensors_total"]


def with_f4_tensor(folder: Path) -> None:
    """Append a tensor of a dtype torch cannot hold (F4, 4-bit floats) to a single-file checkpoint."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    header["quant.packed"] = {"dtype": "F4", "shape": [32], "data_offsets": [len(data), len(data) + 16]}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(range(16)))


def test_verify_checks_tensors_torch_cannot_load(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    with_f4_tensor(base)
    cli_run("merge", base, ADAPTER, tmp_path / "out")
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "exact" and report["tensors_checked"] == report["tensors_total"] == 22
    path = tmp_path / "out" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1] + b"\xff")  # the F4 tensor's last byte
    report = verdict(tmp_path / "out", base)
    assert report["verdict"] == "mismatch" and report["mismatched"] == 1


def test_verify_of_an_unreadable_folder_claims_no_sample(tmp_path):
    cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"\0" * 7)
    result = cli_run("verify", tmp_path / "out", BASE, ADAPTER, code=1)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("MISMATCH: 0 tensors checked:") and "sample" not in last
