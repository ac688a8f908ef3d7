"""What `extract` makes of each tensor of BASE and TUNED, from their headers (docs/extraction.md).

Every tensor of TUNED is paired with BASE's tensor of the same name. A 2-D floating `.weight`
is a factorisable module: an embedding (embedding LoRA, `lora_embedding_A/B`), a GPT-2-style
Conv1D (stored (in, out): `fan_in_fan_out`), or a Linear. Its `.bias`, if it changes, goes with
it (lora_bias, or bias="lora_only"). Any other changed tensor (norms, 1-D parameters) makes its
module a `modules_to_save` entry. Whether a tensor changed is only known once its bytes are
read (commands/extract.py); here each one gets its role. Tensors in one model only, or with other
shapes or dtypes, are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import InputError, MismatchError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint
from ..formats.safetensors_file import FLOAT_DTYPES
from .placement import CONV1D_MODEL_TYPES

Role = Literal["linear", "conv1d", "embedding", "bias", "other"]
_EMBEDDING_NAMES = {"wte", "wpe", "shared", "embed_in", "word_embeddings", "position_embeddings"}


@dataclass
class TensorRole:
    name: str
    role: Role
    module: str  # the module it belongs to (name without the parameter)
    shape: tuple[int, ...]


@dataclass
class ExtractionPlan:
    roles: list[TensorRole]
    conv1d: bool  # the model stores Linear weights as (in, out) (GPT-2's Conv1D)
    target_modules: list[str] | None = None  # --target-modules: only these module names (suffix match)
    notes: list[str] = field(default_factory=list)

    def targeted(self, module: str) -> bool:
        if self.target_modules is None:
            return True
        return any(module == t or module.endswith("." + t) for t in self.target_modules)


def plan_extraction(base: Checkpoint, tuned: Checkpoint, target_modules: list[str] | None = None) -> ExtractionPlan:
    """Pair BASE's and TUNED's tensors and give each its role; refuse what cannot be paired."""
    base_names, tuned_names = set(base.weight_map), set(tuned.weight_map)
    if base_names != tuned_names:
        only = sorted(base_names ^ tuned_names)
        side = "TUNED" if only[0] in tuned_names else "BASE"
        raise UnsupportedAdapterError(
            f"{only[0]!r} is only in {side} ({len(only)} of their tensors differ between the models); extract needs "
            f"the same "
            "tensors in both (a grown vocabulary or an added head cannot be an adapter here: merge-free serving of "
            "such a model needs the full weights)"
        )
    model_type = (tuned.config or {}).get("model_type")
    conv1d = model_type in CONV1D_MODEL_TYPES
    roles = []
    for name in tuned.tensor_names():
        b, t = base.info(name), tuned.info(name)
        if tuple(b.shape) != tuple(t.shape) or b.dtype != t.dtype:
            raise MismatchError(
                f"{name!r} is {b.dtype}{list(b.shape)} in BASE and {t.dtype}{list(t.shape)} in TUNED; "
                "the models must have the same shapes and dtypes"
            )
        roles.append(
            TensorRole(name, _role(name, tuple(t.shape), t.dtype, conv1d), name.rpartition(".")[0], tuple(t.shape))
        )
    plan = ExtractionPlan(roles, conv1d, target_modules)
    weights = {r.module for r in roles if r.role in ("linear", "conv1d", "embedding")}
    for r in roles:  # a bias belongs with its module's LoRA only if that module has a factorisable weight
        if r.role == "bias" and r.module not in weights:
            r.role = "other"
    for wanted in target_modules or []:
        if not any(module == wanted or module.endswith("." + wanted) for module in weights):
            examples = sorted({m.rpartition(".")[2] for m in weights})
            raise InputError(
                f"[[target_modules={wanted!r}]] names no module of the models that LoRA can express (a "
                f"module's name or its last part: {', '.join(examples[:6])}{', ...' if len(examples) > 6 else ''})"
            )
    return plan


def _role(name: str, shape: tuple[int, ...], dtype: str, conv1d: bool) -> Role:
    if dtype not in FLOAT_DTYPES:
        return "other"
    last = name.rpartition(".")[0].rpartition(".")[2]
    if name.endswith(".weight") and len(shape) == 2:
        if "embed" in last or last in _EMBEDDING_NAMES:
            return "embedding"
        return "conv1d" if conv1d and last != "lm_head" else "linear"
    if name.endswith(".bias") and len(shape) == 1:
        return "bias"
    return "other"
