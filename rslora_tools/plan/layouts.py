"""Names and expert layouts across transformers versions: how an adapter made for one maps onto a checkpoint in another.

transformers 5 loads some architectures under other names than their checkpoints use, and fuses MoE experts into
3-D parameters, while `save_pretrained` still writes the legacy layout; PEFT saves adapters in the in-memory
names. So an adapter and the checkpoint it was trained on can name the same weight differently:
- key layouts: a multimodal model's language model is `model.language_model.*` in memory and `model.*` (Qwen2-VL)
  or `language_model.model.*` (LLaVA family) on disk; its vision tower and projector move the same way;
- expert layouts: Mixtral's `block_sparse_moe.experts.N.w1/w3/w2` and Qwen-MoE's `mlp.experts.N.gate_proj/up_proj/
  down_proj` on disk are `mlp.experts.gate_up_proj` (E, 2I, H: gate rows, then up rows) and `down_proj` (E, H, I)
  in memory; gpt-oss stores its experts fused on disk too, `gate_up_proj` (E, H, 2I) with gate and up columns
  interleaved.
The rules are those of transformers 5.25.0's conversion_mapping.py for the families below (docs/peft-rules.md,
"Layouts"); an architecture not listed keeps the adapter's names (up to a leading prefix, plan/placement.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# (disk pattern, in-memory replacement, in-memory pattern, disk replacement), tried in order.
Rename = tuple[str, str, str, str]

_QWEN2_VL: list[Rename] = [
    (r"^visual\.", "model.visual.", r"^model\.visual\.", "visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model.", r"^model\.language_model\.", "model."),
]
_LLAVA: list[Rename] = [
    (r"^language_model\.model\.", "model.language_model.", r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.lm_head\.", "lm_head.", r"^lm_head\.", "language_model.lm_head."),
    (r"^vision_tower\.", "model.vision_tower.", r"^model\.vision_tower\.", "vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector.", r"^model\.multi_modal_projector\.",
     "multi_modal_projector."),
]
_MIXTRAL_ROUTER: list[Rename] = [(r"\.block_sparse_moe\.", ".mlp.", r"\.mlp\.", ".block_sparse_moe.")]

# architecture class or model_type -> its key renames (transformers 5.25.0, conversion_mapping.py)
KEY_RENAMES: dict[str, list[Rename]] = {
    "Qwen2VLForConditionalGeneration": _QWEN2_VL, "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    **{t: _LLAVA for t in ("llava", "aria", "paligemma", "aya_vision", "got_ocr2", "gemma3", "internvl", "vipllava",
                           "mistral3", "pp_chart2table")},
    **{t: _MIXTRAL_ROUTER for t in ("mixtral", "minimax", "minimax_m2")},
}


@dataclass(frozen=True)
class ExpertLayout:
    """How one family stores its experts per expert (on disk in transformers 5, in memory in 4) and fused."""

    family: str
    per_expert: dict[str, str]  # role (gate, up, down) -> the per-expert module's name
    interleaved: bool = False  # fused gate_up alternates gate and up (gpt-oss) instead of gate rows, then up rows
    in_out: bool = False  # the fused parameters are (E, in, out) (gpt-oss) instead of (E, out, in)
    fused_on_disk: bool = False  # the family's checkpoints store the experts fused (gpt-oss)
    container: str = "mlp"  # the per-expert modules' parent on disk (Mixtral: block_sparse_moe)

    @property
    def roles(self) -> dict[str, str]:
        return {name: role for role, name in self.per_expert.items()}


_MIXTRAL = ExpertLayout("mixtral", {"gate": "w1", "up": "w3", "down": "w2"}, container="block_sparse_moe")
_QWEN2_MOE = ExpertLayout("qwen2_moe", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
_GPT_OSS = ExpertLayout("gpt_oss", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, interleaved=True,
                        in_out=True, fused_on_disk=True)

# model_type -> its expert layout (transformers 5.25.0: _MODEL_TO_CONVERSION_PATTERN and the gpt_oss model)
EXPERT_LAYOUTS: dict[str, ExpertLayout] = {
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2")},
    **{t: _QWEN2_MOE for t in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "dots1",
                               "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe", "flex_olmo", "qwen3_next",
                               "exaone_moe")},
    "gpt_oss": _GPT_OSS,
}
FUSED = ("gate_up_proj", "down_proj")  # the fused parameters' names in every family
_PER_EXPERT = re.compile(r"^(?P<layer>.*)\.(?P<container>mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<name>\w+)$")


@dataclass(frozen=True)
class Layouts:
    """The key renames and the expert layout of one checkpoint (from its config.json)."""

    renames: tuple[Rename, ...] = ()
    experts: ExpertLayout | None = None

    @classmethod
    def of(cls, config: dict[str, Any] | None) -> Layouts:
        config = config or {}
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        renames = next((KEY_RENAMES[a] for a in architectures if isinstance(a, str) and a in KEY_RENAMES),
                       KEY_RENAMES.get(model_type, []) if isinstance(model_type, str) else [])
        experts = EXPERT_LAYOUTS.get(model_type) if isinstance(model_type, str) else None
        return cls(tuple(renames), experts)

    @property
    def family(self) -> str | None:
        return self.experts.family if self.experts else None

    def alternatives(self, name: str) -> list[str]:
        """`name` in the checkpoint's other naming (in memory <-> on disk), by every rename that applies."""
        found = []
        for disk, memory, memory_pattern, disk_name in self.renames:
            for pattern, replacement in ((memory_pattern, disk_name), (disk, memory)):
                renamed = re.sub(pattern, replacement, name, count=1)
                if renamed != name and renamed not in found:
                    found.append(renamed)
        return found

    def in_memory(self, name: str) -> str:
        """A checkpoint name as transformers 5 names the tensor in memory (the first disk rename that applies)."""
        for disk, memory, _, _ in self.renames:
            renamed = re.sub(disk, memory, name, count=1)
            if renamed != name:
                return renamed
        return name

    def per_expert_module(self, module: str) -> tuple[str, int, str] | None:
        """(layer, expert, role) of a per-expert module name of this family (`...experts.3.w1` -> gate)."""
        m = _PER_EXPERT.match(module)
        if self.experts is None or m is None or m["name"] not in self.experts.roles:
            return None
        return m["layer"], int(m["expert"]), self.experts.roles[m["name"]]

    def fused_name(self, layer: str, role: str) -> str:
        """The fused parameter holding a role's experts, in memory naming."""
        return f"{layer}.mlp.experts.{'down_proj' if role == 'down' else 'gate_up_proj'}"

    def per_expert_name(self, layer: str, expert: int, role: str) -> str:
        """A per-expert module's weight, in memory naming (the key renames give the disk name)."""
        assert self.experts is not None
        return f"{layer}.mlp.experts.{expert}.{self.experts.per_expert[role]}.weight"

    def rows(self, role: str, fused_out: int) -> tuple[int, int, int] | None:
        """The output features of the fused gate_up that are `role`'s (None: down_proj, all of them)."""
        assert self.experts is not None
        if role == "down":
            return None
        half = fused_out // 2
        if self.experts.interleaved:
            return (0 if role == "gate" else 1, fused_out, 2)
        return (0, half, 1) if role == "gate" else (half, fused_out, 1)
