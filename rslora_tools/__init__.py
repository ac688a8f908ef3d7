"""Stage 0: rslora-tools, merge, convert, inspect and publish PEFT LoRA / rsLoRA adapters, exactly and streaming.

Python API (the CLI is a thin layer over it):

    from rslora_tools import merge, load_adapter
    report = merge("base-model/", "my-adapter/", "merged/")

Names are imported on first use, so that `import rslora_tools` (and `rslora-tools --help`)
does not load torch.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# torch warns at import when numpy is absent; rslora-tools never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Adapter": "adapter", "AdapterConfig": "adapter_config", "load_adapter": "adapter",
    "Checkpoint": "checkpoint", "open_checkpoint": "checkpoint",
    "AdapterConfigError": "errors", "InputError": "errors", "MismatchError": "errors", "OutputError": "errors",
    "RsloraError": "errors", "UnsupportedAdapterError": "errors", "HubError": "errors",
    "MergeOptions": "merging", "MergeReport": "merging", "merge": "merging",
    "ConvertReport": "conversion", "convert": "conversion",
    "CombineReport": "combining", "combine": "combining",
    "ExtractReport": "extraction", "extract": "extraction",
    "VerifyReport": "verification", "verify": "verification",
    "InspectReport": "inspection", "inspect_adapter": "inspection",
    "PushReport": "publish", "push": "publish",
    "ModuleScale": "scaling", "module_scale": "scaling", "scale": "scaling",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from .adapter import Adapter, load_adapter  # noqa: F401
    from .adapter_config import AdapterConfig  # noqa: F401
    from .checkpoint import Checkpoint, open_checkpoint  # noqa: F401
    from .combining import CombineReport, combine  # noqa: F401
    from .extraction import ExtractReport, extract  # noqa: F401
    from .conversion import ConvertReport, convert  # noqa: F401
    from .errors import (  # noqa: F401
        AdapterConfigError,
        HubError,
        InputError,
        MismatchError,
        OutputError,
        RsloraError,
        UnsupportedAdapterError,
    )
    from .publish import PushReport, push  # noqa: F401
    from .inspection import InspectReport, inspect_adapter  # noqa: F401
    from .merging import MergeOptions, MergeReport, merge  # noqa: F401
    from .scaling import ModuleScale, module_scale, scale  # noqa: F401
    from .verification import VerifyReport, verify  # noqa: F401
