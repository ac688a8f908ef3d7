"""The writer of `convert --expert-layout per-expert|fused` and `--key-layout base|transformers-5`: an adapter in
another layout.

plan/relayout.py decides the new tensors and config, compute/relayout.py makes them; this module reads BASE (its
config.json names the architecture, its checkpoint the tensors; commands/convert.py resolves it and pushes OUT when
asked) and writes OUT through the one adapter writer. Every module keeps its scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.module_scales import ModuleEntry
from ..adapter.writer import AdapterWriter
from ..errors import UnsupportedAdapterError
from ..formats.checkpoint import open_checkpoint
from ..formats.output import check_output_location, writing
from ..formats.provenance import write_provenance
from ..plan.convert import ConversionPlan
from ..plan.experts import ExpertSlot, expert_slot, fused_parameter
from ..plan.layouts import FUSED, Layouts
from ..plan.names import NameResolver
from ..plan.relayout import plan_relayout
from .converted import ConvertReport, config_changes, copy_other_files, other_files
from .options import OutputOptions


@dataclass(frozen=True)
class Relayout:
    """What `convert --expert-layout/--key-layout` rewrites, against which base (checked by ConvertOptions)."""

    base: str  # the base model (folder or Hub repo): its config names the architecture, its checkpoint the tensors
    expert_layout: str | None = None  # "per-expert" or "fused"
    key_layout: str | None = None  # "base" or "transformers-5"


def relayout_adapter(
    loaded: Adapter,
    entries: list[ModuleEntry],
    out: Path,
    relayout: Relayout,
    base: Path,
    options: OutputOptions,
    source: dict[str, Any],
) -> ConvertReport:
    """The adapter in `relayout`'s layouts against the base folder `base` (relayout.base resolved), written to OUT."""
    from ..compute.relayout import block_diagonal, same_a

    checkpoint = open_checkpoint(base)
    layouts = Layouts.of(checkpoint.config)
    if relayout.expert_layout is not None and not layouts.has_experts:
        _refuse_expert_layout(loaded, entries, checkpoint, layouts)
    written = check_output_location(
        out, [*(a.path for a in loaded.sources), checkpoint.folder], options.overwrite, writes_adapter=True
    )
    resolver = NameResolver(checkpoint, layouts=layouts)
    entries = [
        dataclasses.replace(e, name=fused_parameter(e.module, loaded, resolver, resolver.shape))
        if e.wrapping == "param"
        else e
        for e in entries
    ]
    zero_blocks = (
        _zero_blocks(loaded, entries, layouts, block_diagonal) if relayout.expert_layout == "per-expert" else {}
    )
    shared = _shared_a(loaded, entries, layouts, same_a) if relayout.expert_layout == "fused" else frozenset()
    plan = plan_relayout(
        loaded,
        entries,
        resolver,
        expert_layout=relayout.expert_layout,
        key_layout=relayout.key_layout,
        zero_blocks=zero_blocks,
        shared_a=shared,
    )
    report = ConvertReport(
        adapter=str(loaded.path),
        out=str(out),
        action="relayout",
        source_convention=loaded.config.convention,
        target=", ".join(
            f"{k} layout {v}" for k, v in (("expert", relayout.expert_layout), ("key", relayout.key_layout)) if v
        ),
        modules=len(entries),
        message=plan.message,
        config_changes=config_changes(loaded.config.normalized(), plan.config),
        weights_changed=True,
        dry_run=options.dry_run,
    )
    other_files(loaded)
    if not options.dry_run:
        _write(loaded, out, written, plan, options, source, report)
    return report


def _refuse_expert_layout(loaded: Adapter, entries: list[ModuleEntry], checkpoint: Any, layouts: Layouts) -> None:
    """Refuse an expert layout asked of a base whose experts have no per-expert naming (always raises)."""
    fused = [e for e in entries if e.wrapping == "param" and e.name.rpartition(".")[2] in FUSED]
    if fused:
        raise UnsupportedAdapterError(
            f"{loaded.path}: module {fused[0].module.name!r}: {layouts.model_class} models "
            "store their experts fused, and no per-expert naming of them exists in "
            "transformers' rules; keep the adapter fused"
        )
    model_type = (checkpoint.config or {}).get("model_type")
    raise UnsupportedAdapterError(
        f"{checkpoint.folder}: model_type {model_type!r} is not an MoE family whose "
        "expert layouts are known here (transformers fuses no experts of it; "
        "docs/peft-rules.md, 'Layouts')"
    )


