"""The one writer of an adapter folder's config and weights (convert, combine, extract).

The config is written as PEFT writes it (sorted keys, indent 2); the weights go into a
preallocated `adapter_model.safetensors`, one tensor at a time. Every number of the config
and every tensor written is checked to be finite first
(docs/reliability.md, "Non-finite outputs"): a scale folded into lora_B that overflows, an
alpha of infinity, or factors of a factorisation that broke down make an error, not an adapter
that serves NaN. `allow_nonfinite` (the commands' --allow-nonfinite) writes them anyway.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..formats.safetensors_file import SafetensorsWriter
from ..reporting import counted
from .adapter import WEIGHTS_NAME
from .config import CONFIG_NAME

if TYPE_CHECKING:
    import torch

TensorEntry = tuple[str, str, tuple[int, ...]]


def nonfinite_error(where: str, detail: str, allowed_by_flag: bool = True) -> InputError:
    """The one message for NaN or Inf a command would write (an adapter, a GGUF file); nothing is written."""
    hint = " Pass [[allow_nonfinite=True]] to write it anyway" if allowed_by_flag else ""
    return InputError(f"{where}: {detail}; the output would serve NaN or Inf, so nothing was written.{hint}")


def check_config_finite(config: dict[str, Any], where: str = CONFIG_NAME) -> None:
    """Every number in the config (lora_alpha, the patterns) is finite; JSON has no infinity either."""
    for key, value in _numbers(config):
        if not math.isfinite(value):
            raise nonfinite_error(where, f"{key} would be {value}")


def _numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(key, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{key}[{i}]")]
    return []


def count_nonfinite(tensor: torch.Tensor) -> int:
    import torch

    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


class AdapterWriter:
    """Writes FOLDER/adapter_config.json and FOLDER/adapter_model.safetensors (mlx-lm's: adapters.safetensors),
    tensor by tensor, checked."""

    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        entries: list[TensorEntry],
        metadata: dict[str, str],
        *,
        allow_nonfinite: bool = False,
        allowed_by_flag: bool = True,
        weights_name: str = WEIGHTS_NAME,
    ):
        self.allow_nonfinite, self.allowed_by_flag = allow_nonfinite, allowed_by_flag
        if not allow_nonfinite:
            check_config_finite(config)
        write_config(folder, config)
        self.path = folder / weights_name
        self.writer = SafetensorsWriter(self.path, entries, metadata)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if not self.allow_nonfinite:
            bad = count_nonfinite(tensor)
            if bad:
                raise nonfinite_error(
                    key, f"{counted(bad, 'NaN or Inf value')} in the tensor computed for it", self.allowed_by_flag
                )
        self.writer.write_tensor(key, tensor)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """adapter_config.json in PEFT's own format (sorted keys, indent 2), so a round trip gives back the same text."""
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
