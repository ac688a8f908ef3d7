"""MoE and multimodal adapters from either transformers layout merge into the checkpoint they were trained on,
bit for bit PEFT's merge (transformers 5 in memory, PEFT's conversion where it has one), saved as PEFT saves it.

The ordinary route is the test: the model from transformers, its checkpoint from `save_pretrained` (the legacy
layout: experts per expert, the language model at `model.`), the adapter from PEFT (the in-memory names: fused
experts, `model.language_model.`), the oracle `PeftModel.from_pretrained(...).merge_and_unload().save_pretrained()`.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import cli_run
from layout_models import E, R, llava, moe_model, peft_merged, qwen2_vl, v4_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from peft_oracle import assert_same_tensors, read_folder
from safetensors.torch import save_file


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """A checkpoint saved the ordinary way (per expert on disk) and its model type."""
    folder = tmp_path_factory.mktemp(request.param)
    model = moe_model(request.param)
    model.save_pretrained(folder / "base")
    return request.param, folder / "base", model


@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_fused_adapter_merges_into_the_per_expert_checkpoint_it_was_trained_on(moe, tmp_path, use_rslora, dtype):
    kind, base, model = moe
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
        get_peft_model(moe_model(kind), config).save_pretrained(tmp_path / "adapter")
    flag = "bf16" if dtype == torch.bfloat16 else "fp32"
    result = cli_run("merge", base, tmp_path / "adapter", tmp_path / "out", "--dtype", flag)
    assert (
        "note: fused expert LoRA (target_parameters) applied to the checkpoint's per-expert tensors" in result.output
    )
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged(base, tmp_path / "adapter", dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_transformers_4_per_expert_adapter_merges_as_peft_converts_it(moe, tmp_path, dtype):
    kind, base, _ = moe
    adapter = v4_adapter(tmp_path / "v4", kind, use_rslora=False)
    flag = "bf16" if dtype == torch.bfloat16 else "fp32"
    cli_run("merge", base, adapter, tmp_path / "out", "--dtype", flag)
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged(base, adapter, dtype))


def test_peft_converts_a_per_expert_rslora_adapter_with_sqrt_2_too_strong_gate_and_up(moe, tmp_path):
    """PEFT 0.21.2 fuses gate and up into rank 2r with alpha 2*alpha: under rsLoRA that is sqrt(2) x the trained
    scale. rslora-tools keeps alpha/sqrt(r): PEFT's merge with that scale set is what it writes, bit for bit."""
    kind, base, _ = moe
    adapter = v4_adapter(tmp_path / "v4", kind, use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoModelForCausalLM

        converted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        scales = {m.parameter_name: m.scaling["default"] for m in converted.modules() if hasattr(m, "parameter_name")}
    assert scales["gate_up_proj"] == pytest.approx(math.sqrt(2) * 16 / math.sqrt(R))  # PEFT's
    assert scales["down_proj"] == pytest.approx(16 / math.sqrt(R))
    cli_run("merge", base, adapter, tmp_path / "out", "--dtype", "bf16")
    want = peft_merged(base, adapter, torch.bfloat16, fix_gate_up_scale=16 / math.sqrt(R))
    assert_same_tensors(read_folder(tmp_path / "out"), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_per_expert_adapter_merges_into_a_fused_checkpoint(moe, tmp_path, dtype):
    """A checkpoint that stores experts fused (as the model holds them); each module changes its expert's slice."""
    kind, base, _ = moe
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        fused / "model.safetensors",
        metadata={"format": "pt"},
    )
    (fused / "config.json").write_text((base / "config.json").read_text())
    adapter = v4_adapter(tmp_path / "v4", kind, use_rslora=False)
    result = cli_run("merge", fused, adapter, tmp_path / "out")
    assert "note: per-expert LoRA applied to the checkpoint's fused expert parameters" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
        want = merged.merge_and_unload().state_dict()
    assert_same_tensors(read_folder(tmp_path / "out"), dict(want))


def test_a_fused_adapter_whose_expert_count_is_not_the_checkpoints_is_refused(moe, tmp_path):
    kind, base, _ = moe
    config = LoraConfig(r=R, lora_alpha=16, init_lora_weights=False, target_parameters=["experts.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(moe_model(kind), config).save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors = {
        k: (v[: (E - 1) * R] if "lora_A" in k else v[:, : (E - 1) * R]).contiguous() for k, v in tensors.items()
    }
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    line = cli_run("merge", base, tmp_path / "adapter", tmp_path / "out", code=1).output
    assert "the adapter's factors hold 3 experts, the checkpoint has more" in line and not (tmp_path / "out").exists()


# --- multimodal: the language model and the vision tower under other names -----------------------------------


@pytest.mark.parametrize(
    ("make", "targets", "renamed"),
    [
        (
            qwen2_vl,
            ["q_proj", "v_proj", "qkv", "lm_head"],
            "model.language_model.layers.0.self_attn.q_proj.weight -> model.layers.0.self_attn.q_proj.weight",
        ),
        (
            llava,
            ["q_proj", "v_proj", "linear_1", "lm_head"],
            "model.language_model.layers.0.self_attn.q_proj.weight -> "
            "language_model.model.layers.0.self_attn.q_proj.weight",
        ),
    ],
    ids=["qwen2_vl", "llava"],
)
@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
def test_a_multimodal_adapter_merges_into_the_checkpoint_it_was_trained_on(
    tmp_path, make, targets, renamed, use_rslora
):
    model, model_class = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        config = LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora, init_lora_weights=False, target_modules=targets)
        get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert keys["target_modules"]
    result = cli_run("merge", tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert f"were mapped to the checkpoint's (e.g. {renamed})" in result.output
    want = peft_merged(tmp_path / "base", tmp_path / "adapter", torch.float32, model_class=model_class)
    assert_same_tensors(read_folder(tmp_path / "out"), want)
