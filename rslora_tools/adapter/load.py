"""Reading an adapter folder: PEFT's, or mlx-lm's read as the PEFT adapter it equals (adapter/mlx.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..formats.safetensors_file import read_header
from .adapter import PICKLE_NAME, WEIGHTS_NAME, Adapter, find_adapter_folder, group_keys
from .config import CONFIG_NAME, parse_config, read_config_file
from .mlx import is_mlx_config, load_mlx_adapter

if TYPE_CHECKING:
    import torch


def load_adapter(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Adapter:
    """Read an adapter folder: its config and tensor headers (weights are read later, one tensor at a time).

    Args:
        path: an adapter folder as written by PEFT's `save_pretrained` (or a folder with one adapter subfolder).
        allow_pickle: load `adapter_model.bin` when there is no safetensors file, with
            `torch.load(weights_only=True)`, which never executes code.

    Returns:
        The `Adapter`, with its modules grouped and checked.
    """
    folder = find_adapter_folder(path)
    raw = read_config_file(folder)
    if is_mlx_config(raw):
        return load_mlx_adapter(folder, raw)
    config = parse_config(raw, str(folder / CONFIG_NAME))
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        header = read_header(weights)
        adapter = Adapter(
            folder,
            weights,
            config,
            {k: v.shape for k, v in header.tensors.items()},
            {k: v.dtype for k, v in header.tensors.items()},
            _header=header,
        )
    elif (folder / PICKLE_NAME).is_file():
        weights = folder / PICKLE_NAME
        if not allow_pickle:
            raise InputError(
                f"{weights}: the adapter exists only as a pickle; pickles can execute code, so they are refused. "
                "Convert it to safetensors (PEFT: save_pretrained(..., safe_serialization=True)) or pass "
                "[[allow_pickle=True]] to load it with torch.load(weights_only=True)"
            )
        from ..formats.safetensors_file import torch_to_safetensors_dtype

        pickled = _load_pickle(weights)
        adapter = Adapter(
            folder,
            weights,
            config,
            {k: tuple(v.shape) for k, v in pickled.items()},
            {k: torch_to_safetensors_dtype(v.dtype) for k, v in pickled.items()},
            _pickled=pickled,
        )
    else:
        raise InputError(f"{folder}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    group_keys(adapter)
    return adapter


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds here; all mean "not a safe tensor pickle"
        raise InputError(f"{path}: cannot be loaded safely with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InputError(f"{path}: expected a dict of tensors")
    return state
