"""Build a merge plan from the base's headers and config and the adapter's, without tensor data.

`plan_merge` opens both inputs and refuses what cannot be merged; `build_plan` decides what
every output tensor becomes: the weights that come through quantization (plan/quantization.py), then
four passes over the adapter: full-tensor replacements, LoRA modules (plan/placement.py), trainable
tokens, then the tie rules (plan/ties.py). It also lays out the output shards and the config.json
changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.load import load_adapter
from ..adapter.module_scales import pattern_warnings
from ..adapter.relative import require_plain
from ..errors import MismatchError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint, open_checkpoint, shard_file_name
from ..formats.quant import QuantScheme, config_dtype
from ..formats.safetensors_file import FLOAT_DTYPES, tensor_nbytes
from .experts import as_expert_op, place_across_layouts
from .names import NameResolver
from .placement import check_shapes, make_op, place_concatenated, place_module, place_piece
from .quantization import QuantPlan, keep_quantized, merge_dtype, output_shape, plan_quantization
from .stacking import fold_plans
from .tensors import TORCH_DTYPE_NAMES, LoraOp, Plan, TensorPlan, output_dtype
from .ties import TieState


def plan_merge(
    base: str | os.PathLike[str] | Checkpoint,
    adapter: str | os.PathLike[str] | Adapter,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    allow_pickle: bool = False,
    collect_unmatched: bool = False,
    trained_on: QuantScheme | None = None,
    base_is_residual: bool = False,
    keep_quantization: bool = False,
) -> tuple[Checkpoint, Adapter, Plan]:
    """Open both inputs (unless given opened) and plan the merge (headers, config and quant states only).

    `dtype` is a parsed dtype (plan.tensors.parse_dtype): None keeps the base's. A quantized base is
    dequantized; `trained_on` quantizes an unquantized base's weights as they were in training. A StackedAdapter
    is planned adapter by adapter and folded (adapter.stacked.fold_plans). A PiSSA/OLoRA/
    CorDA/LoRA-GA adapter is refused unless it was made relative to the original base
    (adapter.relative.relative_to_original)
    or `base_is_residual` says BASE is its residual base. `keep_quantization` writes a quantized base's changed
    weights back in its format (plan.quantization.keep_quantized).
    """
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    parts = adapter.parts
    for part in parts:
        require_plain(part, base_is_residual=base_is_residual)
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    quant = plan_quantization(checkpoint, trained_on)
    if keep_quantization and len(parts) > 1:
        raise UnsupportedAdapterError(
            "[[keep_quantization=True]] merges one adapter; combine the adapters into one first "
            "(`[[rslora_tools.combine()]]`), then merge that"
        )
    plans = [
        build_plan(
            checkpoint,
            part,
            dtype=dtype,
            max_shard_size=max_shard_size,
            collect_unmatched=collect_unmatched,
            quant=quant,
            keep_quantization=keep_quantization,
        )
        for part in parts
    ]
    plan = fold_plans(adapter, plans) if adapter.stacked else plans[0]
    return checkpoint, adapter, plan


def build_plan(
    checkpoint: Checkpoint,
    adapter: Adapter,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    collect_unmatched: bool = False,
    quant: QuantPlan | None = None,
    keep_quantization: bool = False,
) -> Plan:
    """Decide, from headers and config alone, what every output tensor becomes.

    Adapter tensors that match no base tensor are an error, or, with `collect_unmatched` (for a
    dry run that shows everything at once), listed in `Plan.unmatched`.
    """
    quant = quant or QuantPlan()
    builder = _PlanBuilder(checkpoint, adapter, dtype, collect_unmatched, quant)
    builder.add_quantized()
    builder.add_replacements()
    builder.add_lora_modules()
    builder.add_tokens()
    extra = builder.tie.resolve(builder.plan_for, adapter, builder.notes, builder.warnings)
    if keep_quantization:
        quant = keep_quantized(builder.plans, quant, checkpoint)
        builder.note_kept(quant)
    shards = _layout(checkpoint, builder.plans, extra, builder.output_dtype, max_shard_size, quant)
    if builder.kept_fp32:
        kept = sorted(set(builder.kept_fp32))
        builder.notes.append(
            f"{len(kept)} tensors are written in F32, as transformers loads them "
            f"({builder.resolver.layouts.model_class} keeps them in float32; e.g. {kept[0]})"
        )
    index = None
    if len(shards) > 1 or (checkpoint.sharded and max_shard_size is None):
        index = dict(checkpoint.index_metadata or {})
    warnings = builder.warnings + [
        w.message for w in pattern_warnings(adapter.config, [m.name for m in adapter.lora_modules])
    ]
    if checkpoint.config is None:
        warnings.append(
            f"{checkpoint.folder} has no config.json, so the merged model has none either: transformers "
            "cannot load it without one (copy the base model's config.json into OUT)"
        )
    return Plan(
        shards,
        _config_updates(checkpoint, builder, dtype, quant),
        builder.notes,
        warnings,
        builder.unmatched,
        index,
        quantization=quant.scheme,
        prequantized=quant.prequantized,
        keep_quantization=quant.keep,
    )


class _PlanBuilder:
    """The state of one build_plan call: a TensorPlan per changed base tensor, notes, warnings, unmatched keys."""

    def __init__(
        self, checkpoint: Checkpoint, adapter: Adapter, dtype: str | None, collect_unmatched: bool, quant: QuantPlan
    ):
        self.checkpoint, self.adapter, self.dtype = checkpoint, adapter, dtype
        self.collect_unmatched = collect_unmatched
        self.quant = quant
        self.resolver = NameResolver(checkpoint, extra=quant.names())
        self.tie = TieState(checkpoint, self.resolver)
        self.plans: dict[str, TensorPlan] = {}
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.unmatched: list[str] = []
        self.where = adapter.weights_path
        self.load_dtype = dtype or config_dtype(checkpoint.config)  # what transformers would load the model in
        self.tied_outputs: set[int] = set()  # ops of output layers tied to the tensor they merge into
        self.kept_fp32: list[str] = []

    def output_dtype(self, name: str, stored: str) -> str:
        """A tensor's output dtype: the base's or --dtype's, or float32 where transformers holds it in float32 when it
        loads the model in half precision (`_keep_in_fp32_modules[_strict]`, or a parameter the model makes in
        float32; plan/layouts.py): PEFT merges such a tensor in float32 and saves it so."""
        out = output_dtype(stored, self.dtype)
        layouts = self.resolver.layouts
        if (
            out in ("BF16", "F16")
            and self.load_dtype in ("BF16", "F16")
            and layouts.fp32_possible
            and layouts.keeps_fp32(self.resolver.in_memory(name), self.load_dtype)
        ):
            self.kept_fp32.append(name)
            return "F32"
        return out

    def plan_for(self, name: str) -> TensorPlan:
        if name not in self.plans:
            info = self.checkpoint.info(name)
            self.plans[name] = TensorPlan(name, name, dtype=self.output_dtype(name, info.dtype), shape=info.shape)
        return self.plans[name]

    def add_quantized(self) -> None:
        """Weights whose base value is dequantized (or quantized as in training): merged in their compute dtype."""
        for name, source in self.quant.sources.items():
            compute = merge_dtype(source, self.checkpoint, name)
            self.plans[name] = TensorPlan(
                name,
                name,
                dtype=output_dtype(compute, self.dtype),
                shape=output_shape(source, self.checkpoint, name),
                quant=source,
            )
        scheme = self.quant.scheme
        if self.quant.prequantized and scheme is not None:
            dtypes = sorted({p.dtype for p in self.plans.values() if p.quant is not None})
            self.notes.append(
                f"the base is quantized ({scheme.label}): {len(self.quant.sources)} weights are "
                f"dequantized and merged in {', '.join(dtypes)}; quantization_config leaves config.json"
            )
            config = self.checkpoint.config or {}
            model_dtype = config_dtype(config)
            if self.dtype is None and model_dtype is not None and dtypes != [model_dtype]:
                self.warnings.append(
                    f"the dequantized weights are written in {', '.join(dtypes)} (the dtype the quantized layers "
                    f"compute "
                    f"in), the model's other weights are {model_dtype}, which is what transformers loads them as; "
                    f"pass "
                    "--dtype for one dtype throughout"
                )
        elif scheme is not None:
            self.notes.append(
                f"merged as trained on {scheme.label}: {len(self.quant.sources)} weights are quantized "
                "and dequantized as bitsandbytes does, then merged"
            )

    def note_kept(self, kept: QuantPlan) -> None:
        """--keep-quantization: the note on dequantizing every weight becomes one on the weights quantized back."""
        assert kept.scheme is not None
        self.notes = [n for n in self.notes if not n.startswith("the base is quantized")]
        self.warnings = [w for w in self.warnings if not w.startswith("the dequantized weights are written")]
        self.notes.append(
            f"the base's format is kept ({kept.scheme.label}): {kept.changed} of "
            f"{len(self.quant.sources)} quantized weights are changed by the adapter, merged and quantized "
            "back; every other stored tensor is copied as it is, and quantization_config stays"
        )
        if kept.fused:
            self.notes.append(
                f"{kept.fused} groups of weights that vLLM and SGLang load as one layer (q/k/v, gate/up) keep one "
                "weight_global_scale each, as llm-compressor writes them: the group's smallest after the merge; a "
                "member the adapter leaves unchanged is copied as it is unless the merge widens its group's range, "
                "then quantized again with the group's scale"
            )

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self.plans[name].shape if name in self.plans else self.checkpoint.info(name).shape

    def no_match(self, message: str, keys: list[str]) -> None:
        if not self.collect_unmatched:
            raise MismatchError(message)
        self.unmatched.extend(keys)

    def add_replacements(self) -> None:
        """Full tensors saved in the adapter (modules_to_save, bias="all"/"lora_only", saved embeddings)."""
        adapter = self.adapter
        for path, key in adapter.replacements.items():
            target = self.resolver.find(path)
            if target is None and self.tie.is_missing_head(path):
                self.tie.add_head_replacement(key)
                continue
            if target is None:
                self.no_match(f"{self.where}: adapter tensor {key!r} matches no tensor in the base checkpoint", [key])
                continue
            plan = self.plan_for(target)
            shape = adapter.shapes[key]
            if shape != plan.shape:
                grown = len(shape) == 2 and len(plan.shape) == 2 and shape[1] == plan.shape[1]
                if not (grown and self.tie.is_vocabulary(target)):
                    raise MismatchError(
                        f"{self.where}: adapter tensor {key!r} has shape {list(shape)} but base tensor {target!r} "
                        f"has {list(plan.shape)}"
                    )
                self.notes.append(f"{target}: vocabulary resized from {plan.shape[0]} to {shape[0]} rows")
                plan.shape = shape
            if adapter.dtypes[key] not in FLOAT_DTYPES and plan.dtype in FLOAT_DTYPES:
                raise MismatchError(f"{self.where}: adapter tensor {key!r} has dtype {adapter.dtypes[key]}")
            plan.replacement = key
            plan.source = None
            plan.quant = None  # the adapter's copy is the whole value
            self.tie.note_target(target, "replacement")

    def add_lora_modules(self) -> None:
        model_type = (self.checkpoint.config or {}).get("model_type")
        layouts = self.resolver.layouts
        for module in self.adapter.lora_modules:
            target, op = place_module(module, self.adapter, self.shape_of, self.resolver, model_type)
            if not module.is_lora:  # another tuner's module: on its own weight only (plan/placement.py)
                if target is None:
                    self._unplaced(module)
                else:
                    self._add_op(module, target, op)
                continue
            if target is None and self.tie.is_missing_head(module.name + ".weight"):
                self.tie.add_head_lora(module, self.adapter)
                continue
            placed = (
                [(target, as_expert_op(op, module, layouts))] if target is not None else self._place_elsewhere(module)
            )
            if not placed:
                self._unplaced(module)
                continue
            for target, op in placed:
                self._add_op(module, target, op)
        self._note_layouts()

    def _place_elsewhere(self, module: LoraModule) -> list[tuple[str, LoraOp]] | None:
        """A module whose weight transformers makes from stored tensors on loading: cut from one (a piece of its
        rows), concatenated from several, or stacked with the other experts'."""
        piece = place_piece(module, self.adapter, self.shape_of, self.resolver)
        if piece is not None:
            return [piece]
        tied = self._tied_source(module)
        if tied is not None:
            return [tied]
        return place_concatenated(module, self.adapter, self.shape_of, self.resolver) or place_across_layouts(
            module, self.adapter, self.resolver, self.shape_of, self.resolver.layouts
        )

    def _tied_source(self, module: LoraModule) -> tuple[str, LoraOp] | None:
        """A Linear LoRA on an output layer tied to an input embedding (BLIP's text decoder, LUKE's entity decoder):
        the checkpoint stores only the embedding, the two are one parameter in memory, and PEFT's merge adds the
        delta to it, so the embedding changes too (lm_head ties go through plan/ties.py instead)."""
        source = self.resolver.layouts.tied_to(module.name + ".weight")
        if source is None or "*" in source or module.name.split(".")[-1] == "lm_head" or module.embedding:
            return None
        stored = self.resolver.find(source, record=False)
        if stored is None or len(self.adapter.shapes[module.a_key]) != 2:
            return None
        a, b = self.adapter.shapes[module.a_key], self.adapter.shapes[module.b_key]
        if self.shape_of(stored) != (b[0], a[1]):
            raise MismatchError(
                f"{self.where}: module {module.name!r} is tied to {stored!r} "
                f"{list(self.shape_of(stored))}, which LoRA A{list(a)} and B{list(b)} do not fit"
            )
        self.warnings.append(
            f"{module.name} is tied to {stored} (one parameter in the model): its LoRA is merged "
            "into that tensor, as PEFT merges it, so the input embedding changes too"
        )
        op = make_op(module, self.adapter, "linear", (b[0], a[1]), False)
        self.tied_outputs.add(id(op))  # the tie stays: one parameter (plan/ties.py's lm_head rules do not apply)
        return stored, op

    def _add_op(self, module: LoraModule, target: str, op: LoraOp) -> None:
        plan = self.plan_for(target)
        self._check_float(module, target)
        if op.part is not None and not op.part.fused_factors and plan.lora is not None:
            if plan.lora.part is None or any(o.part == op.part for o in plan.all_lora):
                raise MismatchError(
                    f"{self.where}: two adapter modules change the same part of base tensor {target!r}"
                )
            plan.parts = (*plan.parts, op)
            return
        if op.delta_rows is not None:
            if plan.lora is not None:
                raise MismatchError(f"{self.where}: two adapter modules target base tensor {target!r}")
            plan.lora = op
            self.tie.note_target(target, "lora")
            return
        if op.rows is not None:
            if plan.lora is not None and plan.lora.rows is None or any(o.rows == op.rows for o in plan.all_lora):
                raise MismatchError(
                    f"{self.where}: two adapter modules change the same rows of base tensor {target!r}"
                )
            check_shapes(op, self.adapter, (op.rows[1] - op.rows[0], *plan.shape[1:]), target)
            if plan.lora is None:
                plan.lora = op
                self.tie.note_target(target, "lora")
            else:
                plan.parts = (*plan.parts, op)
            return
        if plan.lora is not None:
            raise MismatchError(f"{self.where}: two adapter modules target base tensor {target!r}")
        if module.is_lora:  # another tuner's shapes are checked where it is placed
            check_shapes(op, self.adapter, plan.shape, target)
        plan.lora = op
        if id(op) not in self.tied_outputs:
            self.tie.note_target(target, "lora")
        if module.bias_key is not None:
            self._add_lora_bias(module, target)
            self.plan_for(target.rsplit(".", 1)[0] + ".bias").bias_of = op

    def _note_layouts(self) -> None:
        """Say what was mapped: adapter names in the checkpoint's other naming, experts across layouts."""
        if self.resolver.renamed:
            path, target = next(iter(self.resolver.renamed.items()))
            self.notes.append(
                f"{len(self.resolver.renamed)} adapter names follow the architecture's other naming and "
                f"were mapped to the checkpoint's (e.g. {path} -> {target})"
            )
        ops = [op for p in self.plans.values() for op in p.all_lora if op.part is not None]
        if any(op.part.fused_factors for op in ops if op.part is not None):
            self.notes.append(
                "fused expert LoRA (target_parameters) applied to the checkpoint's per-expert tensors, "
                "expert by expert"
            )
        if any(not op.part.fused_factors for op in ops if op.part is not None):
            self.notes.append(
                "per-expert LoRA applied to the checkpoint's fused expert parameters, each to its expert's slice"
            )

    def _unplaced(self, module: LoraModule) -> None:
        tied = self.resolver.layouts.tied_to(module.name + ".weight")
        if tied is not None and not module.name.endswith("lm_head"):
            raise UnsupportedAdapterError(
                f"{self.where}: adapter module {module.name!r}: its weight is tied to {tied} (the checkpoint stores "
                f"only that one; {self.resolver.layouts.model_class} ties them); rslora-tools merges LoRA on a tied "
                "output layer only for lm_head; merge this adapter with PEFT"
            )
        names = [
            module.name + ".weight",
            *(f"{module.name}.{p}" for p in sorted(self.resolver.own_parameters(module.name) or ())),
        ]
        made = next((m for m in map(self.resolver.converted, names) if m is not None), None)
        if made is not None and made.converter is not None:
            ops = " + ".join(op for op, _ in made.converter.ops)
            raise UnsupportedAdapterError(
                f"{self.where}: adapter module {module.name!r}: transformers makes its weight on loading by "
                f"{ops} of the checkpoint's {', '.join(made.converter.sources)} ({self.resolver.layouts.model_class}"
                "'s conversion rules), which rslora-tools does not merge across; merge this adapter with PEFT"
            )
        self.no_match(
            f"{self.where}: adapter module {module.name!r} (tensor {module.keys[0]!r}) matches no tensor in the base "
            f"checkpoint",
            module.keys,
        )

    def _add_lora_bias(self, module: LoraModule, target: str) -> None:
        layer = target.rsplit(".", 1)[0]
        if layer + ".bias" not in self.checkpoint.weight_map:
            raise UnsupportedAdapterError(
                f"{self.where}: module {module.name!r} has lora_bias but base layer {layer!r} has no bias; "
                "PEFT cannot merge this either"
            )
        self._check_float(module, layer + ".bias")

    def _check_float(self, module: LoraModule, target: str) -> None:
        """A delta is added in floating point: an integer, boolean or float8 base tensor cannot take it."""
        dtype = self.plan_for(target).dtype
        if dtype not in FLOAT_DTYPES:
            raise UnsupportedAdapterError(
                f"{self.where}: module {module.name!r} changes base tensor {target!r}, which has dtype {dtype}; a "
                f"LoRA "
                f"delta merges only into floating-point tensors ({', '.join(sorted(FLOAT_DTYPES))}), and PEFT cannot "
                "merge it either"
            )

    def add_tokens(self) -> None:
        """Trainable tokens: rows of an embedding (or head) replaced by the saved rows."""
        adapter = self.adapter
        for path, key in adapter.token_deltas.items():
            target = self.resolver.find(path + ".weight")
            indices = _token_indices(adapter, path, key)
            if target is None and self.tie.is_missing_head(path + ".weight"):
                self.tie.add_head_tokens((key, indices))
                continue
            if target is None:
                self.no_match(
                    f"{self.where}: trainable tokens of {path!r} match no tensor in the base checkpoint", [key]
                )
                continue
            plan = self.plan_for(target)
            if any(i >= plan.shape[0] for i in indices) or adapter.shapes[key] != (len(indices), plan.shape[1]):
                raise MismatchError(
                    f"{self.where}: trainable tokens {key!r} ({list(adapter.shapes[key])}, indices up to "
                    f"{max(indices)}) "
                    f"do not fit {target!r} {list(plan.shape)}"
                )
            plan.tokens = (key, indices)
            self.tie.note_target(target, "tokens")


