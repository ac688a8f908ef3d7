"""The writer of `convert --target mlx`: a PEFT adapter written as the mlx-lm adapter that serves it (plan/mlx.py
decides how).

OUT gets mlx-lm's `adapter_config.json` and `adapters.safetensors` (lora_a = A^T of shape (in, r),
lora_b = B^T (r, out), m the DoRA magnitude), the adapter's other files (not its PEFT model card: `push` writes an
mlx-lm one), and the provenance file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..adapter.adapter import Adapter
from ..adapter.mlx import MLX_WEIGHTS_NAME
from ..adapter.module_scales import ModuleEntry
from ..adapter.writer import AdapterWriter
from ..formats.output import check_output_location, writing
from ..formats.provenance import write_provenance
from ..plan.convert import ConversionPlan
from ..plan.mlx import MlxModule, MlxPlan, plan_mlx
from .converted import ConvertReport, copy_other_files, other_files
from .options import OutputOptions

if TYPE_CHECKING:
    import torch


def convert_to_mlx(
    loaded: Adapter, entries: list[ModuleEntry], out: Path, options: OutputOptions, source: dict[str, Any]
) -> ConvertReport:
    """Write OUT as an mlx-lm adapter (or, with `dry_run`, say what it would be)."""
    written = check_output_location(out, [a.path for a in loaded.sources], options.overwrite, writes_adapter=True)
    plan = plan_mlx(loaded, entries)
    config = plan.config(loaded.config.base_model_name_or_path)
    report = ConvertReport(
        adapter=str(loaded.path),
        out=str(out),
        action="mlx",
        source_convention=loaded.config.convention,
        target="mlx-lm",
        modules=len(entries),
        message=plan.message,
        config_changes={"lora_parameters": [None, config["lora_parameters"]], "num_layers": [None, plan.num_layers]},
        weights_changed=True,
        weights_dtype="F32" if plan.upcast else None,
        dry_run=options.dry_run,
        relative_form=loaded.relative_form,
        source_format=loaded.source_format,
    )
    other_files(loaded)  # a side file that links out of the folder is refused before anything is written
    if options.dry_run:
        return report
    with writing(out, written, overwrite=options.overwrite, what="the conversion", warnings=report.warnings) as tmp:
        _write_mlx(loaded, plan, config, tmp, options.allow_nonfinite)
        copy_other_files(loaded, tmp, ConversionPlan("mlx", config, {}, plan.message), readme=False)
        write_provenance(
            tmp,
            {
                "operation": "convert",
                "adapter": source,
                "base_model": loaded.config.base_model_name_or_path,
                "message": plan.message,
                "revision": loaded.config.revision,
                "from": loaded.config.convention,
                "target": "mlx-lm",
                "method": "mlx",
                "convention": "mlx-lm",
            },
        )
    return report


def _write_mlx(adapter: Adapter, plan: MlxPlan, config: dict[str, Any], tmp: Path, allow_nonfinite: bool) -> None:
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for m in plan.modules:
        dtype_a, dtype_b = ("F32", "F32") if plan.upcast else (adapter.dtypes[m.a_key], adapter.dtypes[m.b_key])
        a_shape, b_shape = adapter.shapes[m.a_key], adapter.shapes[m.b_key]
        entries += [
            (f"{m.name}.lora_a", dtype_a, (a_shape[1], plan.rank)),
            (f"{m.name}.lora_b", dtype_b, (plan.rank, b_shape[0])),
        ]
        if m.magnitude_key is not None:
            entries.append((f"{m.name}.m", adapter.dtypes[m.magnitude_key], (b_shape[0],)))
    metadata = {
        "format": "mlx",
        "rslora_tools.conversion": json.dumps(
            {"tool": f"rslora-tools {__version__}", "method": "mlx", "message": plan.message}, sort_keys=True
        ),
    }
    with AdapterWriter(
        tmp, config, entries, metadata, allow_nonfinite=allow_nonfinite, weights_name=MLX_WEIGHTS_NAME
    ) as writer:
        for m in plan.modules:
            a, b = mlx_factors(adapter, m, plan.rank, plan.upcast)
            writer.write(f"{m.name}.lora_a", a)
            writer.write(f"{m.name}.lora_b", b)
            if m.magnitude_key is not None:
                writer.write(f"{m.name}.m", adapter.tensor(m.magnitude_key))


def mlx_factors(adapter: Adapter, module: MlxModule, rank: int, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a (in, rank) and lora_b (rank, out) of one module: PEFT's A^T and B^T, the factor folded into lora_b,
    zero-padded to `rank`."""
    import torch

    a, b = adapter.tensor(module.a_key), adapter.tensor(module.b_key)
    if upcast:
        a, b = a.float(), b.float()
    if module.factor != 1.0:
        b = (b.float() * module.factor).to(b.dtype)
    lora_a, lora_b = a.t(), b.t()
    if module.rank < rank:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(lora_a.shape[0], rank - module.rank)], dim=1)
        lora_b = torch.cat([lora_b, lora_b.new_zeros(rank - module.rank, lora_b.shape[1])], dim=0)
    return lora_a.contiguous(), lora_b.contiguous()
