"""A tiny random model of every model type the installed transformers ships, built from its own config class, for
the architecture matrix (tests/models/test_every_architecture.py).

The config is the class's defaults with every size field shrunk (`SIZES`), sub-configs too; token ids moved into
the tiny vocabulary; `QUIRKS` holds what a few model types need on top (fields that must agree with each other). A
model type that does not build this way is skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

SIZES = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    moe_intermediate_size=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    shared_expert_intermediate_size=16,
    head_dim=8,
    max_position_embeddings=64,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    d_ff=48,
    d_kv=8,
    num_layers=2,
    num_heads=4,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=64,
    ffn_dim=48,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_decoder_layers=2,
    embed_dim=32,
    depth=1,
    emb_dim=32,
    dim=32,
    hidden_dim=48,
    n_layers=2,
    n_heads=4,
    entity_vocab_size=64,
    entity_emb_size=32,
    d_latents=32,
    num_latents=8,
    num_self_attends_per_block=1,
    encoder_hidden_size=32,
    decoder_hidden_size=32,
    projection_dim=32,
    text_hidden_size=32,
)
TOKENS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "cls_token_id",
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "audio_token_id",
    "boi_token_id",
    "eoi_token_id",
    "mask_token_id",
)

# model type -> config fields set after the shrinking (the values must agree with SIZES)
QUIRKS: dict[str, dict] = {
    "bamba": dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, mamba_n_groups=1),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, mamba_n_groups=1),
    "mamba2": dict(num_heads=8, head_dim=8, expand=2, n_groups=1),
    "falcon_h1": dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, mamba_n_groups=1),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=8, expand=2, n_groups=1),
    "zaya": dict(num_experts_per_tok=1),
    "kolibri1_1": dict(head_dim=16, num_attention_heads=2, num_key_value_heads=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "reformer": dict(is_decoder=True),
    "hunyuan_v1_dense": dict(head_dim=8),
    "hunyuan_v1_moe": dict(head_dim=8),
    "ministral": dict(head_dim=8),
    "nemotron": dict(head_dim=8),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
}
PER_LAYER = ("layer_types", "layers_block_type")  # lists with one entry per layer


@dataclass(frozen=True)
class Row:
    """One model type of the matrix: the class it is built as, and the kind of model (for the report)."""

    model_type: str
    class_name: str
    kind: str  # "text", "vision-language", "encoder-decoder", "encoder"

    first: bool = True  # the model type's first class (a model type with a text and a multimodal class has two rows)

    @property
    def id(self) -> str:
        return self.model_type if self.first else f"{self.model_type}-{self.kind.split('-')[0]}"


MAPPINGS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "vision-language"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder-decoder"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder"),
)


def rows() -> list[Row]:
    """Every model type of the installed transformers that has a causal LM, image-text-to-text, seq2seq or masked
    LM class: a row for its first class, and one for its image-text-to-text class where that is another one (a
    vision-language model whose language model is its causal LM: Mllama, Llama 4, Qwen3.5)."""
    from transformers.models.auto import modeling_auto

    found: dict[str, list[Row]] = {}
    for mapping, kind in MAPPINGS:
        for model_type, names in getattr(modeling_auto, mapping).items():
            name = names[0] if isinstance(names, (list, tuple)) else names
            known = found.setdefault(model_type, [])
            if not known or (kind == "vision-language" and all(r.class_name != name for r in known)):
                known.append(Row(model_type, name, kind, first=not known))
    return sorted((r for rs in found.values() for r in rs), key=lambda r: (r.model_type, not r.first))


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _tiny_kwargs(cls, default, per_layer: bool = False) -> dict:
    from transformers import AutoConfig, PretrainedConfig

    fields = _fields(cls)
    kw = {
        k: v
        for k, v in SIZES.items()
        if k in fields
        and isinstance(getattr(default, k, None), int)
        and not isinstance(getattr(default, k, None), bool)
    }
    layers = kw.get("num_hidden_layers")
    for name in PER_LAYER:
        value = getattr(default, name, None)
        if per_layer and layers and name in fields and isinstance(value, list) and len(value) > layers:
            kinds = list(dict.fromkeys(value))  # one layer of each kind first (a hybrid keeps both), then in order
            kw[name] = (kinds + [v for v in value if v not in kinds[:layers]])[:layers]
    vocab = kw.get("vocab_size")
    for i, t in enumerate(TOKENS):
        value = getattr(default, t, None)
        if vocab and t in fields and isinstance(value, int) and value >= vocab:
            kw[t] = min(vocab - 1, 1 + i)
        elif vocab and t in fields and isinstance(value, list):
            kw[t] = [min(vocab - 1, 2 + j) for j in range(len(value))]
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        sub_default = getattr(default, name, None)
        if not isinstance(sub_default, PretrainedConfig):
            continue
        sub_kw = _tiny_kwargs(type(sub_default), sub_default, per_layer)
        if sub is AutoConfig or sub_default.model_type != getattr(sub, "model_type", sub_default.model_type):
            sub_kw["model_type"] = sub_default.model_type
        kw[name] = sub_kw
    return kw


def tiny_config(row: Row):
    """The class's own config class, with every size shrunk."""
    import transformers

    cls = getattr(transformers, row.class_name).config_class
    default = cls()
    try:
        return cls(**{**_tiny_kwargs(cls, default), **QUIRKS.get(row.model_type, {})})
    except Exception:  # noqa: BLE001 - then with the per-layer lists cut to the layers (one layer of each kind)
        return cls(**{**_tiny_kwargs(cls, default, per_layer=True), **QUIRKS.get(row.model_type, {})})


def tiny_model(row: Row, dtype):
    """The row's model, random, in `dtype`."""
    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return getattr(transformers, row.class_name)(tiny_config(row)).to(dtype)
