"""inspect: per-module scales, per-runtime ratios, lints and exit codes, on adapters built by PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import Result
from helpers import cli_run
from peft import LoraConfig
from peft_oracle import make_adapter

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def inspect(*args, code: int = 0) -> Result:
    return cli_run("inspect", *args, code=code)


def inspect_json(*args, code: int = 0) -> dict:
    return json.loads(inspect(*args, "--json", code=code).stdout)


def edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def patterned(llama_fp32, tmp_path) -> Path:
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ATTN,
        init_lora_weights=False,
        rank_pattern={"o_proj": 4},
        alpha_pattern={"v_proj": 4},
    )
    return make_adapter(llama_fp32, tmp_path / "a", cfg)


def test_modules_scales_and_runtime_ratios(patterned):
    report = inspect_json(patterned, "--runtime", "vllm@0.31.0", "--runtime", "vllm@0.6.4")
    assert report["convention"] == "rslora" and report["errors"] == 0
    by_name = {m["name"]: m for m in report["modules"]}
    assert len(by_name) == 8
    o = by_name["model.layers.0.self_attn.o_proj"]
    assert (o["rank"], o["alpha"], o["scale"]) == (4, 16, 8.0)
    assert (
        o["runtimes"]["vllm"]["scale"] == 8.0 and o["runtimes"]["vllm"]["ratio"] == 1.0
    )  # patterns honoured since 0.32
    assert o["runtimes"]["vllm@0.31.0"]["scale"] == 16 / math.sqrt(8)  # global r: patterns ignored
    assert o["runtimes"]["vllm@0.6.4"]["scale"] == 16 / 8  # alpha / r: use_rslora ignored too
    assert o["runtimes"]["sglang"]["scale"] == 2.0  # alpha / r, use_rslora ignored
    assert o["runtimes"]["llama.cpp"]["scale"] == 4.0  # alpha / rank from the shape
    assert o["runtimes"]["peft"]["ratio"] == 1.0
    groups = {g["modules"]: g for g in report["groups"]}
    assert groups["model.layers.*.self_attn.q_proj"]["count"] == 2
    assert groups["model.layers.*.self_attn.q_proj"]["layers"] == "0-1"
    assert (
        report["runtimes"]["vllm"]["status"] == "exact" and report["runtimes"]["vllm"]["version"] == "0.32.0 and later"
    )
    assert report["runtimes"]["vllm@0.31.0"]["status"] == "wrong scale"
    assert report["runtimes"]["vllm@0.31.0"]["modules_off"] == 4
    assert report["runtimes"]["peft"]["status"] == "exact"


def test_text_table_and_runtime_warnings_with_strict(patterned):
    text = inspect(patterned).output
    assert "model.layers.*.self_attn.o_proj" in text and "0.7071x" in text
    assert "0 errors, 0 warnings" in text
    result = inspect(patterned, "--runtime", "vllm@0.31.0", "--strict", code=1)
    assert "warning: vLLM (0.7.0 to 0.31.x) would apply" in result.output and "--target vllm@0.31.0" in result.output
    inspect(patterned, "--runtime", "vllm@0.31.0")  # warnings alone do not fail without --strict
    current = inspect(patterned, "--runtime", "vllm", "--strict").output  # today's vLLM serves it right
    assert "info: vLLM 0.7.0 to 0.31.x would apply" in current and "--target vllm@0.7.0" in current
    assert "info: vLLM 0.6.5 to 0.6.x cannot serve this adapter: it refuses rsLoRA adapters" in current


def test_lints_unmatched_and_order_dependent_patterns(patterned):
    edit_config(patterned, alpha_pattern={"v_proj": 4, "layers.0.self_attn.v_proj": 2, "qproj": 3})
    report = inspect_json(patterned)
    codes = [(lint["level"], lint["code"]) for lint in report["lints"]]
    assert ("warning", "unmatched-pattern") in codes
    assert ("warning", "order-dependent") in codes
    assert report["errors"] == 0
    inspect(patterned, "--strict", code=1)


def test_rank_mismatch_is_an_error(patterned):
    edit_config(patterned, rank_pattern={"o_proj": 2})
    report = inspect_json(patterned, code=1)
    assert any(lint["code"] == "rank-mismatch" and lint["level"] == "error" for lint in report["lints"])


def test_features_and_runtimes_that_cannot_serve(llama_fp32, tmp_path):
    cfg = LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    report = inspect_json(adapter, "--runtime", "vllm")
    assert "DoRA (use_dora)" in report["features"] and "embedding LoRA" in report["features"]
    assert report["runtimes"]["vllm"]["status"] == "cannot serve"
    assert all(m["runtimes"]["vllm"] == {"scale": None, "ratio": None} for m in report["modules"])  # not "1x"
    assert any(lint["code"] == "runtime-unsupported" and lint["level"] == "warning" for lint in report["lints"])
    assert any(lint["code"] == "tied-embedding" for lint in report["lints"])
    assert " no " in inspect(adapter).output


def test_with_base_reports_missing_modules(patterned, llama_fp32, tmp_path):
    assert inspect_json(patterned, "--base", llama_fp32)["errors"] == 0
    from peft_oracle import make_llama

    other = make_llama(tmp_path / "other", hidden_size=64, intermediate_size=64)
    report = inspect_json(patterned, "--base", other, code=1)
    assert any(lint["code"] == "base" and lint["level"] == "error" for lint in report["lints"])


def test_bad_adapter_is_one_line_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    result = inspect(tmp_path, code=1)
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1


def test_with_base_lists_every_module_missing_from_it(patterned, tmp_path):
    import shutil

    from peft_oracle import make_llama

    shallow = make_llama(tmp_path / "one-layer", num_hidden_layers=1)
    report = inspect_json(patterned, "--base", shallow, code=1)
    missing = [lint for lint in report["lints"] if lint["code"] == "base" and lint["level"] == "error"]
    assert len(missing) == 8  # layer 1's four modules, A and B each
    assert all("layers.1." in lint["message"] for lint in missing)
    shutil.rmtree(shallow)
