"""Adapter modules -> base tensors: what each output tensor becomes, at which scale.

The plan is computed from headers and the config alone (no tensor data), so it is also what a
dry run shows. Each output tensor gets a `TensorPlan`: where its starting value comes from
(the base tensor, or a full replacement saved in the adapter) and the LoRA delta, lora_bias or
trainable-token rows applied on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .adapter import Adapter, LoraModule
from .checkpoint import Checkpoint
from .errors import MismatchError, UnsupportedAdapterError
from .safetensors_file import FLOAT_DTYPES
from .scaling import ModuleScale

# Architectures whose linear layers are transformers' Conv1D ((in, out) weights; PEFT's fan_in_fan_out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "gpt_bigcode_conv1d"}
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")
DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}


@dataclass
class LoraOp:
    """Add one LoRA module's delta (or apply DoRA) to a weight."""

    module: LoraModule
    kind: str  # linear | embedding | conv | experts | param | mha (in_proj) | mha_out
    scale: ModuleScale
    transpose: bool = False  # linear: Conv1D layout (W is (in, out)); experts: W[e] is (in, out)
    experts: int = 1
    dora: bool = False


@dataclass
class TensorPlan:
    """How to produce one output tensor."""

    name: str
    source: str | None  # base tensor to start from (None when a replacement gives the whole value)
    replacement: str | None = None  # adapter key of a full tensor that replaces the base value
    lora: LoraOp | None = None
    bias_of: LoraOp | None = None  # add lora_B.bias * scale of this module
    tokens: tuple[str, list[int]] | None = None  # (adapter key, row indices) of trainable tokens
    dtype: str = ""
    shape: tuple[int, ...] = ()

    @property
    def untouched(self) -> bool:
        return self.replacement is None and self.lora is None and self.bias_of is None and self.tokens is None


@dataclass
class Plan:
    """The whole merge: output tensors grouped by output shard, and what changes in config.json."""

    shards: list[tuple[str, list[TensorPlan]]]
    config_updates: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # adapter keys that match nothing (dry runs only)

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for _, ts in self.shards for t in ts]

    @property
    def lora_ops(self) -> list[LoraOp]:
        return [t.lora for t in self.tensors if t.lora is not None]


class _Resolver:
    """Map module paths from the adapter to tensor names in the checkpoint (prefix differences allowed)."""

    def __init__(self, checkpoint: Checkpoint):
        self.names = set(checkpoint.weight_map)
        self.prefixes = sorted({n.split(".", 1)[0] for n in self.names if "." in n})

    def find(self, path: str) -> str | None:
        if path in self.names:
            return path
        candidates = set()
        if "." in path and path.split(".", 1)[1] in self.names:
            candidates.add(path.split(".", 1)[1])
        for prefix in self.prefixes:
            if f"{prefix}.{path}" in self.names:
                candidates.add(f"{prefix}.{path}")
        if len(candidates) > 1:
            raise MismatchError(
                f"adapter module path {path!r} matches several base tensors ({', '.join(sorted(candidates))}); "
                "the prefix mapping is ambiguous"
            )
        return candidates.pop() if candidates else None


def output_dtype(base_dtype: str, dtype: str | None) -> str:
    """The output dtype of a tensor: the base's, or the requested one for floating tensors."""
    if dtype is None or dtype == "auto" or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return DTYPE_NAMES[dtype]


