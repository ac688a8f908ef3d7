"""Build tiny models and adapters with transformers + PEFT, and PEFT's own merge as the oracle."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=64,
)


def make_llama(
    path: Path,
    dtype: torch.dtype = torch.float32,
    *,
    tie: bool = False,
    max_shard_size: str | None = None,
    seed: int = 0,
    **overrides,
) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides}, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def make_gpt2(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, n_embd: int = 32) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=n_embd, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(path)
    return path


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def perturb_trainable(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every trainable parameter (LoRA A/B, magnitudes, saved modules, tokens) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
                p.add_(noise.to(p.dtype))


def make_adapter(
    base: Path | torch.nn.Module,
    out: Path,
    config,
    *,
    prepare: Callable[[torch.nn.Module], None] | None = None,
    after: Callable[[torch.nn.Module], None] | None = None,
    save_dtype: torch.dtype | None = None,
    seed: int = 1,
    **save_kwargs,
) -> Path:
    """Wrap a model with PEFT, randomize the trainable parameters, save the adapter."""
    from peft import get_peft_model

    model = load_causal_lm(base) if isinstance(base, Path) else copy.deepcopy(base)
    if prepare is not None:
        prepare(model)
    peft_model = get_peft_model(model, config)
    perturb_trainable(peft_model, seed=seed)
    if after is not None:
        after(peft_model)
    if save_dtype is not None:
        peft_model.to(save_dtype)
    peft_model.save_pretrained(out, **save_kwargs)
    return out


def peft_merged_state_dict(base: Path | torch.nn.Module, adapter: Path, prepare=None) -> dict[str, torch.Tensor]:
    """PEFT's reference: PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()."""
    from peft import PeftModel

    model = load_causal_lm(base) if isinstance(base, Path) else copy.deepcopy(base)
    if prepare is not None:
        prepare(model)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return unique_tensors(merged.state_dict())


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied aliases (a tensor sharing storage with an earlier one), as transformers' save does."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().clone()
    return out


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                assert k not in out, f"{k} appears in two shards"
                out[k] = st.get_tensor(k)
    return out


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, skip=()) -> None:
    """torch.equal per tensor, same dtype, same key set (keys in `skip` are ignored)."""
    expected = {k: v for k, v in expected.items() if k not in skip}
    actual_keys = {k for k in actual if k not in skip}
    assert actual_keys == set(expected), (
        f"keys differ: extra {actual_keys - set(expected)}, missing {set(expected) - actual_keys}"
    )
    bad = []
    for k, v in expected.items():
        a = actual[k]
        if a.dtype != v.dtype or a.shape != v.shape or not torch.equal(a, v):
            diff = (a.float() - v.float()).abs().max().item() if a.shape == v.shape else "shape"
            bad.append(f"{k}: {a.dtype}{tuple(a.shape)} vs {v.dtype}{tuple(v.shape)}, max diff {diff}")
    assert not bad, "tensors differ from PEFT's merge:\n" + "\n".join(bad)


def save_module(module: torch.nn.Module, folder: Path) -> Path:
    """Save a plain torch module as a one-file safetensors checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in module.state_dict().items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    return folder


def make_init_variant(base: Path, folder: Path, config, *, vocab: int = 64, std: float = 0.01) -> Path:
    """A PiSSA/OLoRA/CorDA/LoRA-GA adapter built by PEFT from `config` (its init_lora_weights): folder/init right
    after initialisation, folder/trained after a perturbation ("training"), folder/residual the base PEFT trained on
    (the wrapped model with the adapter removed). CorDA and LoRA-GA run the model on a few random token batches."""
    from peft import get_peft_model

    model = load_causal_lm(base)
    batch = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    init = config.init_lora_weights
    if init == "corda":
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        config.corda_config = config.corda_config or CordaConfig()
        preprocess_corda(model, config, run_model=lambda: [model(batch[i : i + 1]) for i in range(len(batch))])
    elif init == "lora_ga":
        from peft.tuners.lora.config import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config.lora_ga_config = config.lora_ga_config or LoraGAConfig()

        def train_step():
            model(batch, labels=batch).loss.backward()

        preprocess_loraga(model, config, train_step=train_step)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder / "init")
    perturb_trainable(peft_model, seed=3, std=std)
    peft_model.save_pretrained(folder / "trained")
    peft_model.unload().save_pretrained(folder / "residual")
    return folder


class TwoAttentions(torch.nn.Module):
    """Two torch.nn.MultiheadAttention modules in a row (PEFT's MHA LoRA: in_proj and out_proj, patterns by name)."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=True)
        self.other = torch.nn.MultiheadAttention(32, 2, batch_first=True)

    def forward(self, x):
        return self.other(*(self.mha(x, x, x)[0],) * 3)[0]
