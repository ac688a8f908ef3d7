"""PEFT's LoRA-family tuners besides LoRA: how each saves a module, and where its rank and scale come from.

One `Tuner` per `peft_type` merged (docs/peft-rules.md, "Other tuners"): the saved key suffix of each factor,
which sets of factors make a module, the config fields of its rank and alpha, and the layers PEFT wraps with it.
Each tuner's delta is defined once, in compute/tuners.py; this module holds what the plan needs without tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .scaling import ModuleScale, module_scale

if TYPE_CHECKING:
    from .adapter import LoraModule
    from .config import AdapterConfig

LORA = "LORA"


@dataclass(frozen=True)
class Tuner:
    """One PEFT tuner merged besides LoRA."""

    peft_type: str  # as adapter_config.json names it: "LOHA"
    name: str  # as people write it: "LoHa"
    factors: dict[str, str]  # saved key suffix -> factor role
    forms: tuple[frozenset[str], ...]  # the role sets a saved module may have (PEFT creates exactly one of them)
    rank_field: str  # the config field of the rank ("r"; AdaLoRA: "init_r")
    alpha_field: str | None  # the config field of alpha (None: the tuner has no scale)
    conv: bool  # PEFT wraps Conv1d / Conv2d layers with it too
    conv1d: bool  # PEFT wraps transformers' Conv1D ((in, out) weights, fan_in_fan_out) with it
    shared: dict[str, str] | None = None  # adapter-wide tensors (VeRA's projections): saved key -> role

    def form_of(self, roles: set[str]) -> frozenset[str] | None:
        """The saved form these roles are, or None when PEFT never saves a module so."""
        return next((form for form in self.forms if form == roles), None)


LOHA = Tuner(
    "LOHA",
    "LoHa",
    {f".hada_{p}": p for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    (frozenset({"w1_a", "w1_b", "w2_a", "w2_b"}), frozenset({"w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2"})),
    "r",
    "alpha",
    conv=True,
    conv1d=False,
)
_W1 = (frozenset({"w1"}), frozenset({"w1_a", "w1_b"}))
_W2 = (frozenset({"w2"}), frozenset({"w2_a", "w2_b"}), frozenset({"t2", "w2_a", "w2_b"}))
LOKR = Tuner(
    "LOKR",
    "LoKr",
    {f".lokr_{p}": p for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    tuple(w1 | w2 for w1 in _W1 for w2 in _W2),
    "r",
    "alpha",
    conv=True,
    conv1d=False,
)
ADALORA = Tuner(
    "ADALORA",
    "AdaLoRA",
    {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"},
    (frozenset({"A", "B", "E"}),),
    "init_r",
    "lora_alpha",
    conv=True,
    conv1d=True,
)
VERA = Tuner(
    "VERA",
    "VeRA",
    {".vera_lambda_b": "lambda_b", ".vera_lambda_d": "lambda_d"},
    (frozenset({"lambda_b", "lambda_d"}),),
    "r",
    None,
    conv=False,
    conv1d=True,
    shared={"base_model.vera_A": "vera_A", "base_model.vera_B": "vera_B"},
)

TUNERS = {t.peft_type: t for t in (LOHA, LOKR, ADALORA, VERA)}


def method_name(peft_type: str) -> str:
    """How people write a method: "LoRA", "LoHa", ..."""
    return "LoRA" if peft_type == LORA else TUNERS[peft_type].name


def tuner_scale(config: AdapterConfig, module_name: str) -> ModuleScale:
    """A non-LoRA module's rank, alpha and scale as PEFT's tuner sets them.

    LoHa and LoKr: `alpha / r`, with rank_pattern and alpha_pattern matched as LoRA's. AdaLoRA: `lora_alpha` (its
    rank when `lora_alpha <= 0`) divided by `ranknum + 1e-5`, ranknum being `init_r` (the rank before pruning,
    kept when `rank_pattern` resizes a module); the compute reads `alpha` and `r` of this scale to divide as PEFT
    does. VeRA: no scale (its vectors hold it), 1."""
    if config.method in (LOHA.peft_type, LOKR.peft_type):
        return module_scale(
            module_name,
            r=config.r,
            lora_alpha=config.lora_alpha,
            use_rslora=False,
            rank_pattern=config.rank_pattern,
            alpha_pattern=config.alpha_pattern,
        )
    if config.method == ADALORA.peft_type:
        alpha = config.lora_alpha if config.lora_alpha > 0 else float(config.r)
        return ModuleScale(config.r, config.lora_alpha, alpha / (config.r + 1e-5), False, None, None)
    return ModuleScale(config.r, 1.0, 1.0, False, None, None)


def saved_rank(module: LoraModule, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The rank a module's saved factors have (None: a LoKr module with both Kronecker factors full has none)."""
    f = module.factors
    if module.method == LOHA.peft_type:
        return shapes[f["w1_b"]][0]
    if module.method == LOKR.peft_type:
        if "w1_b" in f:
            return shapes[f["w1_b"]][0]
        return shapes[f["w2_b"]][0] if "w2_b" in f else None
    if module.method == ADALORA.peft_type:
        return shapes[f["A"]][0]
    return shapes[f["lambda_d"]][0]


def delta_size(module: LoraModule, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """The (out, in * kernel) size of a module's delta, which PEFT reshapes to the base weight's shape."""
    f = module.factors
    if module.method == LOHA.peft_type:
        if "t1" in f:  # (r, out), (r, in), (r, r, k1, k2)
            t = shapes[f["t1"]]
            return shapes[f["w1_a"]][1], shapes[f["w1_b"]][1] * math.prod(t[2:])
        return shapes[f["w1_a"]][0], shapes[f["w1_b"]][1]
    if module.method == LOKR.peft_type:
        w1 = shapes[f["w1"]] if "w1" in f else (shapes[f["w1_a"]][0], shapes[f["w1_b"]][1])
        if "w2" in f:
            w2 = shapes[f["w2"]]
            return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
        if "t2" in f:  # (r, out2), (r, in2), (r, r, k1, k2)
            t = shapes[f["t2"]]
            return w1[0] * shapes[f["w2_a"]][1], w1[1] * shapes[f["w2_b"]][1] * math.prod(t[2:])
        return w1[0] * shapes[f["w2_a"]][0], w1[1] * shapes[f["w2_b"]][1]
    if module.method == ADALORA.peft_type:
        return shapes[f["B"]][0], shapes[f["A"]][1]
    return shapes[f["lambda_b"]][0], -1  # VeRA: its input width is the base's (vera_A is sliced to it)