def build_plan(
    checkpoint: Checkpoint,
    adapter: Adapter,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    collect_unmatched: bool = False,
) -> Plan:
    """Decide, from headers and config alone, what every output tensor becomes.

    Adapter tensors that match no base tensor are an error, or, with `collect_unmatched` (for a
    dry run that shows everything at once), listed in `Plan.unmatched`.
    """
    unmatched: list[str] = []

    def no_match(message: str, keys: list[str]) -> None:
        if not collect_unmatched:
            raise MismatchError(message)
        unmatched.extend(keys)

    resolver = _Resolver(checkpoint)
    cfg = adapter.config
    plans: dict[str, TensorPlan] = {}
    notes: list[str] = []
    warnings: list[str] = []

    def plan_for(name: str) -> TensorPlan:
        if name not in plans:
            info = checkpoint.info(name)
            plans[name] = TensorPlan(name, name, dtype=output_dtype(info.dtype, dtype), shape=info.shape)
        return plans[name]

    model_type = (checkpoint.config or {}).get("model_type")
    tie = _TieState(checkpoint, resolver)
    where = adapter.weights_path

    # 1. Full-tensor replacements (modules_to_save, bias="all"/"lora_only", saved embeddings).
    for path, key in adapter.replacements.items():
        target = resolver.find(path)
        if target is None and tie.is_missing_head(path):
            tie.head_ops.append(("replacement", path, key))
            continue
        if target is None:
            no_match(f"{where}: adapter tensor {key!r} matches no tensor in the base checkpoint", [key])
            continue
        plan = plan_for(target)
        shape = adapter.shapes[key]
        if shape != plan.shape:
            if not (len(shape) == 2 and len(plan.shape) == 2 and shape[1] == plan.shape[1] and _is_vocab(target, tie)):
                raise MismatchError(
                    f"{where}: adapter tensor {key!r} has shape {list(shape)} but base tensor {target!r} "
                    f"has {list(plan.shape)}"
                )
            notes.append(f"{target}: vocabulary resized from {plan.shape[0]} to {shape[0]} rows")
            plan.shape = shape
        if adapter.dtypes[key] not in FLOAT_DTYPES and plan.dtype in FLOAT_DTYPES:
            raise MismatchError(f"{where}: adapter tensor {key!r} has dtype {adapter.dtypes[key]}")
        plan.replacement = key
        plan.source = None
        tie.note_target(target, "replacement")

    # 2. LoRA modules.
    def shape_of(name: str) -> tuple[int, ...]:
        return plans[name].shape if name in plans else checkpoint.info(name).shape

    for module in adapter.lora_modules:
        target, op = _place_module(module, adapter, shape_of, resolver, model_type)
        if target is None and tie.is_missing_head(module.name + ".weight"):
            op = _make_op(module, adapter, "linear", tie.embedding_shape_for_head(), False)
            tie.head_ops.append(("lora", module.name, op))
            continue
        if target is None and cfg.target_parameters and any(
            ".experts.0." in n for n in checkpoint.weight_map
        ):
            raise UnsupportedAdapterError(
                f"{where}: adapter module {module.name!r} targets fused expert parameters "
                f"({', '.join(cfg.target_parameters)}) but the base checkpoint stores its experts per expert "
                "(e.g. experts.0.w1.weight); splitting fused-expert deltas is not supported: merge with PEFT"
            )
        if target is None:
            no_match(
                f"{where}: adapter module {module.name!r} (tensor {module.a_key!r}) matches no tensor in the base checkpoint",
                [k for k in (module.a_key, module.b_key, module.bias_key, module.magnitude_key) if k is not None],
            )
            continue
        plan = plan_for(target)
        if plan.lora is not None:
            raise MismatchError(f"{where}: two adapter modules target base tensor {target!r}")
        _check_shapes(op, adapter, plan.shape, target)
        plan.lora = op
        tie.note_target(target, "lora")
        if module.bias_key is not None:
            bias_name = target.rsplit(".", 1)[0] + ".bias"
            if bias_name not in checkpoint.weight_map:
                raise UnsupportedAdapterError(
                    f"{where}: module {module.name!r} has lora_bias but base layer {target.rsplit('.', 1)[0]!r} has no bias; "
                    "PEFT cannot merge this either"
                )
            plan_for(bias_name).bias_of = op

    # 3. Trainable tokens.
    for path, key in adapter.token_deltas.items():
        target = resolver.find(path + ".weight")
        indices = _token_indices(adapter, path, key)
        if target is None and tie.is_missing_head(path + ".weight"):
            tie.head_ops.append(("tokens", path, (key, indices)))
            continue
        if target is None:
            no_match(f"{where}: trainable tokens of {path!r} match no tensor in the base checkpoint", [key])
            continue
        plan = plan_for(target)
        rows = plan.shape[0]
        if any(i >= rows for i in indices) or adapter.shapes[key] != (len(indices), plan.shape[1]):
            raise MismatchError(
                f"{where}: trainable tokens {key!r} ({list(adapter.shapes[key])}, indices up to {max(indices)}) "
                f"do not fit {target!r} {list(plan.shape)}"
            )
        plan.tokens = (key, indices)
        tie.note_target(target, "tokens")

    extra = tie.resolve(plan_for, adapter, notes, warnings)
    config_updates = _config_updates(checkpoint, plans, tie, dtype)
    shards = _layout(checkpoint, plans, extra, dtype, max_shard_size)
    _check_untouched_patterns(adapter, warnings)
    return Plan(shards, config_updates, notes, warnings, unmatched)


