"""What a llama.cpp GGUF LoRA file holds for an adapter on a base: architecture, tensor names, one alpha or scales
folded.

llama.cpp applies `alpha / rank` per tensor (rank from lora_b's shape, one alpha per file) and
ignores use_rslora and the patterns (docs/runtimes.md). When one alpha reproduces every module's
scale in float32, it is written as is; otherwise alpha is 0 (scale 1) and each scale is folded
into the weights, kept in float32. Tensor names follow llama.cpp's converters (gguf's name map,
sized from the checkpoint's layers). `plan_gguf` decides and checks (a dry run stops there);
execute/gguf.py writes the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.module_scales import ModuleEntry
from ..adapter.runtimes import FEATURE_NAMES, adapter_features
from ..errors import InputError, MismatchError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint
from ..hub.refs import parse_ref

# config.json model_type -> (gguf MODEL_ARCH member, Q/K rows permuted like convert_hf_to_gguf's LlamaModel)
ARCHITECTURES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False),
    "gemma2": ("GEMMA2", False),
    "gemma3": ("GEMMA3", False),
    "gemma3_text": ("GEMMA3", False),
    "phi3": ("PHI3", False),
}


@dataclass
class GgufPlan:
    """What the GGUF file holds: the architecture, one alpha, the scales folded (if any), each tensor's name."""

    architecture: str  # llama.cpp's architecture name
    alpha: float
    factors: dict[str, float]  # module name -> scale folded into its lora_b (empty: alpha does it)
    tensors: list[tuple[ModuleEntry, str, tuple[int, ...]]] = field(
        default_factory=list
    )  # entry, GGUF name, base shape
    config: dict[str, Any] = field(default_factory=dict)
    permute_qk: bool = False
    name: str = ""  # general.name
    base_model: str | None = None  # the base the adapter records (general.base_model.0.*)
    tags: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        return f"GGUF LoRA for llama.cpp ({self.architecture}), adapter.lora.alpha = {self.alpha:g}" + (
            "; scales folded into the weights" if self.factors else "; weights unchanged"
        )


def gguf_module() -> Any:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise InputError("writing GGUF needs the 'gguf' package: pip install gguf") from e
    return gguf


def plan_gguf(adapter: Adapter, entries: list[ModuleEntry], checkpoint: Checkpoint) -> GgufPlan:
    """Check that llama.cpp can hold this adapter for this base, and name every tensor."""
    gguf = gguf_module()
    config = checkpoint.config or {}
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedAdapterError(
            f"{checkpoint.folder}: model_type {model_type!r} is not one rslora-tools maps to llama.cpp tensor names "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); write a PEFT folder with [[target]] llama.cpp and use "
            "llama.cpp's convert_lora_to_gguf.py"
        )
    arch_member, permute_qk = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_member)
    _refuse_unsupported(adapter, entries)
    _refuse_resized_vocabulary(adapter, checkpoint)
    _refuse_tied_embedding(adapter, checkpoint)
    names = gguf.get_tensor_name_map(arch, _block_count(checkpoint))
    alpha, factors = _alpha_and_factors(entries)
    tags = ("lora", "rslora") if adapter.config.use_rslora else ("lora",)
    plan = GgufPlan(
        gguf.MODEL_ARCH_NAMES[arch],
        alpha,
        factors,
        config=config,
        permute_qk=permute_qk,
        name=adapter.path.name,
        base_model=adapter.config.base_model_name_or_path,
        tags=tags,
    )
    for e in entries:
        hf_name = f"{e.module.name}.weight"
        if hf_name not in checkpoint.weight_map:
            raise MismatchError(
                f"{adapter.path}: module {e.module.name!r} has no weight {hf_name!r} in the base {checkpoint.folder}"
            )
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedAdapterError(
                f"module {e.module.name!r} has no llama.cpp tensor in the {model_type} architecture"
            )
        plan.tensors.append((e, gguf_name, checkpoint.info(hf_name).shape))
    if permute_qk:
        _check_heads(plan, checkpoint)
    return plan


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _block_count(checkpoint: Checkpoint) -> int:
    """The number of transformer blocks, from the checkpoint's tensors (gguf's name map is built for that many);
    config.json's num_hidden_layers must agree where it is given."""
    found = {int(m.group(1)) for name in checkpoint.weight_map if (m := _LAYER.search(name))}
    blocks = max(found) + 1 if found else 0
    stated = (checkpoint.config or {}).get("num_hidden_layers")
    if stated is not None and (type(stated) is not int or stated != blocks):
        raise InputError(
            f"{checkpoint.folder / 'config.json'}: num_hidden_layers is {stated!r}, but the checkpoint's "
            f"tensors have {blocks} layers"
        )
    return blocks


