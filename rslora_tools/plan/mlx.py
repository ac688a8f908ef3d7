"""What `convert --target mlx` writes: an mlx-lm adapter that mlx-lm serves as PEFT does (docs/mlx.md).

mlx-lm has one `rank` and one `scale` for every module (lora_parameters). So the adapter gets the
largest rank of its modules, a module of a smaller rank is padded with zero rows and columns
(exact: the added products are zeros), and the scale most modules have; a module whose PEFT scale
differs has the ratio folded into its lora_b (in float32 unless it is a power of two), and the
report says how many. mlx-lm attaches LoRA to the `keys` of its last `num_layers` layers (names
relative to a layer), and to `keys` that are full module paths anywhere in the model: the compact
form is written when it attaches exactly the adapter's modules, else full paths.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.config_rewrite import is_power_of_two
from ..adapter.mlx import LAYER
from ..adapter.module_scales import ModuleEntry
from ..adapter.runtimes import missing_features, runtime
from ..errors import UnsupportedAdapterError
from ..reporting import counted

_NUMBERED = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class MlxModule:
    """One module as mlx-lm saves it: its PEFT keys, its rank, and the factor folded into its lora_b."""

    name: str
    a_key: str
    b_key: str
    magnitude_key: str | None
    rank: int
    factor: float


@dataclass
class MlxPlan:
    """The mlx-lm adapter: its config fields and its modules."""

    fine_tune_type: str  # "lora" or "dora"
    rank: int
    scale: float
    dropout: float
    num_layers: int
    keys: list[str]
    modules: list[MlxModule]
    upcast: bool  # lora_a and lora_b written in float32 (a factor that is not a power of two was folded)
    message: str

    def config(self, base_model: str | None) -> dict[str, Any]:
        """adapter_config.json as mlx-lm reads it."""
        config: dict[str, Any] = {
            "fine_tune_type": self.fine_tune_type,
            "num_layers": self.num_layers,
            "lora_parameters": {"rank": self.rank, "scale": self.scale, "dropout": self.dropout, "keys": self.keys},
        }
        if base_model:
            config["model"] = base_model
        return config


def plan_mlx(adapter: Adapter, entries: list[ModuleEntry]) -> MlxPlan:
    """The mlx-lm adapter that serves this PEFT adapter's function, or UnsupportedAdapterError saying why not."""
    _refuse(adapter, entries)
    rank = max(e.shape_rank for e in entries)
    scale = Counter(e.scale.scale for e in entries).most_common(1)[0][0]
    modules = [
        MlxModule(
            e.module.name, e.module.a_key, e.module.b_key, e.module.magnitude_key, e.shape_rank, e.scale.scale / scale
        )
        for e in entries
    ]
    num_layers, keys = attachment(adapter, [m.name for m in modules])
    folded = sum(m.factor != 1.0 for m in modules)
    padded = sum(m.rank != rank for m in modules)
    notes = [f"rank {rank}, scale {scale!r} for every module"]
    if folded:
        notes.append(f"{counted(folded, 'module')} with another PEFT scale: the ratio folded into lora_b")
    if padded:
        notes.append(f"{counted(padded, 'module')} of a smaller rank padded with zeros (exact)")
    dropout = adapter.config.json_dict.get("lora_dropout", 0.0)
    return MlxPlan(
        fine_tune_type="dora" if adapter.config.use_dora else "lora",
        rank=rank,
        scale=scale,
        dropout=float(dropout) if isinstance(dropout, (int, float)) else 0.0,
        num_layers=num_layers,
        keys=keys,
        modules=modules,
        upcast=any(not is_power_of_two(abs(m.factor)) for m in modules if m.factor != 1.0),
        message="mlx-lm adapter: " + "; ".join(notes),
    )


def _refuse(adapter: Adapter, entries: list[ModuleEntry]) -> None:
    rt = runtime("mlx")
    reasons = missing_features(rt, adapter)
    for e in entries:
        m = e.module
        if e.wrapping == "param" or m.depth or len(adapter.shapes[m.a_key]) != 2:
            reasons.append(f"module {m.name!r} is not a Linear (target_parameters, nested or convolution LoRA)")
        elif e.wrapping == "mha out_proj":
            reasons.append(f"module {m.name!r} is a MultiheadAttention out_proj")
        if len(reasons) > 2:
            break
    if reasons:
        raise UnsupportedAdapterError(
            f"{rt.title} cannot serve this adapter: {'; '.join(reasons)}. Merge it into the base model instead "
            "([[rslora_tools.merge(BASE, ADAPTER, OUT)]]) and convert the merged model with mlx_lm.convert"
        )


def attachment(adapter: Adapter, names: list[str]) -> tuple[int, list[str]]:
    """`num_layers` and `keys` that make mlx-lm wrap exactly these modules.

    Compact (the same layer-relative keys in the last `num_layers` layers) when the adapter's own
    config shows that it wraps these names in every layer of the model: target_modules a list of
    unnumbered names and no layers_to_transform or exclude_modules, and the layers 0..n-1 all
    wrapped alike. Otherwise every full module path (mlx-lm matches those against the whole model).
    """
    layers: dict[int, set[str]] = {}
    outside: list[str] = []
    for name in names:
        found = LAYER.match(name)
        if found is None or found["prefix"] != "model.layers":
            outside.append(name)
        else:
            layers.setdefault(int(found["index"]), set()).add(found["rest"])
    fields = adapter.config.json_dict
    targets = fields.get("target_modules")
    all_layers = (
        isinstance(targets, list)
        and not any(_NUMBERED.search(str(t)) for t in targets)
        and not fields.get("layers_to_transform")
        and not fields.get("exclude_modules")
    )
    rel = next(iter(layers.values()), set())
    if layers and all_layers and sorted(layers) == list(range(len(layers))) and all(v == rel for v in layers.values()):
        return len(layers), sorted(rel) + sorted(outside)
    return len(layers), sorted(names)
