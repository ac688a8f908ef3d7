"""`inspect --runtime vllm[@VERSION]` on MoE and multimodal adapters: the expert and vision-tower modules that
release leaves out are errors (exit 1), the ones it applies only behind a startup flag are warnings. The facts are
read from vLLM's released sdists (docs/runtimes.md, "Experts and vision towers")."""

from __future__ import annotations

import json
import warnings

from helpers import cli_run
from layout_models import gpt_oss, moe_model, qwen2_vl
from peft import LoraConfig, get_peft_model


def save(model, config, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, config).save_pretrained(folder)
    return folder


def runtime_lints(adapter, *args, code=0):
    report = json.loads(cli_run("inspect", adapter, "--json", *args, code=code).stdout)
    return [(lint["level"], lint["message"]) for lint in report["lints"] if lint["code"] == "runtime-ignores"]


def test_vision_tower_lora_is_left_out_by_vllm_before_0_14_and_behind_a_flag_after(tmp_path):
    model, _ = qwen2_vl()
    adapter = save(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "qkv"]), tmp_path / "a")
    [(level, message)] = runtime_lints(adapter, "--runtime", "vllm@0.13.0", code=1)
    assert level == "error" and message.startswith(
        "vLLM 0.13.0 applies no LoRA to the vision tower or projector: 1 module would be left out (read: vllm"
    )
    [(level, message)] = runtime_lints(adapter, "--runtime", "vllm")
    assert level == "warning" and "only when started with its enable_tower_connector_lora option" in message
    assert (
        runtime_lints(
            save(qwen2_vl()[0], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "text-only"),
            "--runtime",
            "vllm@0.13.0",
        )
        == []
    )


def test_fused_experts_on_a_per_expert_vllm_model_fail_until_converted(tmp_path):
    model = moe_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
    fused = save(
        model,
        LoraConfig(r=8, lora_alpha=16, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        tmp_path / "fused",
    )
    base = ("--base", str(tmp_path / "base"))
    [(level, message)] = runtime_lints(fused, *base, "--runtime", "vllm", code=1)
    assert level == "error" and message.startswith(
        "vLLM 0.33.0 takes mixtral expert LoRA per expert, not as fused "
        "parameters (4 modules): convert it with --expert-layout per-expert"
    )
    cli_run("convert", fused, tmp_path / "per", "--expert-layout", "per-expert", *base)
    assert runtime_lints(tmp_path / "per", *base, "--runtime", "vllm") == []
    [(level, message)] = runtime_lints(tmp_path / "per", *base, "--runtime", "vllm@0.11.0", code=1)
    assert level == "error" and message.startswith(
        "vLLM 0.11.0 applies no LoRA to MoE experts: 24 modules would be left out"
    )


def test_per_expert_gpt_oss_lora_needs_the_fused_layout_or_a_flag(tmp_path):
    model = gpt_oss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
    base = ("--base", str(tmp_path / "base"))
    fused = save(
        model,
        LoraConfig(r=8, lora_alpha=16, target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        tmp_path / "fused",
    )
    assert runtime_lints(fused, *base, "--runtime", "vllm") == []
    cli_run("convert", fused, tmp_path / "per", "--expert-layout", "per-expert", *base)
    [(level, message)] = runtime_lints(tmp_path / "per", *base, "--runtime", "vllm@0.18.0", code=1)
    assert level == "error" and "takes gpt_oss expert LoRA as fused parameters, not per expert" in message
    [(level, message)] = runtime_lints(tmp_path / "per", *base, "--runtime", "vllm")
    assert level == "warning" and message.endswith(
        "convert it with --expert-layout fused or start vLLM with its enable_mixed_moe_lora_format option "
        "(read: vllm 0.12.0, 0.22.0 and 0.34.0 sdists, vllm/lora/model_manager.py (is_3d_moe_weight, "
        "enable_mixed_moe_lora_format))"
    )


def test_sglang_leaves_out_vision_towers_and_fused_experts(tmp_path):
    model, _ = qwen2_vl()
    adapter = save(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "qkv"]), tmp_path / "vl")
    [(level, message)] = runtime_lints(adapter, "--runtime", "sglang", code=1)
    assert level == "error" and message.startswith(
        "SGLang 0.5.23 applies LoRA to a vision-language model's language model only: 1 module would be left out"
    )
    fused = save(
        moe_model("mixtral"),
        LoraConfig(r=8, lora_alpha=16, target_parameters=["experts.down_proj"]),
        tmp_path / "fused",
    )
    [(level, message)] = runtime_lints(fused, "--runtime", "sglang", code=1)
    assert level == "error" and "not as PEFT's fused target_parameters (2 modules)" in message
