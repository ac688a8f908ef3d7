"""`convert`, an adapter between conventions or for a serving runtime, keeping PEFT's scales.

plan/convert.py decides (a no-op copy, a config-only rewrite with byte-identical weights, or
scales folded into the weights: `--bake`, the unit-scale form), plan/gguf.py for a `.gguf` OUT.
This module resolves the adapter (a folder or a Hub repo), checks the options (`ConvertOptions`),
and writes: the new config, the weights (copied as is, or rewritten with the conversion in the
safetensors metadata), every other file of the adapter folder, a note in its README, and a
provenance file; then pushes OUT when asked.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapter.adapter import WEIGHTS_NAME, Adapter
from ..adapter.config import CONFIG_NAME
from ..adapter.config_rewrite import is_power_of_two
from ..adapter.load import load_adapter
from ..adapter.module_scales import ModuleEntry, module_entries
from ..adapter.relative import relative_to_original, require_plain, variant_name
from ..adapter.runtimes import runtime
from ..adapter.scaling import Convention
from ..adapter.writer import AdapterWriter, check_config_finite, write_config
from ..compute.finite import check_finite
from ..errors import OptionError
from ..execute.converted import ConvertReport, config_changes, copy_other_files, other_files
from ..formats.checkpoint import open_checkpoint
from ..formats.output import check_output_file, check_output_location, writing
from ..formats.provenance import write_provenance
from ..formats.safetensors_file import read_header, safetensors_to_torch_dtype
from ..plan.convert import ConversionPlan, plan_conversion
from .common import (
    AdapterSpec,
    adapter_input,
    base_input,
    check_order,
    check_push,
    lora_only,
    publish,
    with_fields,
)
from .options import ConvertOptions


def convert(
    adapter: AdapterSpec,
    out: str | os.PathLike[str],
    *,
    options: ConvertOptions | None = None,
    **fields: Any,
) -> ConvertReport:
    """Convert ADAPTER into OUT so that it is served with PEFT's exact per-module scales.

    Args:
        adapter: the adapter: a folder, a Hub repo or a loaded `Adapter`.
        out: the output folder, or a `.gguf` file for `target="llama.cpp"` (with `base`).
        options: a `ConvertOptions`; keyword arguments are taken as its fields (`target="vllm"`, `to="classic"`).

    Returns:
        A `ConvertReport`: the action taken (copy, config rewrite, bake, unit form, GGUF) and the changes.
    """
    started = time.monotonic()
    options = with_fields(options, ConvertOptions, fields)
    out = Path(out)
    gguf = out.suffix == ".gguf"
    if gguf and (options.target is None or options.target == "unit" or runtime(options.target).name != "llama.cpp"):
        raise OptionError(f"{out}: a .gguf output is written only for [[target]] llama.cpp")
    if gguf and options.base is None:
        raise OptionError(
            "[[target]] llama.cpp with a .gguf OUT needs [[base=BASE]] (for the architecture's tensor names)"
        )
    if gguf and options.push is not None:
        raise OptionError("[[push=PushTarget(...)]] pushes a folder; push a .gguf file with: hf upload REPO FILE")
    if options.base is not None:
        check_order(
            "convert",
            "ADAPTER, OUT, base=BASE",
            [("ADAPTER", adapter, ("adapter",)), ("[[base]]", options.base, ("model", "merged"))],
        )
    path, source = adapter_input(
        adapter, revision=options.revision, token=options.token, allow_pickle=options.allow_pickle
    )
    check_push(options, {"adapter": source})
    loaded = path if isinstance(path, Adapter) else load_adapter(path, allow_pickle=options.allow_pickle)
    lora_only([loaded], "convert")
    report = convert_adapter(loaded, out, options, source)
    report.seconds = time.monotonic() - started
    return report


def convert_adapter(loaded: Adapter, out: Path, options: ConvertOptions, source: dict[str, Any]) -> ConvertReport:
    """`convert` of a loaded adapter (`source`: what OUT's provenance says it came from); pushes OUT when asked."""
    gguf = out.suffix == ".gguf"
    if options.initial is not None:
        init, _ = adapter_input(options.initial, token=options.token, allow_pickle=options.allow_pickle)
        loaded = relative_to_original(
            loaded, init if isinstance(init, Adapter) else load_adapter(init, allow_pickle=options.allow_pickle)
        )
    require_plain(loaded)
    entries = module_entries(loaded)
    if options.expert_layout is not None or options.key_layout is not None:
        from ..execute.relayout_writer import Relayout, relayout_adapter

        assert options.base is not None
        relayout = Relayout(options.base, expert_layout=options.expert_layout, key_layout=options.key_layout)
        base_folder = base_input(options.base, token=options.token).path
        report = relayout_adapter(loaded, entries, out, relayout, base_folder, options, source)
        pushed = publish(out, options)
        report.push = pushed.to_dict() if pushed is not None else None
        return report
    if not options.allow_nonfinite and not options.dry_run:
        for adapter_on_disk in loaded.sources:
            check_finite(adapter_on_disk)
    if gguf:
        assert options.base is not None
        base = base_input(options.base, token=options.token).path
        report = _convert_to_gguf(loaded, entries, base, out, options)
    elif (
        options.target is not None and options.target != "unit" and runtime(options.target).adapter_format == "mlx-lm"
    ):
        from ..execute.mlx_writer import convert_to_mlx

        report = convert_to_mlx(loaded, entries, out, options, source)
        pushed = publish(out, options)
        report.push = pushed.to_dict() if pushed is not None else None
    else:
        report = _convert_to_folder(loaded, entries, out, options, source)
        pushed = publish(out, options)
        report.push = pushed.to_dict() if pushed is not None else None
    return report


def _convert_to_folder(
    loaded: Adapter, entries: list[ModuleEntry], out: Path, options: ConvertOptions, source: dict[str, Any]
) -> ConvertReport:
    written = check_output_location(out, [a.path for a in loaded.sources], options.overwrite, writes_adapter=True)
    if options.to is None and options.target is None:  # --initial alone
        plan = ConversionPlan("initial", loaded.config.normalized(), {}, "")
    else:
        plan = plan_conversion(loaded, entries, to=options.to, target=options.target, bake=options.bake)
    plan.message = _relative_message(loaded, plan.message)
    upcast = any(not is_power_of_two(abs(f)) for f in plan.factors.values() if f != 1.0)
    report = ConvertReport(
        adapter=str(loaded.path),
        out=str(out),
        action=plan.action,
        source_convention=loaded.config.convention,
        target=options.to or options.target or "original base",
        modules=len(entries),
        message=plan.message,
        config_changes=config_changes(loaded.trained_adapter.config.normalized(), plan.config),
        weights_changed=any(f != 1.0 for f in plan.factors.values()) or not loaded.on_disk,
        weights_dtype="F32" if upcast or (not loaded.on_disk and loaded.source_format == "peft") else None,
        dry_run=options.dry_run,
        relative_form=loaded.relative_form,
        source_format=loaded.source_format,
    )
    other_files(loaded)  # a side file that links out of the folder is refused before anything is written
    if options.dry_run:
        return report
    convention: Convention = "rslora" if plan.config.get("use_rslora") else "classic"
    with writing(out, written, overwrite=options.overwrite, what="the conversion", warnings=report.warnings) as tmp:
        _write_adapter(loaded, plan, upcast, tmp, options.allow_nonfinite)
        copy_other_files(loaded, tmp, plan)
        write_provenance(
            tmp,
            {
                "operation": "convert",
                "adapter": source,
                "base_model": loaded.config.base_model_name_or_path,
                "message": plan.message,
                "revision": loaded.config.revision,
                "from": loaded.config.convention,
                "target": report.target,
                "method": plan.action,
                "convention": convention,
            },
        )
    return report


def _convert_to_gguf(
    loaded: Adapter, entries: list[ModuleEntry], base: Path, out: Path, options: ConvertOptions
) -> ConvertReport:
    from ..execute.gguf import write_gguf
    from ..plan.gguf import plan_gguf

    checkpoint = open_checkpoint(base)
    written = check_output_file(out, [*(a.path for a in loaded.sources), checkpoint.folder], options.overwrite)
    plan = plan_gguf(loaded, entries, checkpoint)
    report = ConvertReport(
        adapter=str(loaded.path),
        out=str(out),
        action="gguf",
        source_convention=loaded.config.convention,
        target="llama.cpp",
        modules=len(entries),
        weights_changed=bool(plan.factors) or not loaded.on_disk,
        weights_dtype="F32",
        dry_run=options.dry_run,
        message=_relative_message(loaded, plan.message),
        relative_form=loaded.relative_form,
    )
    if not options.dry_run:
        with writing(
            out,
            written,
            overwrite=options.overwrite,
            what="writing the GGUF file",
            warnings=report.warnings,
            single_file=True,
        ) as tmp:
            write_gguf(plan, loaded, tmp, allow_nonfinite=options.allow_nonfinite)
    return report


def _relative_message(loaded: Adapter, message: str) -> str:
    """A conversion's message, prefixed with the --initial step or the reading of an mlx-lm adapter."""
    if loaded.source_format == "mlx-lm":
        message = message.replace("copied unchanged", "written as PEFT's, unchanged")
        return f"mlx-lm adapter read as PEFT's (factors transposed, lora_alpha = scale * rank); {message}"
    if loaded.relative_form is None:
        return message
    relative = (
        f"{variant_name(loaded.trained_adapter)} adapter made relative to the original base ({loaded.relative_form})"
    )
    then = message.replace("weights unchanged", "no further change to the weights")
    return relative + (f"; then {then}" if then else "")


def _write_adapter(adapter: Adapter, plan: ConversionPlan, upcast: bool, tmp: Path, allow_nonfinite: bool) -> None:
    """Copy config and weights byte for byte, or write them (adapter_writer) with the factors folded into each
    lora_B."""
    if not plan.factors and adapter.weights_path.name == WEIGHTS_NAME and adapter.on_disk:
        if plan.action == "copy":
            shutil.copyfile(adapter.path / CONFIG_NAME, tmp / CONFIG_NAME)
        else:
            if not allow_nonfinite:
                check_config_finite(plan.config)
            write_config(tmp, plan.config)
        shutil.copyfile(adapter.weights_path, tmp / WEIGHTS_NAME)
        return
    scaled: dict[str, float] = {}
    lora_keys: set[str] = set()
    for m in adapter.lora_modules:
        factor = plan.factors.get((m.name, m.depth), 1.0)
        lora_keys.update(k for k in (m.a_key, m.b_key, m.bias_key) if k)
        for key in (m.b_key, m.bias_key):
            if key and factor != 1.0:
                scaled[key] = factor
    metadata = {"format": "pt"}
    if adapter.weights_path.name == WEIGHTS_NAME:
        metadata.update(read_header(adapter.weights_path).metadata or {})
    metadata["rslora_tools.conversion"] = json.dumps(
        {
            "tool": f"rslora-tools {__version__}",
            "method": plan.action,
            "message": plan.message,
            "factors_folded_into_lora_B": len(scaled),
        },
        sort_keys=True,
    )
    import torch

    keys = list(adapter.shapes)
    out_dtype = {k: "F32" if upcast and k in lora_keys else adapter.dtypes[k] for k in keys}
    entries = [(k, out_dtype[k], adapter.shapes[k]) for k in keys]
    with AdapterWriter(tmp, plan.config, entries, metadata, allow_nonfinite=allow_nonfinite) as writer:
        for key in keys:
            tensor = adapter.tensor(key)
            if key in scaled or out_dtype[key] != adapter.dtypes[key]:
                tensor = (tensor.to(torch.float32) * scaled.get(key, 1.0)).to(
                    safetensors_to_torch_dtype(out_dtype[key])
                )
            writer.write(key, tensor)