def _is_vocab(name: str, tie: _TieState) -> bool:
    return name.endswith(EMBEDDING_SUFFIXES) or name.endswith("lm_head.weight") or name == tie.embedding


def _token_indices(adapter: Adapter, path: str, key: str) -> list[int]:
    spec = adapter.config.trainable_token_indices
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        for name, indices in spec.items():
            if path == name or path.endswith("." + name):
                return indices
    raise MismatchError(f"{adapter.path}: trainable tokens {key!r} have no matching trainable_token_indices in the config")


def _place_module(
    module: LoraModule, adapter: Adapter, shape_of, resolver: _Resolver, model_type: str | None
) -> tuple[str | None, LoraOp]:
    """Find the base tensor a LoRA module changes, and the kind of delta."""
    cfg = adapter.config
    a_shape = adapter.shapes[module.a_key]  # type: ignore[index]
    if cfg.target_parameters and (module.depth > 0 or resolver.find(module.name + ".weight") is None):
        return _place_parameter(module, adapter, shape_of, resolver)
    target = resolver.find(module.name + ".weight")
    if target is None and resolver.find(module.name + ".in_proj_weight") is not None:
        target = resolver.find(module.name + ".in_proj_weight")
        return target, _make_op(module, adapter, "mha", shape_of(target), False)  # type: ignore[arg-type]
    if target is None:
        return None, _make_op(module, adapter, "linear", (), False)
    w_shape = shape_of(target)
    if module.mha_parent is not None:
        return target, _make_op(module, adapter, "mha_out", w_shape, False, scale_name=module.mha_parent)
    if module.embedding:
        return target, _make_op(module, adapter, "embedding", w_shape, False)
    if len(a_shape) > 2:
        return target, _make_op(module, adapter, "conv", w_shape, False)
    transpose = _linear_layout(module, adapter, w_shape, model_type)
    return target, _make_op(module, adapter, "linear", w_shape, transpose)


def _linear_layout(module: LoraModule, adapter: Adapter, w_shape: tuple[int, ...], model_type: str | None) -> bool:
    """Whether W is stored (in, out) (transformers Conv1D), decided per tensor by shape."""
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]  # type: ignore[index]
    plain = w_shape == (b[0], a[1])
    transposed = w_shape == (a[1], b[0])
    if plain and transposed:  # square: shapes cannot tell; the architecture or the config can
        return model_type in CONV1D_MODEL_TYPES or adapter.config.fan_in_fan_out
    if not plain and not transposed:
        raise MismatchError(
            f"{adapter.weights_path}: module {module.name!r}: LoRA A{list(a)} and B{list(b)} give a "
            f"({b[0]}, {a[1]}) delta, but the base weight is {list(w_shape)}"
        )
    return transposed


