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
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig, PeftModel, get_peft_model
from peft_oracle import assert_same_tensors, read_folder
from safetensors.torch import save_file

E, H, I, R = 4, 64, 96, 8  # experts, hidden, expert intermediate, rank: large enough for real matmul kernels


def moe_model(kind: str):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if kind == "mixtral":
        config = MixtralConfig(vocab_size=64, hidden_size=H, intermediate_size=I, num_attention_heads=4,
                               num_key_value_heads=2, num_hidden_layers=2, num_local_experts=E, num_experts_per_tok=2)
    else:
        config = Qwen3MoeConfig(vocab_size=64, hidden_size=H, moe_intermediate_size=I, intermediate_size=128,
                                num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, num_experts=E,
                                num_experts_per_tok=2, head_dim=16)
    return AutoModelForCausalLM.from_config(config)


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype, *, fix_gate_up_scale: float | None = None,
                model_class=None) -> dict[str, torch.Tensor]:
    """PEFT's merged checkpoint, as `save_pretrained` writes it (optionally with the converted gate_up's scale set)."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (model_class or AutoModelForCausalLM).from_pretrained(base, dtype=dtype)
        peft_model = PeftModel.from_pretrained(model, adapter)
        if fix_gate_up_scale is not None:
            for module in peft_model.modules():
                if getattr(module, "parameter_name", None) == "gate_up_proj":
                    module.scaling["default"] = fix_gate_up_scale
        out = base.parent / f"peft-{adapter.name}-{str(dtype)[6:]}"
        peft_model.merge_and_unload().save_pretrained(out)
    return read_folder(out)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """A checkpoint saved the ordinary way (per expert on disk) and its model type."""
    folder = tmp_path_factory.mktemp(request.param)
    model = moe_model(request.param)
    model.save_pretrained(folder / "base")
    return request.param, folder / "base", model


def per_expert_names(kind: str) -> dict[str, str]:
    return {"gate": "w1", "up": "w3", "down": "w2"} if kind == "mixtral" else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def v4_adapter(folder: Path, kind: str, use_rslora: bool) -> Path:
    """An adapter as PEFT saved it with transformers 4: LoRA on each expert's Linear, named as on disk."""
    torch.manual_seed(1)
    container = "block_sparse_moe" if kind == "mixtral" else "mlp"
    names = per_expert_names(kind)
    tensors = {}
    for layer in range(2):
        for e in range(E):
            for role, name in names.items():
                out, in_ = (H, I) if role == "down" else (I, H)
                path = f"base_model.model.model.layers.{layer}.{container}.experts.{e}.{name}"
                tensors[f"{path}.lora_A.weight"] = torch.randn(R, in_) * 0.1
                tensors[f"{path}.lora_B.weight"] = torch.randn(out, R) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 16, "use_rslora": use_rslora,
        "target_modules": sorted(names.values())}))
    return folder


@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_fused_adapter_merges_into_the_per_expert_checkpoint_it_was_trained_on(moe, tmp_path, use_rslora, dtype):
    kind, base, model = moe
    config = LoraConfig(r=R, lora_alpha=16, use_rslora=use_rslora, init_lora_weights=False,
                        target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(moe_model(kind), config).save_pretrained(tmp_path / "adapter")
    flag = "bf16" if dtype == torch.bfloat16 else "fp32"
    result = cli_run("merge", base, tmp_path / "adapter", tmp_path / "out", "--dtype", flag)
    assert "note: fused expert LoRA (target_parameters) applied to the checkpoint's per-expert tensors" in result.output
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
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              fused / "model.safetensors", metadata={"format": "pt"})
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
    tensors = {k: (v[: (E - 1) * R] if "lora_A" in k else v[:, : (E - 1) * R]).contiguous() for k, v in tensors.items()}
    save_file(tensors, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    line = cli_run("merge", base, tmp_path / "adapter", tmp_path / "out", code=1).output
    assert "the adapter's factors hold 3 experts, the checkpoint has more" in line and not (tmp_path / "out").exists()


# --- multimodal: the language model and the vision tower under other names -----------------------------------


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision,
                                                         bos_token_id=1, eos_token_id=2)), Qwen2VLForConditionalGeneration


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4),
                         text_config=LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2), image_token_index=3)
    return LlavaForConditionalGeneration(config), LlavaForConditionalGeneration


@pytest.mark.parametrize(("make", "targets", "renamed"), [
    (qwen2_vl, ["q_proj", "v_proj", "qkv", "lm_head"], "model.language_model.layers.0.self_attn.q_proj.weight -> "
                                                       "model.layers.0.self_attn.q_proj.weight"),
    (llava, ["q_proj", "v_proj", "linear_1", "lm_head"], "model.language_model.layers.0.self_attn.q_proj.weight -> "
                                                         "language_model.model.layers.0.self_attn.q_proj.weight"),
], ids=["qwen2_vl", "llava"])
@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
def test_a_multimodal_adapter_merges_into_the_checkpoint_it_was_trained_on(tmp_path, make, targets, renamed, use_rslora):
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
