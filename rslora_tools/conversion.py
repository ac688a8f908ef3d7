"""Stage 6, commands: `convert`, an adapter between conventions or for a serving runtime, keeping PEFT's scales.

Decide (`plan_conversion`): a no-op copy, a config-only rewrite (weights byte-identical), or
folding scales into the weights (`--bake`, the unit-scale form). Then write (`convert`): the
new config, the weights (copied as is, or rewritten with the conversion in the safetensors
metadata), every other file of the adapter folder, a note in its README, and a provenance file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__
from .adapter import PICKLE_NAME, WEIGHTS_NAME, Adapter, load_adapter
from .adapter_config import CONFIG_NAME
from .config_rewrite import convention_config, is_power_of_two, unit_config
from .errors import InputError, UnsupportedAdapterError
from .finite import check_finite
from .initial import RelativeAdapter, relative_to_original, require_plain, variant_name
from .module_scales import ModuleEntry, module_entries
from .checkpoint import checked_file, open_checkpoint
from .output import (
    atomic_file,
    atomic_folder,
    check_output_file,
    check_output_location,
    remove_leftovers,
    write_failure,
)
from .provenance import PROVENANCE_NAME, write_provenance
from .runtimes import RUNTIMES, Runtime, missing_features, runtime, runtime_scale
from .adapter_writer import AdapterWriter, check_config_finite, write_config
from .safetensors_file import read_header, safetensors_to_torch_dtype
from .scaling import Convention, convention_label, scale, unstable_patterns

CONVENTIONS: dict[str, bool] = {"rslora": True, "classic": False}
TARGETS = (*RUNTIMES, "unit")
Action = Literal["copy", "config", "bake", "unit", "gguf", "initial"]


@dataclass
class ConversionPlan:
    """What a conversion does: the new config, and per-module factors folded into lora_B (if any)."""

    action: Action
    config: dict[str, Any]
    factors: dict[tuple[str, int], float]  # (module name, depth) -> factor multiplied into its B (and lora bias)
    message: str


@dataclass
class ConvertReport:
    """What `convert` did (or would do); `to_dict()` is what `--json` prints."""

    adapter: str
    out: str
    action: str
    source_convention: str
    target: str
    modules: int
    message: str
    config_changes: dict[str, list[Any]] = field(default_factory=dict)
    weights_changed: bool = False
    weights_dtype: str | None = None
    dry_run: bool = False
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_conversion(adapter: Adapter, entries: list[ModuleEntry], *, to: str | None = None,
                    target: str | None = None, bake: bool = False) -> ConversionPlan:
    """Choose how to convert: `to` a convention ("rslora"/"classic"), or for a `target` runtime (or "unit")."""
    fields = adapter.config.normalized()
    current = adapter.config.convention
    if to is not None:
        use_rslora = CONVENTIONS[to]
        if to == current:
            return ConversionPlan("copy", fields, {}, f"the adapter is already {convention_label(to)}; copied unchanged")
        if bake:
            new = dict(fields, use_rslora=use_rslora)
            factors = {_key(e): e.scale.scale / scale(e.scale.alpha, e.scale.r, use_rslora) for e in entries}
            return ConversionPlan("bake", new, factors, f"{convention_label(current)} -> {convention_label(to)}: scale change folded into lora_B")
        new = convention_config(adapter, entries, use_rslora)
        return ConversionPlan("config", new, {}, f"{convention_label(current)} -> {convention_label(to)}: alphas rewritten, weights unchanged")

    if target == "unit" or target is None:
        return _unit_plan(adapter, entries, "unit-scale form (scale 1 in every runtime)")
    rt = runtime(target)
    lacks = missing_features(rt, adapter)
    if lacks:
        raise UnsupportedAdapterError(
            f"{rt.title} cannot serve this adapter: {'; '.join(lacks)}. Merge it into the base model "
            "instead (rslora-tools merge BASE ADAPTER OUT) and serve the merged model"
        )
    return _plan_for_runtime(adapter, entries, rt, fields)


def _plan_for_runtime(adapter: Adapter, entries: list[ModuleEntry], runtime: Runtime,
                      fields: dict[str, Any]) -> ConversionPlan:
    """The least change that makes `runtime` apply PEFT's scales: nothing, a config rewrite, or folding them in."""
    if runtime.honours_patterns and unstable_patterns(fields, [e.name for e in entries]):
        stable = convention_config(adapter, entries, adapter.config.use_rslora)
        return ConversionPlan("config", stable, {}, "pattern keys rewritten so that every PEFT version reads the same "
                                                    "per-module scales; weights unchanged")
    if _serves_right(runtime, fields, entries):
        return ConversionPlan("copy", fields, {}, f"{runtime.title} already applies PEFT's scale to every module; copied unchanged")
    try:
        rewritten = convention_config(adapter, entries, adapter.config.use_rslora and runtime.honours_rslora)
    except UnsupportedAdapterError:
        rewritten = None
    if rewritten is not None and _serves_right(runtime, rewritten, entries):
        return ConversionPlan("config", rewritten, {}, f"config rewritten so that {runtime.title} applies PEFT's scales; weights unchanged")
    if runtime.rank_from_shape:
        new = unit_config(adapter, entries, global_alpha_only=True)
        factors = {_key(e): e.scale.scale / scale(new["lora_alpha"], e.scale.r, False) for e in entries}
        return ConversionPlan("unit", new, factors,
                              f"scales folded into lora_B so that {runtime.title}'s alpha/rank per tensor gives PEFT's scale")
    return _unit_plan(adapter, entries, f"{runtime.title} {_ignored(runtime, adapter)}: scales folded into lora_B (unit-scale form)")