def _place_parameter(
    module: LoraModule, adapter: Adapter, shape_of, resolver: _Resolver
) -> tuple[str | None, LoraOp]:
    """target_parameters (ParamWrapper): find the parameter of `module` this wrapper holds, by shape."""
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]  # type: ignore[index]
    fits: list[tuple[str, LoraOp]] = []
    for target_param in adapter.config.target_parameters:
        param = target_param.rsplit(".", 1)[-1]
        full = f"{module.name}.{param}"
        if not (full == target_param or full.endswith("." + target_param)):
            continue
        target = resolver.find(full)
        if target is None:
            continue
        w = shape_of(target)
        if len(w) == 2 and w == (b[0], a[1]):
            fits.append((target, _make_op(module, adapter, "param", w, False, scale_name=full)))
        elif len(w) == 3 and a[0] % w[0] == 0 and b[1] == a[0]:
            experts, d1, d2 = w
            straight = a[1] == d2 and b[0] == d1
            swapped = a[1] == d1 and b[0] == d2
            if straight and swapped:
                raise UnsupportedAdapterError(
                    f"{adapter.weights_path}: module {module.name!r}: expert parameter {target!r} is square "
                    f"{list(w)}, so the orientation of the LoRA delta is ambiguous; merge it with PEFT"
                )
            if straight or swapped:
                op = _make_op(module, adapter, "experts", w, swapped, experts=experts, scale_name=full)
                fits.append((target, op))
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        names = ", ".join(t for t, _ in fits)
        raise UnsupportedAdapterError(
            f"{adapter.weights_path}: module {module.name!r} (nesting depth {module.depth}) fits several target "
            f"parameters ({names}); which one it holds is ambiguous"
        )
    return None, _make_op(module, adapter, "param", (), False, scale_name=module.name)


def _make_op(
    module: LoraModule,
    adapter: Adapter,
    kind: str,
    w_shape: tuple[int, ...],
    transpose: bool,
    *,
    experts: int = 1,
    scale_name: str | None = None,
) -> LoraOp:
    cfg = adapter.config
    scale = cfg.scale_for(scale_name or module.name)
    a_shape = adapter.shapes[module.a_key]  # type: ignore[index]
    shape_rank = a_shape[0] // experts
    if w_shape and shape_rank != scale.r:
        source = f"rank_pattern key {scale.rank_key!r}" if scale.rank_key is not None else "'r'"
        raise MismatchError(
            f"{adapter.weights_path}: module {module.name!r}: the config gives rank {scale.r} (from {source}) "
            f"but the saved tensors have rank {shape_rank}; the config does not belong to these weights"
        )
    return LoraOp(module, kind, scale, transpose, experts, dora=module.magnitude_key is not None)


def _check_shapes(op: LoraOp, adapter: Adapter, w: tuple[int, ...], target: str) -> None:
    """Cross-check A/B (and DoRA magnitude) shapes against the base weight; refuse what PEFT cannot merge."""
    module, where = op.module, adapter.weights_path
    a, b = adapter.shapes[module.a_key], adapter.shapes[module.b_key]  # type: ignore[index]
    r = a[0]

    def bad(expected: str) -> MismatchError:
        return MismatchError(
            f"{where}: module {module.name!r}: LoRA A{list(a)} / B{list(b)} do not fit base tensor {target!r} "
            f"{list(w)} ({expected})"
        )

    if op.kind == "embedding":
        if len(a) != 2 or w != (a[1], b[0]) or b[1] != r:
            raise bad(f"expected A [r, {w[0] if w else '?'}] and B [{w[1] if len(w) > 1 else '?'}, r]")
        out = w[1]
    elif op.kind == "conv":
        if len(w) != len(a):
            raise bad("a convolution LoRA needs a convolution weight")
        if b[1] != r or (w[1] != a[1] and a[1] % w[1] == 0):
            raise UnsupportedAdapterError(
                f"{where}: module {module.name!r}: convolution with groups > 1; PEFT cannot merge LoRA into grouped convolutions"
            )
        if w[0] != b[0] or w[1] != a[1] or tuple(w[2:]) != tuple(a[2:]) or any(d != 1 for d in b[2:]):
            raise bad(f"expected A [r, {w[1]}, {', '.join(map(str, w[2:]))}] and B [{w[0]}, r, 1...]")
        out = w[0]
    elif op.kind in ("linear", "param", "mha", "mha_out"):
        if b[1] != r:
            raise bad("B's second dimension must equal the rank")
        out = w[1] if op.transpose else w[0]
    else:  # experts: checked when placed
        out = w[1]
    if op.dora:
        m = adapter.shapes[module.magnitude_key]  # type: ignore[index]
        if math.prod(m) != out or max(m, default=1) != out:
            raise MismatchError(
                f"{where}: module {module.name!r}: DoRA magnitude vector has shape {list(m)}, expected {out} values"
            )
        if op.kind not in ("linear", "embedding", "conv"):
            raise UnsupportedAdapterError(f"{where}: module {module.name!r}: DoRA is not supported on {op.kind} layers")


