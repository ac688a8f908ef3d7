"""Tiny MoE and multimodal models built by transformers, and adapters in each expert layout, for the layout tests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from peft_oracle import read_folder
from safetensors.torch import save_file

E, H, I, R = 4, 64, 96, 8  # noqa: E741  experts, hidden, expert intermediate, rank: large enough for real matmul kernels


def moe_model(kind: str):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(0)
    if kind == "mixtral":
        config = MixtralConfig(
            vocab_size=64,
            hidden_size=H,
            intermediate_size=I,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            num_local_experts=E,
            num_experts_per_tok=2,
        )
    else:
        config = Qwen3MoeConfig(
            vocab_size=64,
            hidden_size=H,
            moe_intermediate_size=I,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            num_experts=E,
            num_experts_per_tok=2,
            head_dim=16,
        )
    return AutoModelForCausalLM.from_config(config)


def peft_merged(
    base: Path, adapter: Path, dtype: torch.dtype, *, fix_gate_up_scale: float | None = None, model_class=None
) -> dict[str, torch.Tensor]:
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


def per_expert_names(kind: str) -> dict[str, str]:
    return (
        {"gate": "w1", "up": "w3", "down": "w2"}
        if kind == "mixtral"
        else {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    )


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
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": R,
                "lora_alpha": 16,
                "use_rslora": use_rslora,
                "target_modules": sorted(names.values()),
            }
        )
    )
    return folder


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        mlp_ratio=2,
        in_channels=3,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
    )
    return Qwen2VLForConditionalGeneration(
        Qwen2VLConfig(text_config=text, vision_config=vision, bos_token_id=1, eos_token_id=2)
    ), Qwen2VLForConditionalGeneration


def llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
        ),
        text_config=LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_index=3,
    )
    return LlavaForConditionalGeneration(config), LlavaForConditionalGeneration


def gpt_oss():
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        num_local_experts=E,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )
    return AutoModelForCausalLM.from_config(config)