def _unit_plan(adapter: Adapter, entries: list[ModuleEntry], message: str) -> ConversionPlan:
    return ConversionPlan("unit", unit_config(adapter, entries), {_key(e): e.scale.scale for e in entries}, message)


def _key(e: ModuleEntry) -> tuple[str, int]:
    return (e.module.name, e.module.depth)


def _serves_right(runtime: Runtime, fields: dict[str, Any], entries: list[ModuleEntry]) -> bool:
    return all(runtime_scale(runtime, fields, e) == e.scale.scale for e in entries)


def _ignored(runtime: Runtime, adapter: Adapter) -> str:
    """What the runtime does not do with this adapter's scale fields, as a phrase."""
    cfg = adapter.config
    parts = []
    if cfg.use_rslora and runtime.rslora != "honoured":
        parts.append("refuses use_rslora" if runtime.rslora == "refused" else "ignores use_rslora")
    if (cfg.rank_pattern or cfg.alpha_pattern) and not runtime.honours_patterns:
        parts.append("ignores rank_pattern/alpha_pattern")
    return " and ".join(parts) or "cannot express these per-module scales"


def convert(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: str | None = None,
    target: str | None = None,
    bake: bool = False,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_pickle: bool = False,
    source: dict[str, Any] | None = None,
    allow_nonfinite: bool = False,
    initial: str | os.PathLike[str] | None = None,
) -> ConvertReport:
    """Convert ADAPTER into OUT so that it is served with PEFT's exact per-module scales.

    Args:
        adapter: the adapter folder.
        out: the output folder, or a `.gguf` file for `target="llama.cpp"`.
        to: "rslora" or "classic": rewrite the alphas (or, with `bake`, fold the change into lora_B).
        target: a runtime name from `runtimes.RUNTIMES`, or "unit": what that runtime needs.
        bake: with `to`, fold the scale change into lora_B instead of rewriting alphas.
        base: the base model folder (needed for a `.gguf` OUT: the architecture's tensor names).
        overwrite: replace an existing OUT.
        dry_run: decide and report, write nothing.
        allow_pickle: read an adapter that exists only as `adapter_model.bin` (weights_only).
        source: where ADAPTER came from (a hub.Source as a dict), recorded in OUT's provenance file.
        allow_nonfinite: convert an adapter whose weights hold NaN or Inf (refused by default).
        initial: for a PiSSA, OLoRA, CorDA or LoRA-GA adapter, the adapter saved right after initialisation:
            the result is relative to the original base (rank 2r, initial.relative_to_original); alone, or with
            `to`/`target` applied on top.

    Returns:
        A `ConvertReport`: the action taken (copy, config rewrite, bake, unit form, GGUF) and the changes.
    """
    started = time.monotonic()
    _check_choice(to, target, initial is not None)
    out = Path(out)
    loaded = load_adapter(adapter, allow_pickle=allow_pickle)
    if initial is not None:
        loaded = relative_to_original(loaded, load_adapter(initial, allow_pickle=allow_pickle))
    require_plain(loaded)
    entries = module_entries(loaded)
    if not allow_nonfinite and not dry_run:
        for adapter_on_disk in loaded.sources:
            check_finite(adapter_on_disk)
    if out.suffix == ".gguf":
        if target is None or target == "unit" or runtime(target).name != "llama.cpp":
            raise InputError(f"{out}: a .gguf output is written only for --target llama.cpp")
        if base is None:
            raise InputError("--target llama.cpp with a .gguf OUT needs --base BASE (for the architecture's tensor names)")
        report = _convert_to_gguf(loaded, entries, Path(base), out, overwrite=overwrite, dry_run=dry_run,
                                  allow_nonfinite=allow_nonfinite)
    else:
        report = _convert_to_folder(loaded, entries, out, to=to, target=target, bake=bake, overwrite=overwrite,
                                    dry_run=dry_run, source=source, allow_nonfinite=allow_nonfinite)
    report.seconds = time.monotonic() - started
    return report