class _TieState:
    """Tied input/output embeddings: decide whether the merge keeps or breaks the tie."""

    def __init__(self, checkpoint: Checkpoint, resolver: _Resolver):
        config = checkpoint.config or {}
        self.embedding = next((n for n in checkpoint.tensor_names() if n.endswith(EMBEDDING_SUFFIXES)), None)
        head = resolver.find("lm_head.weight")
        flag = config.get("tie_word_embeddings")
        self.tied = bool(self.embedding) and (flag is True or (flag is None and head is None))
        self.head_present = head
        self.head_name = head or "lm_head.weight"
        self.checkpoint = checkpoint
        self.head_ops: list[tuple[str, str, object]] = []  # ops on a head that only exists through the tie
        self.embedding_kinds: set[str] = set()
        self.head_kinds: set[str] = set()
        self.untied = False

    def is_missing_head(self, path: str) -> bool:
        return self.tied and self.head_present is None and path.split(".")[-2:] == ["lm_head", "weight"]

    def embedding_shape_for_head(self) -> tuple[int, ...]:
        return self.checkpoint.info(self.embedding).shape if self.embedding else ()

    def note_target(self, name: str, kind: str) -> None:
        if name == self.embedding:
            self.embedding_kinds.add(kind)
        elif name == self.head_present:
            self.head_kinds.add(kind)

    def resolve(self, plan_for, adapter: Adapter, notes: list[str], warnings: list[str]) -> list[tuple[str, TensorPlan]]:
        """Apply the tie rules; return tensors to add to the output, each after an anchor tensor."""
        if not self.tied or self.embedding is None:
            return []
        emb = plan_for(self.embedding)
        head_kinds = self.head_kinds | {kind for kind, _, _ in self.head_ops}
        # Only full replacements or token rows on the embedding: the trained model kept the tie.
        if not head_kinds and "lora" not in self.embedding_kinds:
            return []
        lora_heads = [op for kind, _, op in self.head_ops if kind == "lora"]
        if (
            adapter.config.ensure_weight_tying
            and emb.lora is not None
            and len(lora_heads) == 1
            and head_kinds == {"lora"}
            and _mirrors(adapter, emb.lora, lora_heads[0])
        ):
            notes.append(
                f"{self.head_name}: tied to {self.embedding} with ensure_weight_tying; its LoRA copy is applied once "
                "(PEFT's merge_and_unload would add it twice)"
            )
            return []
        self.untied = True
        if self.head_present is not None:
            warnings.append(
                f"the adapter changes one side of tied embeddings ({self.embedding} / {self.head_name}); "
                "both are written and tie_word_embeddings is set to false"
            )
            return []
        head = TensorPlan(self.head_name, self.embedding, dtype=emb.dtype, shape=emb.shape)
        head.replacement = emb.replacement  # the head starts from what the embedding starts from
        for kind, path, payload in self.head_ops:
            if kind == "replacement":
                head.replacement = payload  # type: ignore[assignment]
                head.shape = adapter.shapes[payload]  # type: ignore[index]
            elif kind == "lora":
                head.lora = payload  # type: ignore[assignment]
                _check_shapes(head.lora, adapter, head.shape, self.head_name)  # type: ignore[arg-type]
            else:
                head.tokens = payload  # type: ignore[assignment]
        if head.replacement is not None:
            head.source = None
        if emb.tokens is not None and head.tokens is None:
            head.tokens = emb.tokens  # trainable tokens act on both sides of a tie
        warnings.append(
            f"the adapter changes one side of tied embeddings ({self.embedding}); {self.head_name} is written "
            "as its own tensor and tie_word_embeddings is set to false"
        )
        return [(self.embedding, head)]


