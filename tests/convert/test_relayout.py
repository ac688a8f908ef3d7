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
    config = LoraConfig(
        r=R,
        lora_alpha=16,
        use_rslora=use_rslora,
        init_lora_weights=False,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
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
    cli_run(
        "convert", tmp_path / "fused", tmp_path / "back", "--expert-layout", "per-expert", "--base", tmp_path / "base"
    )
    same_tensors(per, tmp_path / "back")
    # PEFT loads the fused adapter as it is (no conversion): its merge is PEFT's merge of the per-expert adapter with
    # the trained scale
    want = peft_merged(
        tmp_path / "base", per, torch.bfloat16, fix_gate_up_scale=16 / (math.sqrt(R) if use_rslora else R)
    )
    assert_same_tensors(peft_merged(tmp_path / "base", tmp_path / "fused", torch.bfloat16), want)


def test_key_layouts_round_trip_and_peft_on_transformers_5_needs_its_own_naming(tmp_path):
    model, model_class = qwen2_vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "qkv"])
        ).save_pretrained(tmp_path / "adapter")
    result = cli_run(
        "convert", tmp_path / "adapter", tmp_path / "legacy", "--key-layout", "base", "--base", tmp_path / "base"
    )
    assert "3 module paths renamed to the base checkpoint's naming" in result.output
    keys = sorted(load_file(tmp_path / "legacy" / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert "base_model.model.visual.blocks.0.attn.qkv.lora_A.weight" in keys
    cli_run(
        "convert", tmp_path / "legacy", tmp_path / "v5", "--key-layout", "transformers-5", "--base", tmp_path / "base"
    )
    same_tensors(tmp_path / "adapter", tmp_path / "v5")
    # both merge alike here; PEFT 0.21.2 on transformers 5.25 loads only the in-memory naming (measured)
    cli_run("merge", tmp_path / "base", tmp_path / "legacy", tmp_path / "out")
    assert_same_tensors(
        read_folder(tmp_path / "out"),
        peft_merged(tmp_path / "base", tmp_path / "adapter", torch.float32, model_class=model_class),
    )
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(model_class.from_pretrained(tmp_path / "base"), tmp_path / "legacy")
    assert any("missing adapter keys" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--expert-layout", "fused"), "--expert-layout and --key-layout need --base BASE"),
        (("--expert-layout", "fused", "--base", "B", "--target", "vllm"), "rewrite the layout only"),
    ],
)
def test_layout_options_are_checked(tmp_path, args, message):
    from helpers import ADAPTER

    args = [str(tmp_path) if a == "B" else a for a in args]
    assert message in cli_run("convert", ADAPTER, tmp_path / "out", *args, code=2).output


def test_an_expert_layout_for_a_model_without_experts_is_refused(tmp_path):
    from helpers import ADAPTER, BASE

    line = cli_run("convert", ADAPTER, tmp_path / "out", "--expert-layout", "fused", "--base", BASE, code=1).output
    assert "model_type 'llama' is not an MoE family whose expert layouts are known here" in line


# --- every module keeps its scale, by PEFT's own pattern matching (issue 36, items 2-4) -----------------------------


def peft_scales(folder: Path) -> dict[str, float]:
    """Each LoRA module's scale as PEFT 0.21.2 resolves it (peft.utils.other.get_pattern_key on the saved config)."""
    from peft.utils.other import get_pattern_key

    config = json.loads((folder / "adapter_config.json").read_text())
    scales = {}
    for key in load_file(folder / "adapter_model.safetensors"):
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0].replace(".base_layer", "")
        r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), name), config["r"])
        alpha = config["alpha_pattern"].get(
            get_pattern_key(config["alpha_pattern"].keys(), name), config["lora_alpha"]
        )
        scales[name] = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    return scales


def test_key_layout_base_keeps_pattern_scales_under_the_new_names(tmp_path):
    """Pattern keys in the in-memory naming would match nothing once the modules are renamed (PEFT then gave
    layer 0's q_proj alpha 8 instead of 32)."""
    model, model_class = qwen2_vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                init_lora_weights=False,
                target_modules=["q_proj", "qkv"],
                alpha_pattern={"model.language_model.layers.0.self_attn.q_proj": 32},
            ),
        ).save_pretrained(tmp_path / "adapter")
    cli_run("convert", tmp_path / "adapter", tmp_path / "legacy", "--key-layout", "base", "--base", tmp_path / "base")
    old, new = peft_scales(tmp_path / "adapter"), peft_scales(tmp_path / "legacy")
    assert old["model.language_model.layers.0.self_attn.q_proj"] == 8
    assert new["model.layers.0.self_attn.q_proj"] == 8 and new["model.layers.1.self_attn.q_proj"] == 2
    renamed = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v for k, v in old.items()
    }
    assert new == renamed


def test_per_expert_layout_keeps_the_alpha_pattern_of_modules_it_does_not_rewrite(tmp_path):
    """A shared expert's `down_proj` alpha is not the fused experts' one: it was dropped (scale 4 instead of 12)."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen2MoeConfig(
            vocab_size=64,
            hidden_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            intermediate_size=48,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            num_experts=4,
            num_experts_per_tok=2,
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            init_lora_weights=False,
            target_modules=["shared_expert.down_proj"],
            alpha_pattern={"shared_expert.down_proj": 24},
            target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
        get_peft_model(model, config).save_pretrained(tmp_path / "fused")
    cli_run(
        "convert", tmp_path / "fused", tmp_path / "per", "--expert-layout", "per-expert", "--base", tmp_path / "base"
    )
    scales = peft_scales(tmp_path / "per")
    assert scales["model.layers.0.mlp.shared_expert.down_proj"] == 12
    assert scales["model.layers.0.mlp.experts.3.down_proj"] == 4
    cli_run("merge", tmp_path / "base", tmp_path / "per", tmp_path / "out", "--dtype", "bf16")
    assert_same_tensors(
        read_folder(tmp_path / "out"), peft_merged(tmp_path / "base", tmp_path / "fused", torch.bfloat16)
    )


def test_a_per_expert_adapter_missing_an_expert_is_not_fused_one_expert_short(tmp_path):
    """Fusing 3 of 4 experts wrote a fused adapter with 3 experts that neither merge nor PEFT loads."""
    model = moe_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
    per = v4_adapter(tmp_path / "v4", "mixtral", use_rslora=True)
    tensors = load_file(per / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if ".experts.3." not in k}, per / "adapter_model.safetensors")
    line = cli_run(
        "convert", per, tmp_path / "fused", "--expert-layout", "fused", "--base", tmp_path / "base", code=1
    ).output
    assert "needs a LoRA on every expert's part (4 experts x 2)" in line and "expert 3 first" in line
    assert not (tmp_path / "fused").exists()