def _token_indices(adapter: Adapter, path: str, key: str) -> list[int]:
    spec = adapter.config.trainable_token_indices
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if path == name or path.endswith("." + name):
                return indices
    raise MismatchError(
        f"{adapter.path}: trainable tokens {key!r} have no matching trainable_token_indices in the config"
    )


def _config_updates(
    checkpoint: Checkpoint, builder: _PlanBuilder, dtype: str | None, quant: QuantPlan
) -> dict[str, Any]:
    config = checkpoint.config or {}
    updates: dict[str, Any] = {}
    embedding = builder.tie.embedding
    if embedding is not None and embedding in builder.plans:
        rows = builder.plans[embedding].shape[0]
        if config.get("vocab_size") is not None and config.get("vocab_size") != rows:
            updates["vocab_size"] = rows
    if builder.tie.untied:
        updates["tie_word_embeddings"] = False
    if quant.prequantized and not quant.keep:
        updates["quantization_config"] = None  # removed: the output is not quantized
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config or (key == "dtype" and "torch_dtype" not in config):
                updates[key] = TORCH_DTYPE_NAMES[dtype]
    return updates


def _layout(
    checkpoint: Checkpoint,
    plans: dict[str, TensorPlan],
    extra: list[tuple[str, TensorPlan]],
    dtype_of: Callable[[str, str], str],
    max_shard_size: int | None,
    quant: QuantPlan,
) -> list[tuple[str, list[TensorPlan]]]:
    """Output shards: the base's own layout (names kept), or re-sharded greedily with HF names.

    A quantized weight takes the place of its packed data; its auxiliary tensors are dropped.
    """
    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in checkpoint.shards:
        items = []
        for name, info in checkpoint.headers[shard].tensors.items():
            if name in quant.dropped:
                continue
            name = quant.anchors.get(name, name)
            plan = plans.get(name) or TensorPlan(name, name, dtype=dtype_of(name, info.dtype), shape=info.shape)
            items.append(plan)
            items.extend(quant.companions.get(name, ()))
            items.extend(p for anchor, p in extra if anchor == name)
        groups.append((shard, items))
    if max_shard_size is None:
        return groups
    ordered = [t for _, ts in groups for t in ts]
    buckets: list[list[TensorPlan]] = [[]]
    size = 0
    for t in ordered:
        n = tensor_nbytes(t.dtype, t.shape)
        if buckets[-1] and size + n > max_shard_size and t.written_with is None:  # scales stay with their codes
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += n
    return [(shard_file_name(i, len(buckets)), b) for i, b in enumerate(buckets)]