def _mirrors(adapter: Adapter, emb: LoraOp, head: LoraOp) -> bool:
    """Is the head's LoRA the transposed copy PEFT saves for ensure_weight_tying?"""
    ea, eb = adapter.tensor(emb.module.a_key), adapter.tensor(emb.module.b_key)  # type: ignore[arg-type]
    ha, hb = adapter.tensor(head.module.a_key), adapter.tensor(head.module.b_key)  # type: ignore[arg-type]
    return ha.shape == eb.T.shape and hb.shape == ea.T.shape and bool((ha == eb.T).all()) and bool((hb == ea.T).all())


def _config_updates(checkpoint: Checkpoint, plans: dict[str, TensorPlan], tie: _TieState, dtype: str | None) -> dict[str, object]:
    config = checkpoint.config or {}
    updates: dict[str, object] = {}
    if tie.embedding is not None and tie.embedding in plans:
        rows = plans[tie.embedding].shape[0]
        if config.get("vocab_size") is not None and config.get("vocab_size") != rows:
            updates["vocab_size"] = rows
    if tie.untied:
        updates["tie_word_embeddings"] = False
    if dtype not in (None, "auto"):
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[DTYPE_NAMES[dtype]]
        for key in ("dtype", "torch_dtype"):
            if key in config or (key == "dtype" and "torch_dtype" not in config):
                updates[key] = name
    return updates


def _layout(
    checkpoint: Checkpoint,
    plans: dict[str, TensorPlan],
    extra: list[tuple[str, TensorPlan]],
    dtype: str | None,
    max_shard_size: int | None,
) -> list[tuple[str, list[TensorPlan]]]:
    """Output shards: the base's own layout (names kept), or re-sharded greedily with HF names."""
    from .checkpoint import shard_file_name
    from .safetensors_file import tensor_nbytes

    groups: list[tuple[str, list[TensorPlan]]] = []
    for shard in checkpoint.shards:
        items = []
        for name, info in checkpoint.headers[shard].tensors.items():
            plan = plans.get(name) or TensorPlan(name, name, dtype=output_dtype(info.dtype, dtype), shape=info.shape)
            items.append(plan)
            items.extend(p for anchor, p in extra if anchor == name)
        groups.append((shard, items))
    if max_shard_size is None:
        return groups
    ordered = [t for _, ts in groups for t in ts]
    buckets: list[list[TensorPlan]] = [[]]
    size = 0
    for t in ordered:
        n = tensor_nbytes(t.dtype, t.shape)
        if buckets[-1] and size + n > max_shard_size:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += n
    return [(shard_file_name(i, len(buckets)), b) for i, b in enumerate(buckets)]


def _check_untouched_patterns(adapter: Adapter, warnings: list[str]) -> None:
    """Warn on pattern keys that match no module and on modules matched by several keys with different values."""
    from .scaling import matching_keys

    cfg = adapter.config
    names = [m.name for m in adapter.lora_modules]
    for label, pattern in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern)):
        for key in pattern:
            if not any(matching_keys([key], n) for n in names):
                warnings.append(f"{label} key {key!r} matches no module of the adapter")
        for n in names:
            keys = matching_keys(pattern, n)
            if len({pattern[k] for k in keys}) > 1:
                warnings.append(
                    f"module {n!r} matches several {label} keys with different values ({', '.join(keys)}); "
                    f"PEFT uses the first in file order, {keys[0]!r}"
                )