def _write(
    loaded: Adapter,
    out: Path,
    written: Any,
    plan: Any,
    options: OutputOptions,
    source: dict[str, Any],
    report: ConvertReport,
) -> None:
    """The relaid adapter written to OUT, tensor by tensor, with its config, other files and provenance."""
    from ..compute.relayout import relayout_tensor

    read = loaded.tensor
    with writing(out, written, overwrite=options.overwrite, what="the conversion", warnings=report.warnings) as tmp:
        layout = []  # the header first (each tensor made once to learn its shape), then the tensors, one at a time
        for recipe in plan.recipes:
            tensor = relayout_tensor(recipe, read)
            layout.append((recipe.key, _dtype(tensor), tuple(tensor.shape)))
        with AdapterWriter(tmp, plan.config, layout, {"format": "pt"}, allow_nonfinite=options.allow_nonfinite) as w:
            for recipe in plan.recipes:
                w.write(recipe.key, relayout_tensor(recipe, read))
        copy_other_files(loaded, tmp, ConversionPlan("relayout", plan.config, {}, plan.message))
        write_provenance(
            tmp,
            {
                "operation": "convert",
                "adapter": source,
                "base_model": loaded.config.base_model_name_or_path,
                "message": plan.message,
                "target": report.target,
                "method": "relayout",
                "convention": loaded.config.convention,
            },
        )


def _zero_blocks(
    adapter: Adapter, entries: list[ModuleEntry], layouts: Layouts, block_diagonal: Any
) -> dict[str, tuple[bool, bool]]:
    """For each fused parameter of two parts (gate_up), whether its B is block-diagonal over the parts."""
    found = {}
    interleaved = layouts.hand is not None and layouts.hand.interleaved
    for entry in entries:
        if entry.wrapping == "param" and entry.name.rpartition(".")[2] == FUSED[0]:
            b = adapter.tensor(entry.module.b_key)
            experts = adapter.shapes[entry.module.a_key][0] // entry.scale.r
            gate, up = (ExpertSlot(entry.name, 0, part, 2, interleaved).rows(b.shape[0]) for part in (0, 1))
            assert gate is not None and up is not None
            found[entry.module.a_key] = block_diagonal(b, experts, gate, up)
    return found


def _shared_a(adapter: Adapter, entries: list[ModuleEntry], layouts: Layouts, same_a: Any) -> frozenset[str]:
    """The fused parameters whose per-expert gate and up LoRAs share A in every expert, with the same rank and
    scale."""
    pairs: dict[str, dict[tuple[int, int], ModuleEntry]] = {}
    for entry in entries:
        slot = expert_slot(entry.module.name + ".weight", layouts)
        if slot is not None and slot.parts == 2:
            pairs.setdefault(slot.fused, {})[(slot.expert, slot.part)] = entry
    shared = set()
    for fused, by in pairs.items():
        keys = [(by[(e, 0)], by.get((e, 1))) for e, part in by if part == 0]
        if all(
            up is not None
            and _same_scale(gate, up)
            and adapter.shapes[gate.module.a_key] == adapter.shapes[up.module.a_key]
            for gate, up in keys
        ) and same_a([(gate.module.a_key, up.module.a_key) for gate, up in keys if up is not None], adapter.tensor):
            shared.add(fused)
    return frozenset(shared)


def _same_scale(a: ModuleEntry, b: ModuleEntry) -> bool:
    return (a.scale.r, a.scale.scale, a.scale.use_rslora) == (b.scale.r, b.scale.scale, b.scale.use_rslora)


def _dtype(tensor: Any) -> str:
    from ..formats.safetensors_file import torch_to_safetensors_dtype

    return torch_to_safetensors_dtype(tensor.dtype)
