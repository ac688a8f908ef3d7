"""`convert --expert-layout` and `--key-layout`: the same adapter in another layout, every value and scale kept;
PEFT loads the result and merges what it merged before (or, where PEFT's own conversion is wrong, what it merges
with the trained scale)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from layout_models import R, gpt_oss, moe_model, peft_merged, qwen2_vl, v4_adapter
from peft import LoraConfig, get_peft_model
from peft_oracle import assert_same_tensors, read_folder
from safetensors.torch import load_file


def fused_adapter(model, folder: Path, use_rslora: bool = True) -> Path:
    config = LoraConfig(r=R, lora_alpha=16, use_rslora=use_rslora, init_lora_weights=False, target_modules=["q_proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(folder)
    return folder


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    assert [k for k in x if not torch.equal(x[k], y[k])] == []


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_fused_to_per_expert_and_back_is_identical_and_merges_the_same(tmp_path, kind):
    model = gpt_oss() if kind == "gpt_oss" else moe_model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
    fused = fused_adapter(model, tmp_path / "fused")
    result = cli_run("convert", fused, tmp_path / "per", "--expert-layout", "per-expert", "--base", tmp_path / "base")
    assert "fused experts rewritten as one LoRA per expert" in result.output
    names = json.loads((tmp_path / "per" / "adapter_config.json").read_text())["target_modules"]
    assert set(names) >= ({"w1", "w2", "w3"} if kind == "mixtral" else {"gate_proj", "up_proj", "down_proj"})
    cli_run("convert", tmp_path / "per", tmp_path / "back", "--expert-layout", "fused", "--base", tmp_path / "base")
    same_tensors(fused, tmp_path / "back")
    # the per-expert form merges (slice by slice, gpt-oss's interleaved gate/up included) to PEFT's fused merge
    cli_run("merge", tmp_path / "base", tmp_path / "per", tmp_path / "out", "--dtype", "bf16")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged(tmp_path / "base", fused, torch.bfloat16))


@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
def test_per_expert_to_fused_and_back_is_identical_and_peft_merges_it(tmp_path, use_rslora):
    model = moe_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
    per = v4_adapter(tmp_path / "v4", "mixtral", use_rslora)
    cli_run("convert", per, tmp_path / "fused", "--expert-layout", "fused", "--base", tmp_path / "base")
    config = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    alpha = config["alpha_pattern"][r".*\.gate_up_proj"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 2 * R}
    assert alpha == (pytest.approx(16 * math.sqrt(2)) if use_rslora else 32)  # the trained scale at rank 2r
    cli_run("convert", tmp_path / "fused", tmp_path / "back", "--expert-layout", "per-expert", "--base", tmp_path / "base")
    same_tensors(per, tmp_path / "back")
    # PEFT loads the fused adapter as it is (no conversion): its merge is PEFT's merge of the per-expert adapter with
    # the trained scale
    want = peft_merged(tmp_path / "base", per, torch.bfloat16, fix_gate_up_scale=16 / (math.sqrt(R) if use_rslora else R))
    assert_same_tensors(peft_merged(tmp_path / "base", tmp_path / "fused", torch.bfloat16), want)


def test_key_layouts_round_trip_and_peft_on_transformers_5_needs_its_own_naming(tmp_path):
    model, model_class = qwen2_vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["q_proj", "qkv"])).save_pretrained(tmp_path / "adapter")
    result = cli_run("convert", tmp_path / "adapter", tmp_path / "legacy", "--key-layout", "base", "--base", tmp_path / "base")
    assert "3 module paths renamed to the base checkpoint's naming" in result.output
    keys = sorted(load_file(tmp_path / "legacy" / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert "base_model.model.visual.blocks.0.attn.qkv.lora_A.weight" in keys
    cli_run("convert", tmp_path / "legacy", tmp_path / "v5", "--key-layout", "transformers-5", "--base", tmp_path / "base")
    same_tensors(tmp_path / "adapter", tmp_path / "v5")
    # both merge alike here; PEFT 0.21.2 on transformers 5.25 loads only the in-memory naming (measured)
    cli_run("merge", tmp_path / "base", tmp_path / "legacy", tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"),
                        peft_merged(tmp_path / "base", tmp_path / "adapter", torch.float32, model_class=model_class))
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(model_class.from_pretrained(tmp_path / "base"), tmp_path / "legacy")
    assert any("missing adapter keys" in str(w.message) for w in caught)


@pytest.mark.parametrize(("args", "message"), [
    (("--expert-layout", "fused"), "--expert-layout and --key-layout need --base BASE"),
    (("--expert-layout", "fused", "--base", "B", "--target", "vllm"), "rewrite the layout only"),
])
def test_layout_options_are_checked(tmp_path, args, message):
    from helpers import ADAPTER

    args = [str(tmp_path) if a == "B" else a for a in args]
    assert message in cli_run("convert", ADAPTER, tmp_path / "out", *args, code=2).output


def test_an_expert_layout_for_a_model_without_experts_is_refused(tmp_path):
    from helpers import ADAPTER, BASE

    line = cli_run("convert", ADAPTER, tmp_path / "out", "--expert-layout", "fused", "--base", BASE, code=1).output
    assert "model_type 'llama' is not an MoE family whose expert layouts are known here" in line