def _check_choice(to: str | None, target: str | None, initial: bool = False) -> None:
    if to is not None and target is not None or (to is None and target is None and not initial):
        raise InputError("choose one of --to-rslora, --to-classic or --target RUNTIME (or --initial INIT alone)")
    if to is not None and to not in CONVENTIONS:
        raise InputError(f"unknown convention {to!r}; use rslora or classic")
    if target is not None and target != "unit":
        runtime(target)  # an unknown runtime or version is an error before anything is read


def _convert_to_folder(loaded: Adapter, entries: list[ModuleEntry], out: Path, *, to: str | None, target: str | None,
                       bake: bool, overwrite: bool, dry_run: bool, source: dict[str, Any] | None,
                       allow_nonfinite: bool = False) -> ConvertReport:
    written = check_output_location(out, [a.path for a in loaded.sources], overwrite)
    if to is None and target is None:  # --initial alone
        plan = ConversionPlan("initial", loaded.config.normalized(), {}, "")
    else:
        plan = plan_conversion(loaded, entries, to=to, target=target, bake=bake)
    plan.message = _relative_message(loaded, plan.message)
    upcast = any(not is_power_of_two(abs(f)) for f in plan.factors.values() if f != 1.0)
    original = loaded.trained if isinstance(loaded, RelativeAdapter) and loaded.trained is not None else loaded
    report = ConvertReport(
        adapter=str(loaded.path), out=str(out), action=plan.action, source_convention=loaded.config.convention,
        target=to or target or "original base", modules=len(entries), message=plan.message,
        config_changes=_changes(original.config.normalized(), plan.config),
        weights_changed=any(f != 1.0 for f in plan.factors.values()) or not loaded.on_disk,
        weights_dtype="F32" if upcast or not loaded.on_disk else None, dry_run=dry_run,
    )
    _other_files(loaded)  # a side file that links out of the folder is refused before anything is written
    if dry_run:
        return report
    report.warnings += [f"removed {name}, left beside OUT by an earlier run that was killed"
                        for name in remove_leftovers(written)]
    convention: Convention = "rslora" if plan.config.get("use_rslora") else "classic"
    try:
        with atomic_folder(written, overwrite) as tmp:
            _write_adapter(loaded, plan, upcast, tmp, allow_nonfinite)
            _copy_other_files(loaded, tmp, plan)
            write_provenance(tmp, {
                "operation": "convert", "adapter": source or {"spec": str(loaded.path)},
                "base_model": loaded.config.base_model_name_or_path, "message": plan.message,
                "revision": loaded.config.revision, "from": loaded.config.convention, "target": report.target,
                "method": plan.action, "convention": convention,
            })
    except OSError as e:
        raise write_failure(out, e, "the conversion") from e
    return report