def head_counts(config: dict[str, Any]) -> tuple[Any, Any]:
    """num_attention_heads and num_key_value_heads (the former when the latter is not given), as config.json has
    them."""
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads")
    return heads, heads if kv is None else kv


def _check_heads(plan: GgufPlan, checkpoint: Checkpoint) -> None:
    """convert_hf_to_gguf's Q/K row permutation needs head counts that split those rows into rotary halves."""
    where = checkpoint.folder / "config.json"
    heads, kv = head_counts(plan.config)
    for key, value in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if type(value) is not int or value <= 0:
            raise InputError(f"{where}: {key} is {value!r}; a positive integer is needed to lay out the Q and K rows")
    for _, gguf_name, shape in plan.tensors:
        count = heads if gguf_name.endswith("attn_q.weight") else kv if gguf_name.endswith("attn_k.weight") else None
        if count is not None and shape[0] % (2 * count):
            raise InputError(
                f"{where}: {shape[0]} rows of {gguf_name} do not split into {count} heads of two "
                "rotary halves; num_attention_heads / num_key_value_heads do not fit the weights"
            )


def _refuse_unsupported(adapter: Adapter, entries: list[ModuleEntry]) -> None:
    unsupported = ("dora", "modules_to_save", "trainable_tokens")
    problems = [FEATURE_NAMES[f] for f in adapter_features(adapter) if f in unsupported]
    if any(e.module.bias_key for e in entries):
        problems.append("lora_bias")
    if adapter.config.fan_in_fan_out:
        problems.append("fan_in_fan_out (Conv1D) layers")
    if any(e.wrapping not in ("module", "embedding") or len(adapter.shapes[e.module.a_key]) != 2 for e in entries):
        problems.append("convolution, MultiheadAttention or target_parameters LoRA")
    if problems:
        raise UnsupportedAdapterError(
            f"llama.cpp LoRA files cannot hold {', '.join(problems)}; merge the adapter instead "
            "([[rslora_tools.merge(BASE, ADAPTER, OUT)]]) and convert the merged model to GGUF"
        )


def is_repo_id(name: str) -> bool:
    try:
        return parse_ref(name) is not None and not Path(name).exists()
    except InputError:
        return False


TIED_EMBEDDING_REASON = (
    "it uses token_embd as the output matrix too (tied embeddings) and cannot apply an embedding LoRA there"
)


def tied_embedding_problem(adapter: Adapter, checkpoint: Checkpoint) -> str | None:
    """Why llama.cpp cannot take this adapter's embedding LoRA on this base, or None.

    A GGUF of a model with tied embeddings (or without an lm_head tensor) has no output matrix of
    its own: llama.cpp reads token_embd for it, and refuses a LoRA on token_embd (tested).
    """
    config = checkpoint.config or {}
    head = any(name.endswith("lm_head.weight") for name in checkpoint.weight_map)
    tied = config.get("tie_word_embeddings") is True or not head
    embedding = [m.name for m in adapter.lora_modules if m.embedding]
    return f"{embedding[0]!r}: {TIED_EMBEDDING_REASON}" if tied and embedding else None


def _refuse_tied_embedding(adapter: Adapter, checkpoint: Checkpoint) -> None:
    problem = tied_embedding_problem(adapter, checkpoint)
    if problem:
        raise UnsupportedAdapterError(
            f"{adapter.path}: LoRA on the embedding {problem}; merge the adapter instead "
            "([[rslora_tools.merge(BASE, ADAPTER, OUT)]]) and convert the merged model to GGUF"
        )


def _refuse_resized_vocabulary(adapter: Adapter, checkpoint: Checkpoint) -> None:
    for path, key in adapter.replacements.items():  # saved base layers (PEFT's save_embedding_layers)
        if path in checkpoint.weight_map and checkpoint.info(path).shape != adapter.shapes[key]:
            raise UnsupportedAdapterError(
                f"{adapter.path}: the adapter saves {path!r} with shape {list(adapter.shapes[key])}, the base has "
                f"{list(checkpoint.info(path).shape)} (a resized vocabulary); llama.cpp LoRA files cannot change it, "
                "merge the adapter instead"
            )


def _alpha_and_factors(entries: list[ModuleEntry]) -> tuple[float, dict[str, float]]:
    """One float32 alpha with fp32(alpha / rank) == fp32(scale) for every tensor, else alpha 0 and baked scales."""
    import torch

    if not entries:
        return 0.0, {}
    candidate = torch.tensor(entries[0].scale.scale * entries[0].shape_rank, dtype=torch.float32)
    if all(bool(candidate / e.shape_rank == torch.tensor(e.scale.scale, dtype=torch.float32)) for e in entries):
        return float(candidate), {}
    return 0.0, {e.module.name: e.scale.scale for e in entries}
