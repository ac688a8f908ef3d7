"""What each output tensor of a merge becomes (the data; plan/merge.py builds it).

A `TensorPlan` says where an output tensor's starting value comes from (a base tensor, a
quantized base weight dequantized or a weight quantized as in training (`QuantSource`), or a
full replacement saved in the adapter) and what is applied on top: a LoRA delta (`LoraOp`),
a lora_bias, trainable-token rows. A `Plan` is every output tensor, grouped by output shard,
plus the config.json changes. Plans hold names and shapes only, never tensor data, so a dry
run can show one; how each tensor is then produced is decided once, by the executor's
lowering (execute/lowering.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..adapter.adapter import LoraModule
from ..adapter.scaling import ModuleScale
from ..errors import InputError
from ..formats.quant import QuantizedWeight, QuantScheme
from ..formats.safetensors_file import FLOAT_DTYPES

# How PEFT merges a module, by the layer it wraps (docs/peft-rules.md, "Deltas").
LayerKind = Literal["linear", "embedding", "conv", "experts", "param", "mha", "mha_out"]

# --dtype values -> safetensors dtypes; "auto" (keep the base's) is None once parsed.
DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def parse_dtype(dtype: str | None) -> str | None:
    """The safetensors dtype a `--dtype` value asks for; None for "auto" (each tensor keeps the base's)."""
    if dtype is None or dtype == "auto":
        return None
    if dtype in DTYPE_NAMES.values():
        return dtype
    if dtype not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return DTYPE_NAMES[dtype]


def output_dtype(base_dtype: str, dtype: str | None) -> str:
    """The output dtype of a tensor: the base's, or the requested one (parsed) for floating tensors."""
    if dtype is None or base_dtype not in FLOAT_DTYPES:
        return base_dtype
    return dtype


@dataclass(frozen=True)
class ExpertPart:
    """One expert's share of a fused expert parameter.

    `fused_factors`: the LoRA factors hold every expert (a target_parameters adapter) and this op uses expert
    `expert`'s, written to a per-expert tensor. Otherwise the factors are one expert's (a per-expert adapter) and
    the op changes expert `expert`'s slice of a fused tensor. `rows` (start, stop, step) selects the output
    features of the fused gate_up this part is (gate or up); None: all of them.
    """

    expert: int
    experts: int
    fused_factors: bool
    rows: tuple[int, int, int] | None
    in_out: bool  # the fused parameter is (E, in, out)


@dataclass(slots=True)
class LoraOp:
    """Add one LoRA module's delta (or apply DoRA) to a weight."""

    module: LoraModule
    kind: LayerKind
    scale: ModuleScale
    transpose: bool = False  # linear: Conv1D layout (W is (in, out)); experts: W[e] is (in, out)
    experts: int = 1
    dora: bool = False
    part: ExpertPart | None = None  # an expert's share of a fused expert parameter (plan/experts.py)
    # the module's weight is these rows of the stored tensor (transformers cuts it out on loading: plan/names.py Piece)
    rows: tuple[int, int] | None = None
    # the stored tensor is these rows of the module's weight (transformers concatenates stored tensors into it)
    delta_rows: tuple[int, int] | None = None
    # the stored tensor reordered into the module's weight as transformers does on loading: ("interleave", dim,
    # inverse) or ("rope", attention heads, inverse); merged there, then reordered back
    reorder: tuple[str, int, bool] | None = None


@dataclass(frozen=True, slots=True)
class Requant:
    """`--keep-quantization`: the merged weight is quantized back into the base's format (compute/requantize.py).

    The TensorPlan then names the stored codes tensor (its dtype and shape); the weight is merged in `dtype` with
    `shape`, and the step writes the `rewritten` stored tensors (scales) too, right after the codes."""

    dtype: str  # the dtype the weight is merged in (the layer's compute dtype)
    shape: tuple[int, ...]  # the merged, dequantized weight's shape
    rewritten: tuple[tuple[str, str], ...]  # (role, stored tensor name) written with the codes, in this order
    fused: FusedGroup | None = None  # NVFP4: the weights a runtime loads as one layer with this one, one global scale


@dataclass(eq=False)
class FusedGroup:
    """NVFP4 weights that vLLM and SGLang load as one fused layer (q/k/v, an MLA's q_a/kv_a, gate/up), so that they
    must share one `weight_global_scale` (plan/quantization.py `fused_groups`): each member's plan (its codes tensor
    and Requant), in order. The group's scale is computed once, when its first member is written
    (compute/requantize.py `fused_global_scale`)."""

    module: str  # the module holding the members ("model.layers.0.self_attn")
    members: list[TensorPlan] = field(default_factory=list, repr=False)


@dataclass(frozen=True, slots=True)
class QuantSource:
    """The base value goes through quantization: a stored quantized weight dequantized, or (stored None) the
    base's own weight quantized and dequantized as bitsandbytes does (`--trained-on`)."""

    scheme: QuantScheme
    stored: QuantizedWeight | None = None
    transposed: bool = False  # a Conv1D weight: quantized as (out, in), written (in, out)
    keep: Requant | None = None  # --keep-quantization: quantized back after the merge

    @property
    def simulated(self) -> bool:
        return self.stored is None


@dataclass(slots=True)
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
    quant: QuantSource | None = None  # the base value is dequantized (or quantized as in training) first
    # a stacked merge (adapter/stacked.py): later adapters' LoRA / lora_bias on this tensor, applied in order after
    # the above
    stacked: tuple[TensorPlan, ...] = ()
    # more ops of the same adapter on other parts of this tensor: per-expert modules on a fused expert parameter, or
    # modules on the rows transformers cuts out of it (a fused q/k/v)
    parts: tuple[LoraOp, ...] = ()
    written_with: str | None = None  # a stored scale rewritten by the step of this quantized weight (Requant)

    @property
    def untouched(self) -> bool:
        return (
            self.replacement is None
            and self.lora is None
            and self.bias_of is None
            and self.tokens is None
            and self.quant is None
            and not self.stacked
            and not self.parts
        )

    @property
    def changed(self) -> bool:
        """The adapter changes this tensor (a replacement, LoRA, lora_bias, trainable tokens, stacked or in parts)."""
        return bool(
            self.replacement is not None
            or self.lora is not None
            or self.bias_of is not None
            or self.tokens is not None
            or self.stacked
            or self.parts
        )

    @property
    def replaced_whole(self) -> bool:
        """The adapter gives the whole value, with nothing applied on top (modules_to_save, saved biases)."""
        return (
            self.replacement is not None
            and self.lora is None
            and self.bias_of is None
            and self.tokens is None
            and not self.stacked
        )

    @property
    def expert_sliceable(self) -> bool:
        """Whether this (fused expert) tensor can be merged one expert at a time with the same bits: its ops are
        target_parameters expert deltas (PEFT's einsum restricted to one expert gives the same values) or per-expert
        slices, with nothing else on top."""
        if self.replacement is not None or self.bias_of is not None or self.tokens is not None or self.stacked:
            return False
        return all(
            (op.kind == "experts" and op.part is None and not op.dora)
            or (op.part is not None and not op.part.fused_factors)
            for op in self.all_lora
        ) and all(op.rows is None and op.reorder is None and op.delta_rows is None for op in self.all_lora)

    @property
    def all_lora(self) -> list[LoraOp]:
        """Every LoRA op on this tensor, in the order they are merged (one, unless stacked or in parts)."""
        return [op for p in (self, *self.stacked) for op in ((p.lora,) if p.lora is not None else ()) + p.parts]


@dataclass
class Plan:
    """The whole merge: output tensors grouped by output shard, and what changes in config.json."""

    shards: list[tuple[str, list[TensorPlan]]]
    config_updates: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # adapter keys that match nothing (dry runs only)
    index_metadata: dict[str, object] | None = None  # the index to write (None: a single file without one)
    quantization: QuantScheme | None = None  # the base is quantized (dequantized here), or --trained-on
    prequantized: bool = False  # the base checkpoint itself is quantized
    keep_quantization: bool = False  # the changed quantized weights are quantized back into the base's format

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for _, ts in self.shards for t in ts]

    @property
    def lora_ops(self) -> list[LoraOp]:
        return [op for t in self.tensors for op in t.all_lora]
