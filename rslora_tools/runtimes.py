"""Stage 2, adapter and scales: what each serving runtime does with an adapter's scale fields.

The facts and their sources are in docs/runtimes.md. `runtime_scale` is the scale a runtime
applies to one module, given the config it reads; the rules are kept here and nowhere else, so
`inspect` and `convert --target` agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapter import Adapter
from .module_scales import ModuleEntry
from .scaling import scale, scale_in


@dataclass(frozen=True)
class Runtime:
    name: str  # the --target value
    label: str
    honours_rslora: bool  # applies alpha/sqrt(r) when use_rslora is true
    honours_patterns: bool  # applies rank_pattern / alpha_pattern per module
    rank_from_shape: bool = False  # takes each tensor's rank from B's shape, one alpha per file
    lacks: dict[str, str] = field(default_factory=dict)  # adapter feature -> what the runtime does with it


RUNTIMES: dict[str, Runtime] = {
    r.name: r
    for r in (
        Runtime("peft", "PEFT", True, True),
        Runtime("vllm", "vLLM", True, False, lacks={
            "dora": "rejects DoRA adapters", "modules_to_save": "rejects adapters with modules_to_save"}),
        Runtime("tgi", "TGI", True, False, lacks={
            "dora": "ignores DoRA magnitude vectors (it would serve a different model)",
            "modules_to_save": "ignores modules_to_save (it would serve a different model)",
            "embedding": "does not support embedding LoRA"}),
        Runtime("lorax", "LoRAX", True, False, lacks={
            "dora": "does not support DoRA", "modules_to_save": "does not support modules_to_save",
            "embedding": "does not support embedding LoRA"}),
        Runtime("sglang", "SGLang", False, False),
        Runtime("llama.cpp", "llama.cpp", False, False, rank_from_shape=True, lacks={
            "dora": "cannot convert DoRA adapters", "modules_to_save": "cannot convert modules_to_save",
            "trainable_tokens": "cannot convert trainable tokens"}),
    )
}

FEATURE_NAMES = {
    "dora": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (full replaced tensors)",
    "embedding": "embedding LoRA",
    "trainable_tokens": "trainable tokens",
}


def adapter_features(adapter: Adapter) -> list[str]:
    """The features of an adapter that some runtimes lack, in FEATURE_NAMES order."""
    present = {
        "dora": adapter.config.use_dora,
        "modules_to_save": bool(adapter.config.modules_to_save) or any(
            ".modules_to_save." in key for key in adapter.replacements.values()),
        "embedding": any(m.embedding for m in adapter.lora_modules),
        "trainable_tokens": bool(adapter.token_deltas),
    }
    return [f for f in FEATURE_NAMES if present[f]]


def runtime_scale(runtime: Runtime, fields: dict[str, Any], entry: ModuleEntry) -> float:
    """The scale `runtime` applies to one module when it reads the config `fields`."""
    rslora = bool(fields.get("use_rslora")) and runtime.honours_rslora
    if runtime.honours_patterns:
        return scale_in(fields, entry.name).scale
    if runtime.rank_from_shape:
        return scale(fields["lora_alpha"], entry.shape_rank, rslora)
    return scale(fields["lora_alpha"], fields["r"], rslora)


def missing_features(runtime: Runtime, adapter: Adapter) -> list[str]:
    """Why `runtime` cannot serve this adapter at all (empty when it can)."""
    return [f"it {runtime.lacks[f]}" for f in adapter_features(adapter) if f in runtime.lacks]
