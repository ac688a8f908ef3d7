"""Which base weights come through quantization, and in which dtype they are merged.

Two cases (docs/quantization.md):
- a quantized checkpoint (bitsandbytes 4/8-bit, GPTQ, AWQ): every stored quantized weight is
  dequantized, merged in the compute dtype, and written unquantized; its auxiliary tensors are
  dropped and `quantization_config` leaves config.json;
- `--trained-on nf4|fp4|int8` on an unquantized checkpoint: the weights transformers would
  quantize for that BitsAndBytesConfig are quantized and dequantized as bitsandbytes does, then
  merged. transformers quantizes `nn.Linear` and `Conv1D` layers except the output head
  (top-level modules, tied weights), `llm_int8_skip_modules` (which replaces that default) and
  the model's `_keep_in_fp32_modules`; embeddings and norms stay as they are.
Conv1D weights (GPT-2) are stored (in, out) but quantized transposed, as transformers does.

With `--keep-quantization` (`keep_quantized`, after the adapter is placed) the output stays in the base's format:
the quantized weights the adapter changes are merged and quantized back (their codes and rewritten scales take
their old names and places; side tensors such as activation scales are copied), every other stored tensor is
copied byte for byte, and `quantization_config` stays.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..adapter.scaling import backtracking_risk
from ..errors import InputError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.quant import REQUANTIZED_ROLES, QuantScheme, checkpoint_scheme, config_dtype, quantized_weights
from ..formats.safetensors_file import FLOAT_DTYPES, read_bytes
from .placement import CONV1D_MODEL_TYPES
from .tensors import FusedGroup, QuantSource, Requant, TensorPlan

# The model types whose classes keep modules unquantized (`_keep_in_fp32_modules`), read from
# transformers 5.24.0 (tests/merge/test_quantized.py checks it against the installed transformers).
KEEP_IN_FP32 = {
    "afmoe": (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_mlp_layernorm",
        "post_mlp_layernorm",
        "q_norm",
        "k_norm",
        "norm",
    ),
    "axk2": ("indexer.weights_proj",),
    "deepseek_v32": ("indexer.weights_proj",),
    "glm_moe_dsa": ("indexer.weights_proj",),
    "mistral_large4": ("indexer.weights_proj",),
    "mistral_large4_text": ("indexer.weights_proj",),
    "deepseek_v4": (
        "self_attn.compressor.kv_proj",
        "self_attn.compressor.gate_proj",
        "self_attn.compressor.indexer.kv_proj",
        "self_attn.compressor.indexer.gate_proj",
        "self_attn.compressor.indexer.scorer.weights_proj",
    ),
    "blip-2": ("query_tokens", "qformer"),
    "blip_2_qformer": ("query_tokens", "qformer"),
    "blip_2_vision_model": ("query_tokens", "qformer"),
    "instructblip": ("query_tokens",),
    "instructblip_qformer": ("query_tokens",),
    "instructblip_vision_model": ("query_tokens",),
    "instructblipvideo": ("query_tokens",),
    "instructblipvideo_qformer": ("query_tokens",),
    "instructblipvideo_vision_model": ("query_tokens",),
    "gpt_oss": ("post_attention_layernorm", "input_layernorm", "norm"),
    "longcat_flash": ("classifier.weight",),
    "t5": ("wo",),
    "mt5": ("wo",),
    "umt5": ("wo",),
    "udop": ("wo",),
    "pop2piano": ("wo",),
    "rwkv": ("time_decay", "time_first"),
}
# Module names of embeddings (nn.Embedding, never quantized): any containing "embed", and these.
_EMBEDDING_NAMES = {"wte", "wpe", "shared", "relative_attention_bias"}


@dataclass
class QuantPlan:
    """The quantized weights of one merge: a `QuantSource` per output weight, and the tensors dropped."""

    scheme: QuantScheme | None = None
    sources: dict[str, QuantSource] = field(default_factory=dict)  # output weight name -> how its base value is made
    anchors: dict[str, str] = field(default_factory=dict)  # stored tensor -> output weight written in its place
    dropped: set[str] = field(default_factory=set)  # stored tensors that are not written (absmax, SCB, qzeros, ...)
    prequantized: bool = False
    keep: bool = False  # --keep-quantization
    companions: dict[str, list[TensorPlan]] = field(default_factory=dict)  # kept: codes -> scales written after them
    changed: int = 0  # kept: the quantized weights the adapter changes
    fused: int = 0  # kept NVFP4: the fused groups (one global scale) with a changed member

    def names(self) -> list[str]:
        return list(self.sources)


def plan_quantization(checkpoint: Checkpoint, trained_on: QuantScheme | None) -> QuantPlan:
    """What a merge does about quantization: dequantize a quantized base, or simulate `trained_on`, or nothing."""
    where = str(checkpoint.folder)
    scheme = checkpoint_scheme(checkpoint.config, where)
    conv1d = (checkpoint.config or {}).get("model_type") in CONV1D_MODEL_TYPES
    if scheme is not None:
        if trained_on is not None:
            raise InputError(
                f"{where}: the base is already quantized ({scheme.label}); [[trained_on]] is for an "
                "unquantized base (a quantized base is dequantized as it is)"
            )
        return _prequantized(checkpoint, scheme, conv1d)
    if trained_on is None:
        return QuantPlan()
    plan = QuantPlan(trained_on)
    for name in quantized_by_transformers(checkpoint, trained_on):
        plan.sources[name] = QuantSource(trained_on, None, transposed=conv1d)
    return plan


def _prequantized(checkpoint: Checkpoint, scheme: QuantScheme, conv1d: bool) -> QuantPlan:
    files = CheckpointFiles(checkpoint)

    def read_raw(name: str) -> bytes:
        fd, offset = files.locate(name)
        return bytes(read_bytes(fd, offset, checkpoint.info(name).nbytes))

    try:
        stored = quantized_weights(scheme, checkpoint, read_raw)
    finally:
        files.close()
    if not stored:
        raise InputError(
            f"{checkpoint.folder}: config.json says the checkpoint is quantized ({scheme.label}) but no "
            "quantized weight was found in it"
        )
    plan = QuantPlan(scheme, prequantized=True)
    for name, weight in stored.items():
        plan.sources[name] = QuantSource(weight.scheme, weight, transposed=conv1d)
        anchor = weight.anchor
        plan.anchors[anchor] = name
        plan.dropped.update(part for part in weight.parts.values() if part != anchor)
    return plan


def keep_quantized(plans: dict[str, TensorPlan], quant: QuantPlan, checkpoint: Checkpoint) -> QuantPlan:
    """--keep-quantization: turn the plan's quantized weights back into the base's stored tensors (`plans` is
    changed in place). A weight the adapter changes is merged in its compute dtype and quantized back; the others
    are not dequantized at all."""
    where = str(checkpoint.folder)
    scheme = quant.scheme
    if scheme is None or not quant.prequantized:
        raise InputError(
            f"{where}: [[keep_quantization=True]] keeps a quantized base's format, and this base is not "
            "quantized" + (" ([[trained_on]] only says how it was quantized in training)" if scheme else "")
        )
    if scheme.method not in REQUANTIZED_ROLES:
        raise UnsupportedAdapterError(
            f"{where}: [[keep_quantization=True]] is not supported for {scheme.label} bases yet (block-scaled FP8, "
            f"MXFP4 "
            "and compressed-tensors FP8, INT4/INT8 and NVFP4 are); merge without it to write the merged model "
            "unquantized"
        )
    kept = QuantPlan(scheme, prequantized=True, keep=True)
    changed = {name for name in quant.sources if name in plans and plans[name].changed}
    fused: dict[str, FusedGroup] = {}  # NVFP4: a member of a group with a changed weight -> its group
    if scheme.method == "ct_nvfp4":
        for module, members in fused_groups(quant.sources, checkpoint.weight_map):
            if changed.intersection(members):
                group = FusedGroup(module)
                fused.update((m, group) for m in members)
    kept.changed = len(changed)
    for name, source in quant.sources.items():
        t = plans.pop(name, None)
        stored = source.stored
        assert stored is not None
        if t is None or (name not in changed and name not in fused):
            continue  # every stored tensor of it is copied as it is
        roles = REQUANTIZED_ROLES[scheme.method]
        rewritten = tuple((role, stored.parts[role]) for role in roles[1:] if role in stored.parts)
        keep = Requant(
            merge_dtype(source, checkpoint, name), output_shape(source, checkpoint, name), rewritten, fused.get(name)
        )
        t.quant = replace(source, keep=keep)
        t.name = stored.parts[roles[0]]
        t.dtype, t.shape = checkpoint.info(t.name).dtype, checkpoint.info(t.name).shape
        plans[t.name] = t
        if name in fused:
            fused[name].members.append(t)
        kept.dropped.update(n for _, n in rewritten)  # placed right after the codes instead
        kept.companions[t.name] = [
            TensorPlan(n, None, dtype=checkpoint.info(n).dtype, shape=checkpoint.info(n).shape, written_with=t.name)
            for _, n in rewritten
        ]
    kept.fused = len({id(g) for g in fused.values()})
    return kept


# The weights vLLM and SGLang load as one fused layer, whose NVFP4 global scales must therefore be one (llm-compressor
# 0.9's modifiers/utils/fused_modules.py, "vLLM-aligned fused module layouts", and helpers.py
# update_fused_layer_weight_global_scales, which sets each member's scale to the group's minimum): by the module
# names under one parent. q/k/v (not where the parent has a fused qkv_proj or is an MLA block); an MLA block's
# query projection (q_a_proj, else q_proj) with kv_a_proj_with_mqa; gate/up (not where it has a fused gate_up_proj).
_FUSED_ATTENTION = ("q_proj", "k_proj", "v_proj")
_FUSED_MLP = ("gate_proj", "up_proj")


def fused_groups(weights: Iterable[str], stored: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(parent module, its member weights in order) of every fused group among `weights` (weight names such as
    "model.layers.0.self_attn.q_proj.weight"); `stored`: every tensor name of the checkpoint (a fused qkv_proj or
    gate_up_proj beside them, quantized or not, means the parent is fused already)."""
    children: dict[str, dict[str, str]] = defaultdict(dict)
    for weight in weights:
        parent, _, leaf = weight.removesuffix(".weight").rpartition(".")
        children[parent][leaf] = weight
    modules = {name.rpartition(".")[0] for name in stored}
    groups: list[tuple[str, tuple[str, ...]]] = []
    for parent, leaves in children.items():
        has = lambda leaf: f"{parent}.{leaf}" in modules  # noqa: E731
        if has("kv_a_proj_with_mqa"):
            query = "q_a_proj" if "q_a_proj" in leaves else "q_proj"
            if query in leaves and "kv_a_proj_with_mqa" in leaves:
                groups.append((parent, (leaves[query], leaves["kv_a_proj_with_mqa"])))
        elif not has("qkv_proj") and all(leaf in leaves for leaf in _FUSED_ATTENTION):
            groups.append((parent, tuple(leaves[leaf] for leaf in _FUSED_ATTENTION)))
        if not has("gate_up_proj") and all(leaf in leaves for leaf in _FUSED_MLP):
            groups.append((parent, tuple(leaves[leaf] for leaf in _FUSED_MLP)))
    return groups


