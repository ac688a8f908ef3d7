"""rslora-tools: merge, convert, inspect and publish PEFT LoRA / rsLoRA adapters, exactly and streaming.

Python API (the CLI is a thin layer over it):

    from rslora_tools import merge, load_adapter
    report = merge("base-model/", "my-adapter/", "merged/")
"""

from __future__ import annotations

import warnings

# torch warns at import when numpy is absent; rslora-tools never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"

from .adapter import Adapter, AdapterConfig, load_adapter  # noqa: E402
from .checkpoint import Checkpoint, open_checkpoint  # noqa: E402
from .errors import (  # noqa: E402
    AdapterConfigError,
    InputError,
    MismatchError,
    OutputError,
    RsloraError,
    UnsupportedAdapterError,
)
from .merge import MergeReport, merge  # noqa: E402
from .scaling import ModuleScale, module_scale, scale  # noqa: E402

__all__ = [
    "__version__",
    "Adapter",
    "AdapterConfig",
    "AdapterConfigError",
    "Checkpoint",
    "InputError",
    "MergeReport",
    "MismatchError",
    "ModuleScale",
    "OutputError",
    "RsloraError",
    "UnsupportedAdapterError",
    "load_adapter",
    "merge",
    "module_scale",
    "open_checkpoint",
    "scale",
]
