"""mlx-lm adapters, read as the PEFT adapter that computes the same function (docs/mlx.md).

mlx-lm (Apple's MLX) saves `adapter_config.json` with `fine_tune_type` ("lora", "dora" or
"full"), `num_layers` and `lora_parameters` {`rank`, `scale`, `dropout`, `keys`}, and
`adapters.safetensors` with `<module>.lora_a` of shape (in, r), `<module>.lora_b` (r, out) and,
for DoRA, `<module>.m` (out,). Its LoRALinear computes `y + scale * ((x @ lora_a) @ lora_b)`
(mlx-lm 0.32.2, tuner/lora.py): PEFT's LoRA with A = lora_a^T, B = lora_b^T and one scale for
every module; its DoRALinear is PEFT's DoRA with magnitude `m` (tuner/dora.py). So an mlx-lm
adapter is read as a PEFT adapter with r = rank and an alpha whose `alpha / r` is `scale` bit for
bit, and its tensors are transposed as they are read; every command then takes it as it takes a
PEFT adapter. The module paths are mlx-lm's, which are transformers' for the models mlx-lm loads
from a transformers checkpoint (Llama, Qwen2, ... measured in tests/mlx/).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterConfigError, InputError, UnsupportedAdapterError
from ..formats.safetensors_file import SafetensorsHeader, read_header, read_tensor
from .adapter import PEFT_PREFIX, Adapter, group_keys
from .config import CONFIG_NAME, parse_config

if TYPE_CHECKING:
    import torch

MLX_WEIGHTS_NAME = "adapters.safetensors"
MLX_FORMAT = "mlx-lm"
# mlx-lm's saved leaf -> PEFT's key suffix
_LEAVES = {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight", "m": ".lora_magnitude_vector"}
LAYER = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def is_mlx_config(raw: dict[str, Any]) -> bool:
    """An mlx-lm adapter config: `lora_parameters` or `fine_tune_type`, and no PEFT `peft_type`."""
    return "peft_type" not in raw and ("lora_parameters" in raw or "fine_tune_type" in raw)


@dataclass
class MlxAdapter(Adapter):
    """An mlx-lm adapter as PEFT keys: each factor transposed as it is read; the rest as saved."""

    mlx_keys: dict[str, str] = field(default_factory=dict, repr=False)  # PEFT key -> mlx-lm key
    mlx_header: SafetensorsHeader | None = field(default=None, repr=False)  # adapters.safetensors' header

    @property
    def on_disk(self) -> bool:
        return False  # the files are mlx-lm's, not the PEFT adapter this one stands for

    @property
    def source_format(self) -> str:
        return MLX_FORMAT

    def tensor(self, key: str) -> torch.Tensor:
        assert self.mlx_header is not None
        with open(self.weights_path, "rb") as f:
            value = read_tensor(f, self.mlx_header, self.mlx_keys[key])
        return value.t().contiguous() if value.dim() == 2 else value

    def tensor_bytes(self, key: str) -> bytearray:
        from ..formats.safetensors_file import tensor_bytes

        value = self.tensor(key)  # alive while its bytes are copied
        return bytearray(tensor_bytes(value))


def load_mlx_adapter(folder: Path, raw: dict[str, Any]) -> MlxAdapter:
    """Read an mlx-lm adapter folder (config and tensor headers) as the PEFT adapter it equals."""
    where = str(folder / CONFIG_NAME)
    fine_tune_type, rank, scale, dropout = _mlx_fields(raw, where)
    weights = folder / MLX_WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"{folder}: an mlx-lm adapter config but no {MLX_WEIGHTS_NAME} beside it")
    header = read_header(weights)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    mlx_keys: dict[str, str] = {}
    for key, info in header.tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in _LEAVES or not module:
            raise UnsupportedAdapterError(
                f"{weights}: {key!r} is not an mlx-lm LoRA or DoRA tensor (lora_a, lora_b, m)"
            )
        _check_tensor(weights, key, leaf, info.shape, rank)
        peft_key = PEFT_PREFIX + module + _LEAVES[leaf]
        shapes[peft_key] = tuple(reversed(info.shape)) if leaf != "m" else tuple(info.shape)
        dtypes[peft_key] = info.dtype
        mlx_keys[peft_key] = key
    modules = sorted({key.rpartition(".")[0] for key in header.tensors})
    if not modules:
        raise InputError(f"{weights}: no LoRA tensors")
    for name in modules:
        if "embed" in name.rsplit(".", 1)[-1]:
            raise UnsupportedAdapterError(
                f"{weights}: module {name!r}: mlx-lm embedding LoRA is not read (mlx-lm also applies it to a tied "
                "output projection, which PEFT does not); merge it with mlx_lm.fuse"
            )
    config = parse_config(peft_config(raw, modules, rank, scale, dropout, fine_tune_type == "dora"), where)
    adapter = MlxAdapter(folder, weights, config, shapes, dtypes, mlx_keys=mlx_keys, mlx_header=header)
    group_keys(adapter)
    return adapter


def _mlx_fields(raw: dict[str, Any], where: str) -> tuple[str, int, float, float]:
    """fine_tune_type, rank, scale and dropout of an mlx-lm config, checked as mlx-lm reads them."""
    fine_tune_type = raw.get("fine_tune_type", "lora")
    if fine_tune_type == "full":
        raise UnsupportedAdapterError(
            f"{where}: fine_tune_type 'full': an mlx-lm full fine-tune saves whole weights, not an adapter; write the "
            "model with mlx_lm.fuse, then make an adapter of it with: [[rslora_tools.extract(BASE, TUNED, OUT)]]"
        )
    if fine_tune_type not in ("lora", "dora"):
        raise UnsupportedAdapterError(f"{where}: fine_tune_type {fine_tune_type!r}; mlx-lm adapters are lora or dora")
    params = raw.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterConfigError(f"{where}: an mlx-lm adapter needs 'lora_parameters' (rank, scale, dropout)")
    rank, scale, dropout = params.get("rank"), params.get("scale"), params.get("dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterConfigError(f"{where}: lora_parameters.rank must be a positive integer, got {rank!r}")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        hint = " (mlx-lm's scale multiplies the update; it is not PEFT's alpha)" if "alpha" in params else ""
        raise AdapterConfigError(f"{where}: lora_parameters.scale must be a finite number, got {scale!r}{hint}")
    finite_dropout = isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and math.isfinite(dropout)
    return fine_tune_type, rank, float(scale), float(dropout) if finite_dropout else 0.0


def _check_tensor(weights: Path, key: str, leaf: str, shape: tuple[int, ...], rank: int) -> None:
    if leaf == "m":
        if len(shape) != 1:
            raise InputError(f"{weights}: {key!r} has shape {list(shape)}; a DoRA magnitude is one vector")
        return
    if len(shape) != 2:
        raise UnsupportedAdapterError(
            f"{weights}: {key!r} has shape {list(shape)}: mlx-lm's LoRA on fused MoE experts (SwitchLinear) is not "
            "read yet; merge it with mlx_lm.fuse"
        )
    if shape[1 if leaf == "lora_a" else 0] != rank:
        raise InputError(
            f"{weights}: {key!r} has shape {list(shape)}, not rank {rank} as lora_parameters.rank says "
            "(mlx-lm would refuse to load it)"
        )


def alpha_for_scale(scale: float, r: int, use_rslora: bool = False) -> float:
    """An alpha whose PEFT scale (alpha / r, or alpha / sqrt(r)) is `scale` bit for bit (the nearest such float)."""
    denominator = math.sqrt(r) if use_rslora else r
    alpha = scale * denominator
    for _ in range(64):
        got = alpha / denominator
        if got == scale:
            return alpha
        alpha = math.nextafter(alpha, math.inf if got < scale else -math.inf)
    raise UnsupportedAdapterError(f"no lora_alpha gives the scale {scale!r} at rank {r} exactly")


def peft_config(
    raw: dict[str, Any], modules: list[str], rank: int, scale: float, dropout: float, dora: bool
) -> dict[str, Any]:
    """The PEFT LoraConfig (as saved) of an mlx-lm adapter: its rank, its scale as classic alpha / r, its modules."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha_for_scale(scale, rank),
        "use_rslora": False,
        "use_dora": dora,
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": raw.get("model") if isinstance(raw.get("model"), str) else None,
    }
    config.update(target_modules_for(modules))
    return config


def target_modules_for(modules: list[str]) -> dict[str, Any]:
    """PEFT fields that wrap exactly these modules: relative names and layers_to_transform when the modules are the
    same names in each of some layers, else every full name."""
    layers: dict[int, set[str]] = {}
    prefixes = set()
    for name in modules:
        found = LAYER.match(name)
        if found is None:
            return {"target_modules": sorted(modules)}
        layers.setdefault(int(found["index"]), set()).add(found["rest"])
        prefixes.add(found["prefix"])
    names = next(iter(layers.values()))
    if len(prefixes) != 1 or any(v != names for v in layers.values()):
        return {"target_modules": sorted(modules)}
    return {
        "target_modules": sorted(names),
        "layers_to_transform": sorted(layers),
        "layers_pattern": prefixes.pop().rsplit(".", 1)[-1],
    }