def by_expert(t: TensorPlan, checkpoint: Checkpoint) -> bool:
    """A fused expert tensor (experts, d1, d2) merged one expert at a time: its base a plain tensor of that shape, or
    MXFP4, or block-scaled FP8 with the expert dimension leading; its ops restricted to one expert give the same bits
    (TensorPlan.expert_sliceable). Memory then holds one expert's slice, not the tensor."""
    shape = t.quant.keep.shape if t.quant is not None and t.quant.keep is not None else t.shape
    if len(shape) != 3 or shape[0] < 2 or not t.expert_sliceable:
        return False
    if t.quant is None:
        return t.source is not None and checkpoint.info(t.source).shape == shape
    stored = t.quant.stored
    if stored is None or t.quant.transposed:
        return False
    return stored.scheme.method == "mxfp4" or (stored.scheme.method == "fp8" and stored.scheme.block is not None)


def merge_dtype(source: QuantSource, checkpoint: Checkpoint, name: str) -> str:
    """The dtype a quantized weight is merged and written in (before --dtype): the dtype the layer computes in.

    bitsandbytes 4-bit: `bnb_4bit_compute_dtype`; int8, GPTQ, AWQ: the model's dtype (config.json);
    simulated (--trained-on): the base weight's own dtype.
    """
    if source.stored is None:
        return checkpoint.info(name).dtype
    if source.scheme.compute_dtype is not None:
        return source.scheme.compute_dtype
    config = checkpoint.config or {}
    return config_dtype(config) or _common_float_dtype(checkpoint) or source.stored.dtype


