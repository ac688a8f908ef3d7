"""PEFT's LoRA-family tuners besides LoRA: how each saves a module, and where its rank and scale come from.

One `Tuner` per `peft_type` merged (docs/peft-rules.md, "Other tuners"): the saved key suffix of each factor,
which sets of factors make a module, the config fields of its rank and alpha, and the layers PEFT wraps with it.
Each tuner's delta is defined once, in compute/tuners.py; this module holds what the plan needs without tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

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


Shapes = Mapping[str, tuple[int, ...]]


def saved_rank(method: str, f: Mapping[str, str], shapes: Shapes) -> int | None:
    """The rank a module's saved factors `f` (role -> key) have (None: a LoKr module with both Kronecker factors
    full has none)."""
    if method == LOHA.peft_type:
        return shapes[f["w1_b"]][0]
    if method == LOKR.peft_type:
        if "w1_b" in f:
            return shapes[f["w1_b"]][0]
        return shapes[f["w2_b"]][0] if "w2_b" in f else None
    if method == ADALORA.peft_type:
        return shapes[f["A"]][0]
    return shapes[f["lambda_d"]][0]


def delta_size(method: str, f: Mapping[str, str], shapes: Shapes) -> tuple[int, int]:
    """The (out, in * kernel) size of a module's delta from its factors `f` (role -> key), which PEFT reshapes to the
    base weight's shape."""
    if method == LOHA.peft_type:
        if "t1" in f:  # (r, out), (r, in), (r, r, k1, k2)
            t = shapes[f["t1"]]
            return shapes[f["w1_a"]][1], shapes[f["w1_b"]][1] * math.prod(t[2:])
        return shapes[f["w1_a"]][0], shapes[f["w1_b"]][1]
    if method == LOKR.peft_type:
        w1 = shapes[f["w1"]] if "w1" in f else (shapes[f["w1_a"]][0], shapes[f["w1_b"]][1])
        if "w2" in f:
            w2 = shapes[f["w2"]]
            return w1[0] * w2[0], w1[1] * math.prod(w2[1:])
        if "t2" in f:  # (r, out2), (r, in2), (r, r, k1, k2)
            t = shapes[f["t2"]]
            return w1[0] * shapes[f["w2_a"]][1], w1[1] * shapes[f["w2_b"]][1] * math.prod(t[2:])
        return w1[0] * shapes[f["w2_a"]][0], w1[1] * shapes[f["w2_b"]][1]
    if method == ADALORA.peft_type:
        return shapes[f["B"]][0], shapes[f["A"]][1]
    return shapes[f["lambda_b"]][0], -1  # VeRA: its input width is the base's (vera_A is sliced to it)
