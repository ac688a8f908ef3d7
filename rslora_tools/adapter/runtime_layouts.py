"""Which parts of a model each runtime applies LoRA to: MoE experts (per expert or fused) and vision towers.

A runtime that loads an adapter and leaves its expert or vision-tower tensors out serves the base model there,
without a word. The facts, release by release, with the source each was read from, are in docs/runtimes.md
("Experts and vision towers"); they are kept here and nowhere else, so that `inspect --runtime` says them.
vLLM and SGLang are described; the other runtimes' LoRA support for experts and towers is not known here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .module_scales import ModuleEntry
from .runtimes import Runtime, version_key

Level = Literal["error", "warning"]

# Module path parts that belong to a multimodal model's vision (or audio) tower and its projector.
_TOWER = re.compile(
    r"(^|\.)(visual|vision_tower|vision_model|vision_encoder|audio_tower|multi_modal_projector|"
    r"mm_projector|vision_embed_tokens)(\.|$)"
)
_PER_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")

# vLLM's MoE models whose experts take LoRA in the fused (3D) layout: `is_3d_moe_weight = True` in
# vllm/model_executor/models (read in the 0.12.0 and 0.34.0 sdists; 0.34.0 adds qwen3_5, qwen3_omni_moe, interns1_pro).
_VLLM_FUSED_EXPERTS = {"gpt_oss": "0.12.0", "qwen3_vl_moe": "0.12.0"}
_VLLM_SOURCE = "read: vllm {} sdists, {}"
_SGLANG_SOURCE = "read: sglang 0.5.23 wheel, {}"


@dataclass(frozen=True)
class Ignored:
    """Adapter modules a runtime would not apply (error) or applies only when started with a flag (warning)."""

    level: Level
    message: str
    evidence: str


def tower_modules(entries: list[ModuleEntry]) -> list[ModuleEntry]:
    """The adapter's modules on a vision or audio tower or its projector."""
    return [e for e in entries if _TOWER.search(e.module.name)]


def expert_modules(entries: list[ModuleEntry]) -> tuple[list[ModuleEntry], list[ModuleEntry]]:
    """The adapter's MoE expert modules: (per-expert Linears, fused expert parameters)."""
    per_expert = [e for e in entries if _PER_EXPERT.search(e.module.name)]
    fused = [e for e in entries if e.wrapping == "param" and ".experts" in f".{e.module.name}"]
    return per_expert, fused


def ignored_by(rt: Runtime, version: str, entries: list[ModuleEntry], model_type: str | None) -> list[Ignored]:
    """What `rt` at `version` does not apply of this adapter (`model_type`: the base's, when known)."""
    if rt.name == "sglang":
        return _sglang(version, entries)
    if rt.name != "vllm":
        return []
    at = version_key(version)
    found = _vllm_towers(version, at, entries)
    per_expert, fused = expert_modules(entries)
    if not (per_expert or fused):
        return found
    experts = per_expert + fused
    if at < version_key("0.11.1"):
        found.append(
            Ignored(
                "error",
                f"vLLM {version} applies no LoRA to MoE experts: {_count(experts)} would be "
                "left out (experts take LoRA from 0.11.1)",
                _VLLM_SOURCE.format("0.11.0 and 0.11.1", "vllm/lora/layers (FusedMoEWithLoRA from 0.11.1)"),
            )
        )
        return found
    if model_type is None:
        return found
    since = _VLLM_FUSED_EXPERTS.get(model_type)
    wants_fused = since is not None and at >= version_key(since)
    if fused and not wants_fused:
        found.append(
            Ignored(
                "error",
                f"vLLM {version} takes {model_type} expert LoRA per expert, not as fused "
                f"parameters ({_count(fused)}): convert it with --expert-layout per-expert",
                _VLLM_SOURCE.format("0.11.1, 0.12.0 and 0.34.0", "vllm/lora/model_manager.py (is_3d_moe_weight)"),
            )
        )
    if per_expert and wants_fused:
        level: Level = "warning" if at >= version_key("0.22.0") else "error"
        flag = " or start vLLM with its enable_mixed_moe_lora_format option" if level == "warning" else ""
        found.append(
            Ignored(
                level,
                f"vLLM {version} takes {model_type} expert LoRA as fused parameters, not per "
                f"expert ({_count(per_expert)}): convert it with --expert-layout fused{flag}",
                _VLLM_SOURCE.format(
                    "0.12.0, 0.22.0 and 0.34.0",
                    "vllm/lora/model_manager.py (is_3d_moe_weight, enable_mixed_moe_lora_format)",
                ),
            )
        )
    return found


def _vllm_towers(version: str, at: list[int], entries: list[ModuleEntry]) -> list[Ignored]:
    """What vLLM at `version` leaves out of a vision-language adapter's tower and projector modules."""
    found = []
    towers = tower_modules(entries)
    if towers and at < version_key("0.14.0"):
        found.append(
            Ignored(
                "error",
                f"vLLM {version} applies no LoRA to the vision tower or projector: {_count(towers)} would be left out",
                _VLLM_SOURCE.format("0.9.2 to 0.13.0", "vllm/lora/models.py (_filter_unsupported_mm_module)"),
            )
        )
    elif towers:
        found.append(
            Ignored(
                "warning",
                f"vLLM {version} applies LoRA to the vision tower and projector only when "
                "started with its enable_tower_connector_lora option, on models that "
                f"support it; without it, it leaves out {_count(towers)}",
                _VLLM_SOURCE.format("0.14.0 to 0.34.0", "vllm/lora/model_manager.py (enable_tower_connector_lora)"),
            )
        )
    return found


def _sglang(version: str, entries: list[ModuleEntry]) -> list[Ignored]:
    found = []
    towers = tower_modules(entries)
    if towers:
        found.append(
            Ignored(
                "error",
                f"SGLang {version} applies LoRA to a vision-language model's language model "
                f"only: {_count(towers)} would be left out",
                _SGLANG_SOURCE.format("sglang/srt/lora/lora_manager.py (should_apply_lora)"),
            )
        )
    _, fused = expert_modules(entries)
    if fused:
        found.append(
            Ignored(
                "error",
                f"SGLang {version} takes expert LoRA per expert (or in its own 3-D layout), not "
                f"as PEFT's fused target_parameters ({_count(fused)}): convert it with "
                "--expert-layout per-expert",
                _SGLANG_SOURCE.format(
                    "sglang/srt/lora/lora.py (_process_weight, _rename_expert_w_to_proj); sglang issue 25528"
                ),
            )
        )
    return found


def _count(entries: list[ModuleEntry]) -> str:
    return f"{len(entries)} module{'s' if len(entries) != 1 else ''}"
