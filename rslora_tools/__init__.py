"""rslora-tools: merge, convert, inspect and publish PEFT LoRA / rsLoRA adapters, exactly and streaming.

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

from ._version import __version__

# torch warns at import when numpy is absent; rslora-tools never needs numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


# public name -> module that defines it
_EXPORTS = {
    "Adapter": "adapter.adapter",
    "AdapterConfig": "adapter.config",
    "load_adapter": "adapter.load",
    "Checkpoint": "formats.checkpoint",
    "open_checkpoint": "formats.checkpoint",
    "QuantScheme": "formats.quant",
    "trained_on_scheme": "formats.quant",
    "AdapterConfigError": "errors",
    "InputError": "errors",
    "MismatchError": "errors",
    "OutputError": "errors",
    "RsloraError": "errors",
    "UnsupportedAdapterError": "errors",
    "HubError": "errors",
    "OptionError": "errors",
    "PushAfterWriteError": "errors",
    "MergeOptions": "execute.options",
    "MergeReport": "execute.merge_job",
    "merge": "commands.merge",
    "StreamOptions": "execute.options",
    "StreamReport": "execute.hub_stream",
    "ConvertOptions": "commands.options",
    "ConvertReport": "execute.converted",
    "convert": "commands.convert",
    "CombineOptions": "commands.options",
    "CombineReport": "commands.combine",
    "combine": "commands.combine",
    "ExtractOptions": "commands.options",
    "ExtractReport": "commands.extract",
    "extract": "commands.extract",
    "VerifyOptions": "commands.options",
    "VerifyReport": "execute.recompute",
    "verify": "commands.verify",
    "InspectOptions": "commands.options",
    "InspectReport": "commands.inspect",
    "inspect_adapter": "commands.inspect",
    "PushReport": "hub.push",
    "PushTarget": "hub.target",
    "push": "hub.push",
    "Source": "hub.resolve",
    "resolve_input": "hub.resolve",
    "ModuleScale": "adapter.scaling",
    "module_scale": "adapter.scaling",
    "scale": "adapter.scaling",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from .adapter.adapter import Adapter  # noqa: F401
    from .adapter.config import AdapterConfig  # noqa: F401
    from .adapter.load import load_adapter  # noqa: F401
    from .adapter.scaling import ModuleScale, module_scale, scale  # noqa: F401
    from .commands.combine import CombineReport, combine  # noqa: F401
    from .commands.convert import convert  # noqa: F401
    from .commands.extract import ExtractReport, extract  # noqa: F401
    from .commands.inspect import InspectReport, inspect_adapter  # noqa: F401
    from .commands.merge import merge  # noqa: F401
    from .commands.options import (  # noqa: F401
        CombineOptions,
        ConvertOptions,
        ExtractOptions,
        InspectOptions,
        VerifyOptions,
    )
    from .commands.verify import verify  # noqa: F401
    from .errors import (  # noqa: F401
        AdapterConfigError,
        HubError,
        InputError,
        MismatchError,
        OptionError,
        OutputError,
        PushAfterWriteError,
        RsloraError,
        UnsupportedAdapterError,
    )
    from .execute.converted import ConvertReport  # noqa: F401
    from .execute.hub_stream import StreamReport  # noqa: F401
    from .execute.merge_job import MergeReport  # noqa: F401
    from .execute.options import MergeOptions, StreamOptions  # noqa: F401
    from .execute.recompute import VerifyReport  # noqa: F401
    from .formats.checkpoint import Checkpoint, open_checkpoint  # noqa: F401
    from .formats.quant import QuantScheme, trained_on_scheme  # noqa: F401
    from .hub.push import PushReport, push  # noqa: F401
    from .hub.resolve import Source, resolve_input  # noqa: F401
    from .hub.target import PushTarget  # noqa: F401