def _convert_to_gguf(loaded: Adapter, entries: list[ModuleEntry], base: Path, out: Path, *, overwrite: bool,
                     dry_run: bool, allow_nonfinite: bool = False) -> ConvertReport:
    from .gguf_export import plan_gguf, write_gguf

    checkpoint = open_checkpoint(base)
    written = check_output_file(out, [*(a.path for a in loaded.sources), checkpoint.folder], overwrite)
    plan = plan_gguf(loaded, entries, checkpoint)
    report = ConvertReport(
        adapter=str(loaded.path), out=str(out), action="gguf", source_convention=loaded.config.convention,
        target="llama.cpp", modules=len(entries), weights_changed=bool(plan.factors) or not loaded.on_disk,
        weights_dtype="F32", dry_run=dry_run, message=_relative_message(loaded, plan.message),
    )
    if not dry_run:
        report.warnings += [f"removed {name}, left beside OUT by an earlier run that was killed"
                            for name in remove_leftovers(written)]
        try:
            with atomic_file(written) as tmp:
                write_gguf(plan, loaded, tmp, allow_nonfinite=allow_nonfinite)
        except OSError as e:
            raise write_failure(out, e, "writing the GGUF file") from e
    return report


def _relative_message(loaded: Adapter, message: str) -> str:
    """A conversion's message, prefixed with the --initial step when there was one."""
    if not isinstance(loaded, RelativeAdapter):
        return message
    relative = f"{variant_name(loaded.trained or loaded)} adapter made relative to the original base ({loaded.form})"
    then = message.replace("weights unchanged", "no further change to the weights")
    return relative + (f"; then {then}" if then else "")


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """The scale fields that differ, as [before, after] (both configs normalized)."""
    keys = ("use_rslora", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights")
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def _write_adapter(adapter: Adapter, plan: ConversionPlan, upcast: bool, tmp: Path, allow_nonfinite: bool) -> None:
    """Copy config and weights byte for byte, or write them (adapter_writer) with the factors folded into each lora_B."""
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
        {"tool": f"rslora-tools {__version__}", "method": plan.action, "message": plan.message,
         "factors_folded_into_lora_B": len(scaled)}, sort_keys=True)
    import torch

    keys = list(adapter.shapes)
    out_dtype = {k: "F32" if upcast and k in lora_keys else adapter.dtypes[k] for k in keys}
    entries = [(k, out_dtype[k], adapter.shapes[k]) for k in keys]
    with AdapterWriter(tmp, plan.config, entries, metadata, allow_nonfinite=allow_nonfinite) as writer:
        for key in keys:
            tensor = adapter.tensor(key)
            if key in scaled or out_dtype[key] != adapter.dtypes[key]:
                tensor = (tensor.to(torch.float32) * scaled.get(key, 1.0)).to(safetensors_to_torch_dtype(out_dtype[key]))
            writer.write(key, tensor)


def _other_files(adapter: Adapter) -> list[Path]:
    """The adapter folder's other top-level files, which travel along (links out of the folder refused)."""
    skip = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, PROVENANCE_NAME}
    return [checked_file(adapter.path, path, "side file") for path in sorted(adapter.path.iterdir())
            if path.name not in skip and not path.name.startswith(".") and path.is_file()]


def _copy_other_files(adapter: Adapter, tmp: Path, plan: ConversionPlan) -> None:
    """Every other top-level file travels along; the README gets a note of the conversion."""
    for path in _other_files(adapter):
        if path.name == "README.md":
            text = path.read_text(encoding="utf-8", errors="replace")
            (tmp / path.name).write_text(text.rstrip("\n") + "\n\n" + _readme_note(plan), encoding="utf-8")
            continue
        shutil.copyfile(path, tmp / path.name)


def _readme_note(plan: ConversionPlan) -> str:
    return (
        "## Converted with rslora-tools\n\n"
        f"{plan.message[0].upper()}{plan.message[1:]} (rslora-tools {__version__}). "
        "Every module keeps the scale PEFT applied to the original adapter.\n"
    )