def _common_float_dtype(checkpoint: Checkpoint) -> str | None:
    counts: dict[str, int] = {}
    for name in checkpoint.weight_map:
        dtype = checkpoint.info(name).dtype
        if dtype in FLOAT_DTYPES:
            counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=lambda d: counts[d]) if counts else None


def output_shape(source: QuantSource, checkpoint: Checkpoint, name: str) -> tuple[int, ...]:
    """The unquantized weight's shape in the output (Conv1D layout for GPT-2-style models)."""
    if source.stored is None:
        return checkpoint.info(name).shape
    shape = source.stored.shape
    return tuple(reversed(shape)) if source.transposed else shape


def quantized_by_transformers(checkpoint: Checkpoint, scheme: QuantScheme) -> list[str]:
    """The weights transformers quantizes when it loads this checkpoint with a BitsAndBytesConfig (`scheme`).

    Linear and Conv1D weights: 2-D floating `<module>.weight` tensors that are not embeddings,
    minus the modules transformers does not convert (`should_convert_module`).
    """
    config = checkpoint.config or {}
    skip = list(scheme.skip_modules) if scheme.skip_modules is not None else _default_skips(checkpoint)
    skip += KEEP_IN_FP32.get(str(config.get("model_type")), ())
    for pattern in skip:
        risk = backtracking_risk(pattern)
        if risk is not None:
            raise UnsupportedAdapterError(f"skip pattern {pattern!r} is refused: {risk}")
    chosen = []
    for name in checkpoint.tensor_names():
        info = checkpoint.info(name)
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        module = name[: -len(".weight")]
        if _is_embedding(module) or not should_convert_module(module, skip):
            continue
        chosen.append(name)
    return chosen


def _default_skips(checkpoint: Checkpoint) -> list[str]:
    """transformers' get_keys_to_not_convert: the output embedding and the model's last module (its head)."""
    return [n[: -len(".weight")] for n in checkpoint.weight_map if n.endswith(".weight") and n.count(".") == 1]


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return "embed" in last or last in _EMBEDDING_NAMES


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def should_convert_module(name: str, patterns: list[str]) -> bool:
    """transformers' should_convert_module: skip when a pattern matches from the start up to a module
    boundary (as a regex), or as a suffix of the name."""
    return not any(re.match(rf"(?:{key}){_BOUNDARY}", name) or name.endswith(key) for key in patterns)
