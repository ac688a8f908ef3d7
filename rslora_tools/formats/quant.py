"""Quantized checkpoints: the quantization a config names, and what each quantized weight stores.

Read as transformers saves them (docs/quantization.md):
- bitsandbytes 4-bit (NF4 or FP4, with or without double quantization, any `quant_storage`):
  per weight the packed codes under the weight's own name, plus `.absmax`, `.quant_map`,
  `.quant_state.bitsandbytes__<type>` (a JSON string as uint8: shape, dtype, blocksize, the nested
  offset) and, when double quantized, `.nested_absmax` and `.nested_quant_map`;
- bitsandbytes 8-bit (LLM.int8): int8 weight, `<module>.SCB` (row scales), `.weight_format`;
- GPTQ (`qweight`, `qzeros`, `scales`, `g_idx`) and AWQ GEMM (`qweight`, `qzeros`, `scales`), int4
  or int8, with the module's `.weight` absent;
- block-scaled FP8 (`quant_method: fp8`, DeepSeek-V3/R1, Qwen3-FP8): the float8 weight under its own name and
  `<module>.weight_scale_inv`, one float32 (or ue8m0) scale per `weight_block_size` block, the blocks at the
  right and bottom edges partial; `activation_scale` beside it when activations are quantized statically;
- compressed-tensors `float-quantized` (llm-compressor's FP8, strategy `tensor` or `channel`): the float8 weight
  under its own name and `<module>.weight_scale` (one value, or one per output row), `input_scale` beside it when
  activations are quantized statically;
- compressed-tensors `pack-quantized` (llm-compressor's W4A16/W8A16, GPTQ or RTN): `<module>.weight_packed` (int32
  words, `bits` bits per value densely packed, low bits first, offset by 2 ** (bits - 1)), `.weight_scale` (one per
  group of `group_size` inputs, or per output row), `.weight_shape` and, when asymmetric, `.weight_zero_point`
  (packed the same way along the rows);
- compressed-tensors `nvfp4-pack-quantized`: `<module>.weight_packed` (uint8, two e2m1 values per byte, low nibble
  first), `.weight_scale` (float8 e4m3, one per 16 inputs) and `.weight_global_scale` (float32, one value);
- MXFP4 (`quant_method: mxfp4`, gpt-oss's experts): `<param>_blocks` (uint8, two e2m1 values per byte, 32 values
  per block) and `<param>_scales` (uint8 e8m0 exponents, bias 127), for the fused `gate_up_proj` and `down_proj`.
A `QuantScheme` says how a weight was quantized; `QuantizedWeight` is one stored weight, with the
checkpoint tensors it is rebuilt from. Anything else is refused with the method named.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..errors import InputError, UnsupportedAdapterError
from .checkpoint import Checkpoint

QuantMethod = Literal["nf4", "fp4", "int8", "gptq", "awq", "fp8", "mxfp4", "ct_fp8", "ct_int", "ct_nvfp4"]
BNB_4BIT: tuple[QuantMethod, ...] = ("nf4", "fp4")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts

# bitsandbytes' 4-bit codes (functional.get_4bit_type, index = stored nibble), before their division by the
# largest |value|. FP4 code 0b1000 is the integer -0 there, so +0.0, as in bitsandbytes' torch path and AVX-512
# CPU path (its CUDA kernel and scalar CPU path give -0.0: equal values, only an exact zero's sign differs).
FOUR_BIT_CODES = {
    "nf4": [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    "fp4": [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
}

# torch dtype names in configs and quant states -> safetensors dtypes
_DTYPES = {
    "bfloat16": "BF16",
    "float16": "F16",
    "float32": "F32",
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float32": "F32",
}


def dtype_from_name(name: object) -> str | None:
    """The safetensors dtype of a torch dtype name as configs write it ("bfloat16", "torch.float16"); None if
    unknown."""
    return _DTYPES.get(name) if isinstance(name, str) else None


def config_dtype(config: dict[str, Any] | None) -> str | None:
    """The dtype a model's config.json gives (a safetensors dtype), read as transformers 5.25 reads it
    (PretrainedConfig.__post_init__): `dtype`, unless it is missing or null, then `torch_dtype`."""
    config = config or {}
    name = config.get("dtype")
    return dtype_from_name(name if name is not None else config.get("torch_dtype"))


# `merge --keep-quantization`: the methods whose quantizer rslora-tools has (compute/requantize.py), and the stored
# roles a requantization rewrites (the codes first); every other stored tensor is copied as it is.
REQUANTIZED_ROLES: dict[str, tuple[str, ...]] = {
    "fp8": ("weight", "scale_inv"),
    "ct_fp8": ("weight", "weight_scale"),
    "ct_int": ("weight_packed", "weight_scale", "weight_zero_point"),
    "mxfp4": ("blocks", "scales"),
    "ct_nvfp4": ("weight_packed", "weight_scale", "weight_global_scale"),
}


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """How weights were quantized: the method and its parameters (bitsandbytes, GPTQ or AWQ)."""

    method: QuantMethod
    blocksize: int = 64  # bitsandbytes 4-bit: elements per absmax block; GPTQ/AWQ: group size (-1: one group)
    double_quant: bool = False  # bitsandbytes 4-bit: the absmax values are quantized too
    compute_dtype: str | None = None  # safetensors dtype the dequantized weights are merged in (None: the base's)
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules / modules_to_not_convert as configured
    bits: int = 4  # GPTQ/AWQ
    sym: bool = True  # GPTQ
    desc_act: bool = False  # GPTQ act-order (g_idx not sequential)
    format: str = ""  # GPTQ: "gptq" (v1 zero points) or "gptq_v2"; AWQ: "gemm"
    block: tuple[int, int] | None = None  # fp8: weight_block_size (rows, columns); None: one scale per tensor

    @property
    def label(self) -> str:
        """How reports name it: "nf4 (double quant, blocksize 64)", "int8", "gptq 4-bit (group 128)"."""
        if self.method in BNB_4BIT:
            double = "double quant" if self.double_quant else "no double quant"
            return f"{self.method} ({double}, blocksize {self.blocksize})"
        if self.method == "int8":
            return "int8 (LLM.int8)"
        if self.method == "fp8":
            return f"fp8 (blocks {self.block[0]}x{self.block[1]})" if self.block else "fp8 (one scale per tensor)"
        if self.method == "mxfp4":
            return "mxfp4 (blocks of 32, e8m0 scales)"
        if self.method == "ct_fp8":
            return f"compressed-tensors float-quantized fp8 ({self.format})"
        if self.method == "ct_int":
            group = {-1: "per channel", 0: "per tensor"}.get(self.blocksize, f"group {self.blocksize}")
            return f"compressed-tensors pack-quantized int{self.bits} ({group}, {'' if self.sym else 'a'}symmetric)"
        if self.method == "ct_nvfp4":
            return "compressed-tensors nvfp4-pack-quantized (groups of 16, fp8 scales, global scale)"
        group = "one group" if self.blocksize == -1 else f"group {self.blocksize}"
        extra = ", act-order" if self.desc_act else ""
        return f"{self.method} {self.bits}-bit ({group}{extra}, {self.format})"


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """One quantized weight stored in a checkpoint: the tensors it is rebuilt from, its shape and dtype."""

    name: str  # the weight as the unquantized model names it ("model.layers.0.mlp.up_proj.weight")
    scheme: QuantScheme
    parts: dict[str, str]  # role ("weight", "absmax", "SCB", "qweight", ...) -> checkpoint tensor name
    shape: tuple[int, ...]  # the unquantized weight's shape
    dtype: str  # what dequantization gives (bitsandbytes 4-bit: the quant state's dtype; int8: F32; GPTQ/AWQ: scales)
    nested_offset: float = 0.0  # bitsandbytes double quant: the mean subtracted from the absmax values
    nested_blocksize: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        """The stored tensor whose place the dequantized weight takes in the output."""
        for role in ("weight", "qweight", "weight_packed"):
            if role in self.parts:
                return self.parts[role]
        return self.parts["blocks"]


def checkpoint_scheme(config: dict[str, Any] | None, where: str) -> QuantScheme | None:
    """The quantization config.json's `quantization_config` describes; None for an unquantized checkpoint."""
    quant = (config or {}).get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise InputError(f"{where}: config.json has a quantization_config that is not an object")
    method = quant.get("quant_method", "unknown")
    if method == "bitsandbytes":
        return _bitsandbytes_scheme(quant, where)
    if method in ("gptq", "awq"):
        return _gptq_awq_scheme(quant, method, where)
    if method == "fp8":
        return _fp8_scheme(quant, where)
    if method == "mxfp4":
        skip = quant.get("modules_to_not_convert")
        return QuantScheme("mxfp4", skip_modules=tuple(skip) if isinstance(skip, list) else None)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(quant, where)
    raise UnsupportedAdapterError(
        f"{where}: the base is quantized with {method!r}; rslora-tools dequantizes bitsandbytes (4-bit, 8-bit), GPTQ, "
        "AWQ, block-scaled FP8 (quant_method fp8), MXFP4 and compressed-tensors (FP8, pack-quantized INT4/INT8, "
        "NVFP4) "
        "checkpoints only. "
        "Merge into the unquantized base model instead"
    )


def _compressed_tensors_scheme(quant: dict[str, Any], where: str) -> QuantScheme:
    """compressed-tensors: float-quantized FP8 (per tensor or channel), pack-quantized INT4/INT8 (per group or
    channel, symmetric or not) or NVFP4 weights; one kind of weight quantization throughout the config groups."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InputError(f"{where}: the compressed-tensors quantization_config has no config_groups")
    schemes = {_compressed_group_scheme(name, group, quant.get("format"), where) for name, group in groups.items()}
    if len(schemes) > 1:
        raise UnsupportedAdapterError(
            f"{where}: the compressed-tensors config groups quantize weights in different "
            f"ways ({', '.join(sorted(s.label for s in schemes))}); that is not supported"
        )
    return schemes.pop()


_CT_SUPPORTED = (
    "rslora-tools reads float-quantized FP8 (per tensor or channel), pack-quantized INT4/INT8 (per group "
    "or channel) and nvfp4-pack-quantized weights"
)


def _compressed_group_scheme(name: str, group: Any, fmt: Any, where: str) -> QuantScheme:
    weights = group.get("weights") if isinstance(group, dict) else None
    group_format = (group.get("format") if isinstance(group, dict) else None) or fmt
    if not isinstance(weights, dict):
        raise UnsupportedAdapterError(
            f"{where}: compressed-tensors config group {name!r} has no weight quantization "
            f"({group_format}); {_CT_SUPPORTED}"
        )
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    symmetric = weights.get("symmetric", True) is True
    size = weights.get("group_size")
    if weights.get("actorder") not in (None, "static", "weight"):
        raise UnsupportedAdapterError(
            f"{where}: compressed-tensors config group {name!r} uses activation-order group "
            f"indices (actorder {weights.get('actorder')!r}); that is not supported"
        )
    if (
        group_format == "float-quantized"
        and kind == "float"
        and bits == 8
        and strategy in ("tensor", "channel")
        and symmetric
    ):
        return QuantScheme("ct_fp8", format=f"per {strategy}")
    if (
        group_format == "pack-quantized"
        and kind == "int"
        and bits in (4, 8)
        and (strategy == "channel" or (strategy == "group" and isinstance(size, int) and size > 0))
    ):
        return QuantScheme(
            "ct_int", bits=bits, blocksize=size if strategy == "group" and isinstance(size, int) else -1, sym=symmetric
        )
    if (
        group_format == "nvfp4-pack-quantized"
        and kind == "float"
        and bits == 4
        and strategy == "tensor_group"
        and size == 16
        and symmetric
    ):
        return QuantScheme("ct_nvfp4", blocksize=16)
    raise UnsupportedAdapterError(
        f"{where}: compressed-tensors {group_format} ({kind} {bits}-bit, strategy {strategy}) in config group "
        f"{name!r} is not supported; {_CT_SUPPORTED}"
    )


def _fp8_scheme(quant: dict[str, Any], where: str) -> QuantScheme:
    block = quant.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
    ):
        raise InputError(f"{where}: fp8 weight_block_size is {block!r}; it must be two positive integers or null")
    skip = quant.get("modules_to_not_convert")
    return QuantScheme(
        "fp8",
        block=(block[0], block[1]) if block else None,
        skip_modules=tuple(skip) if isinstance(skip, list) else None,
    )


def _bitsandbytes_scheme(quant: dict[str, Any], where: str) -> QuantScheme:
    skip = quant.get("llm_int8_skip_modules")
    skip_modules = tuple(skip) if isinstance(skip, list) else None
    if quant.get("load_in_8bit") or quant.get("_load_in_8bit"):
        if quant.get("llm_int8_has_fp16_weight"):
            raise UnsupportedAdapterError(
                f"{where}: an 8-bit bitsandbytes checkpoint with llm_int8_has_fp16_weight "
                "keeps 16-bit weights; it is not supported"
            )
        return QuantScheme("int8", skip_modules=skip_modules)
    if not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        raise InputError(f"{where}: the bitsandbytes quantization_config loads neither 4-bit nor 8-bit")
    kind = quant.get("bnb_4bit_quant_type", "fp4")
    if kind not in BNB_4BIT:
        raise UnsupportedAdapterError(f"{where}: bitsandbytes 4-bit type {kind!r} is not supported (nf4 or fp4)")
    compute = dtype_from_name(quant.get("bnb_4bit_compute_dtype", "float32"))
    if compute is None:
        raise InputError(f"{where}: unknown bnb_4bit_compute_dtype {quant.get('bnb_4bit_compute_dtype')!r}")
    return QuantScheme(
        kind,
        double_quant=bool(quant.get("bnb_4bit_use_double_quant")),
        compute_dtype=compute,
        skip_modules=skip_modules,
    )


def _gptq_awq_scheme(quant: dict[str, Any], method: Literal["gptq", "awq"], where: str) -> QuantScheme:
    bits = quant.get("bits", 4)
    if type(bits) is not int:
        raise InputError(
            f"{where}: {method} quantization_config bits is {bits!r} ({type(bits).__name__}); it must be "
            "the number 4 or 8"
        )
    if bits not in (4, 8):
        raise UnsupportedAdapterError(f"{where}: {method} with {bits} bits is not supported (4 or 8 bits)")
    group = quant.get("group_size", 128)
    if not isinstance(group, int) or (group != -1 and group <= 0):
        raise InputError(f"{where}: {method} group_size {group!r} is not a positive integer or -1")
    skip = quant.get("modules_to_not_convert")
    skip_modules = tuple(skip) if isinstance(skip, list) else None
    if method == "awq":
        fmt = str(quant.get("version", quant.get("format", "gemm"))).lower()
        if fmt != "gemm":
            raise UnsupportedAdapterError(
                f"{where}: AWQ format {fmt!r} is not supported; only the GEMM packing is "
                "(AWQ's default, what transformers writes)"
            )
        if bits != 4:
            raise UnsupportedAdapterError(f"{where}: AWQ with {bits} bits is not supported (4 bits)")
        return QuantScheme("awq", blocksize=group, bits=4, sym=False, format="gemm", skip_modules=skip_modules)
    fmt = str(quant.get("checkpoint_format", quant.get("format", "gptq"))).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedAdapterError(f"{where}: GPTQ checkpoint format {fmt!r} is not supported (gptq or gptq_v2)")
    return QuantScheme(
        "gptq",
        blocksize=group,
        bits=bits,
        sym=bool(quant.get("sym", True)),
        desc_act=bool(quant.get("desc_act", False)),
        format=fmt,
        skip_modules=skip_modules,
    )


def trained_on_scheme(
    method: str,
    *,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    skip_modules: list[str] | None = None,
) -> QuantScheme:
    """`--trained-on nf4|fp4|int8`: the scheme transformers' BitsAndBytesConfig gives for that choice.

    BitsAndBytesConfig's defaults: no double quantization, no llm_int8_skip_modules; bitsandbytes'
    4-bit blocksize is 64.
    """
    skip = tuple(skip_modules) if skip_modules is not None else None
    if method not in ("nf4", "fp4", "int8"):
        raise InputError(f"unknown [[trained_on={method!r}]]; use nf4, fp4 or int8")
    if method == "int8":
        if double_quant or blocksize is not None:
            raise InputError(
                "[[trained_on_scheme(double_quant=True)]] and [[trained_on_scheme(blocksize=...)]] apply to 4-bit "
                "quantization (nf4, fp4), not int8"
            )
        return QuantScheme("int8", skip_modules=skip)
    size = 64 if blocksize is None else blocksize
    if size not in BNB_BLOCKSIZES:
        raise InputError(
            f"[[trained_on_scheme(blocksize={size})]] is not one bitsandbytes uses "
            f"({', '.join(map(str, BNB_BLOCKSIZES))})"
        )
    return QuantScheme(
        "nf4" if method == "nf4" else "fp4", blocksize=size, double_quant=bool(double_quant), skip_modules=skip
    )


RawReader = Callable[[str], bytes]  # a checkpoint tensor's raw bytes, by name


def quantized_weights(scheme: QuantScheme, checkpoint: Checkpoint, read: RawReader) -> dict[str, QuantizedWeight]:
    """Every quantized weight of a checkpoint, by the name the unquantized model gives it, each part's shape
    checked against the format (`_check_parts`) before anything is computed from it.

    `read` gives a small tensor's bytes (bitsandbytes' quant states are JSON stored as uint8).
    """
    where = str(checkpoint.folder)
    if scheme.method in BNB_4BIT:
        found = _bnb4_weights(scheme, checkpoint.tensor_names(), read, where)
    elif scheme.method == "int8":
        found = _int8_weights(scheme, checkpoint, read, where)
    elif scheme.method == "fp8":
        found = _fp8_weights(scheme, checkpoint, where)
    elif scheme.method == "mxfp4":
        found = _mxfp4_weights(scheme, checkpoint, where)
    elif scheme.method == "ct_fp8":
        found = _compressed_fp8_weights(scheme, checkpoint, where)
    elif scheme.method in ("ct_int", "ct_nvfp4"):
        found = _compressed_packed_weights(scheme, checkpoint, read, where)
    else:
        found = _packed_int_weights(scheme, checkpoint, where)
    for stored in found.values():
        _check_parts(stored, checkpoint, where)
        if "g_idx" in stored.parts:
            _check_group_indices(stored, checkpoint, read, where)
    return found


def _check_group_indices(stored: QuantizedWeight, checkpoint: Checkpoint, read: RawReader, where: str) -> None:
    """GPTQ's g_idx names, for each input feature, a group of scales that exists."""
    info = checkpoint.info(stored.parts["g_idx"])
    if info.dtype not in ("I32", "I64"):
        raise InputError(f"{where}: {stored.parts['g_idx']} is {info.dtype}; GPTQ stores group indices as integers")
    values = array("i" if info.dtype == "I32" else "q", bytes(read(stored.parts["g_idx"])))
    groups = checkpoint.info(stored.parts["scales"]).shape[0]
    if values and (min(values) < 0 or max(values) >= groups):
        raise InputError(
            f"{where}: {stored.parts['g_idx']} has group indices from {min(values)} to {max(values)}, "
            f"but {stored.parts['scales']} holds {groups} groups; the GPTQ checkpoint is corrupt"
        )


def _check_parts(stored: QuantizedWeight, checkpoint: Checkpoint, where: str) -> None:
    """Each stored part has the element count (or shape) its format gives for the weight's shape."""
    method = stored.scheme.method
    for role, want in _expected_parts(stored, checkpoint, where).items():
        info = checkpoint.info(stored.parts[role])
        have = info.numel if isinstance(want, int) else info.shape
        if have != want:
            what = f"{want} values" if isinstance(want, int) else f"shape {list(want)}"
            got = f"{have} values" if isinstance(have, int) else f"shape {list(have)}"
            raise InputError(
                f"{where}: {stored.parts[role]} has {got}; {method} needs {what} for {stored.name} "
                f"{list(stored.shape)}"
            )


def _expected_parts(stored: QuantizedWeight, checkpoint: Checkpoint, where: str) -> dict[str, tuple[int, ...] | int]:
    """Each stored part's shape (or element count, an int) by its format; parts whose size a rule of its own checks
    (a 4-bit weight's bytes, a float scale's shape, an int group size) are checked here."""
    n = 1
    for d in stored.shape:
        n *= d
    method, block = stored.scheme.method, stored.scheme.blocksize
    expected: dict[str, tuple[int, ...] | int] = {}  # role -> shape, or element count (an int)
    if method in BNB_4BIT:
        blocks = -(-n // block)
        expected = {"absmax": blocks, "quant_map": 16}
        packed = checkpoint.info(stored.parts["weight"])
        if packed.nbytes != -(-n // 2):
            raise InputError(
                f"{where}: {stored.parts['weight']} holds {packed.nbytes} bytes; {n} 4-bit values of "
                f"{stored.name} need {-(-n // 2)}"
            )
        if "nested_absmax" in stored.parts:
            expected |= {"nested_absmax": -(-blocks // stored.nested_blocksize), "nested_quant_map": 256}
    elif method == "int8":
        expected = {"SCB": stored.shape[0]}
    elif method == "fp8":
        *lead, rows, cols = stored.shape
        grid = (-(-rows // stored.scheme.block[0]), -(-cols // stored.scheme.block[1])) if stored.scheme.block else ()
        expected = {"scale_inv": (*lead, *grid) if grid else 1}
    elif method == "ct_fp8":
        scale = checkpoint.info(stored.parts["weight_scale"])
        if scale.numel != 1 and scale.shape != (stored.shape[0], 1):
            raise InputError(
                f"{where}: {stored.parts['weight_scale']} has shape {list(scale.shape)}; a float-quantized "
                f"weight of shape {list(stored.shape)} takes one scale or [{stored.shape[0]}, 1]"
            )
    elif method == "mxfp4":
        experts, columns, rows = stored.shape
        expected = {"scales": (experts, rows, columns // 32)}
    elif method == "ct_int":
        rows, cols = stored.shape
        bits, size = stored.scheme.bits, stored.scheme.blocksize
        scales = -(-cols // size) if size > 0 else 1
        if size > 0 and cols % size:
            raise InputError(f"{where}: {stored.name} has {cols} inputs, not a multiple of its group size {size}")
        expected = {"weight_packed": (rows, -(-cols * bits // 32)), "weight_scale": (rows, scales)}
        if "weight_zero_point" in stored.parts:
            expected["weight_zero_point"] = (-(-rows * bits // 32), scales)
    elif method == "ct_nvfp4":
        rows, cols = stored.shape
        expected = {"weight_scale": (rows, cols // 16), "weight_global_scale": 1}
    else:
        out_features, in_features = stored.shape
        groups = 1 if block == -1 else -(-in_features // block)
        per_int = 32 // stored.scheme.bits
        expected = {"scales": (groups, out_features), "qzeros": (groups, -(-out_features // per_int))}
        if method == "gptq":
            expected["g_idx"] = (in_features,)
    return expected


def _bnb4_weights(scheme: QuantScheme, names: list[str], read: RawReader, where: str) -> dict[str, QuantizedWeight]:
    present = set(names)
    found = {}
    for key in names:
        weight, sep, kind = key.partition(".quant_state.bitsandbytes__")
        if not sep:
            continue
        state = _quant_state(read(key), key, where)
        if kind != scheme.method or state.get("quant_type") != scheme.method:
            raise UnsupportedAdapterError(
                f"{where}: {key} is {kind} but the config says {scheme.method}; mixed 4-bit types are not supported"
            )
        roles = {
            "weight": weight,
            "absmax": weight + ".absmax",
            "quant_map": weight + ".quant_map",
            "quant_state": key,
        }
        nested = "nested_offset" in state
        if nested:
            roles |= {"nested_absmax": weight + ".nested_absmax", "nested_quant_map": weight + ".nested_quant_map"}
        missing = [k for k in roles.values() if k not in present]
        if missing:
            raise InputError(f"{where}: the quantized weight {weight!r} lacks {missing[0]!r}")
        shape, dtype = state.get("shape"), dtype_from_name(state.get("dtype"))
        blocksize = state.get("blocksize")
        if (
            not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape))
            or dtype is None
            or blocksize not in BNB_BLOCKSIZES
        ):
            raise InputError(f"{where}: {key} is not a bitsandbytes quant state (shape, dtype, blocksize)")
        own = QuantScheme(
            scheme.method,
            blocksize=blocksize,
            double_quant=nested,
            compute_dtype=scheme.compute_dtype,
            skip_modules=scheme.skip_modules,
        )
        found[weight] = QuantizedWeight(
            weight,
            own,
            roles,
            tuple(shape),
            dtype,
            nested_offset=float(state.get("nested_offset", 0.0)),
            nested_blocksize=int(state.get("nested_blocksize", 256)),
        )
    return found


def _quant_state(raw: bytes, key: str, where: str) -> dict[str, Any]:
    try:
        state = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{where}: {key} is not a bitsandbytes quant state (JSON)") from None
    if not isinstance(state, dict):
        raise InputError(f"{where}: {key} is not a bitsandbytes quant state (JSON object)")
    return state


def _int8_weights(
    scheme: QuantScheme, checkpoint: Checkpoint, read: RawReader, where: str
) -> dict[str, QuantizedWeight]:
    present = checkpoint.weight_map
    found = {}
    for key in checkpoint.tensor_names():
        if not key.endswith(".SCB"):
            continue
        module = key[: -len(".SCB")]
        weight = module + ".weight"
        if weight not in present or len(checkpoint.info(weight).shape) != 2 or checkpoint.info(weight).dtype != "I8":
            raise InputError(f"{where}: {key} has no 2-D int8 weight {weight!r} beside it")
        roles = {"weight": weight, "SCB": key}
        if module + ".weight_format" in present:
            roles["weight_format"] = module + ".weight_format"
            layout = read(roles["weight_format"])
            if any(layout):  # bitsandbytes: 0 "row"; 1-3 are GPU tile layouts of old releases
                raise UnsupportedAdapterError(
                    f"{where}: {roles['weight_format']} says the int8 weight is stored in "
                    f"tile layout {layout[0]}, not row-major; it is not supported"
                )
        found[weight] = QuantizedWeight(weight, scheme, roles, checkpoint.info(weight).shape, "F32")
    return found


def _packed_int_weights(scheme: QuantScheme, checkpoint: Checkpoint, where: str) -> dict[str, QuantizedWeight]:
    """GPTQ and AWQ: `<module>.qweight` with `qzeros` and `scales` (and GPTQ's `g_idx`); the weight is (out, in)."""
    present = checkpoint.weight_map
    found = {}
    per_int = 32 // scheme.bits
    for key in checkpoint.tensor_names():
        if not key.endswith(".qweight"):
            continue
        module = key[: -len(".qweight")]
        roles = {"qweight": key, "qzeros": module + ".qzeros", "scales": module + ".scales"}
        if scheme.method == "gptq":
            roles["g_idx"] = module + ".g_idx"
        missing = [k for k in roles.values() if k not in present]
        if missing:
            raise InputError(f"{where}: the quantized module {module!r} lacks {missing[0]!r}")
        packed, scales = checkpoint.info(key), checkpoint.info(roles["scales"])
        if len(packed.shape) != 2 or len(scales.shape) != 2 or packed.dtype != "I32":
            raise InputError(
                f"{where}: {key} is {packed.dtype}{list(packed.shape)} and {roles['scales']} "
                f"{list(scales.shape)}; {scheme.method} stores 2-D int32 words and 2-D scales"
            )
        rows, cols = packed.shape
        out_features = scales.shape[1]
        in_features = rows * per_int if scheme.method == "gptq" else rows
        if scheme.method == "awq" and cols * per_int != out_features:
            raise InputError(f"{where}: {key} has shape {[rows, cols]}, which does not pack {out_features} outputs")
        if scheme.method == "gptq" and cols != out_features:
            raise InputError(f"{where}: {key} has shape {[rows, cols]}, which does not fit {out_features} outputs")
        found[module + ".weight"] = QuantizedWeight(
            module + ".weight", scheme, roles, (out_features, in_features), scales.dtype
        )
    return found


FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")
_E8M0_DTYPES = ("U8", "F8_E8M0")  # ue8m0 scales (2 ** (byte - 127)), as MXFP8 checkpoints store them


def _fp8_weights(scheme: QuantScheme, checkpoint: Checkpoint, where: str) -> dict[str, QuantizedWeight]:
    """Block-scaled FP8: every float8 `.weight` with its `.weight_scale_inv`; a float8 weight without one is
    refused."""
    present = checkpoint.weight_map
    found = {}
    for key in checkpoint.tensor_names():
        info = checkpoint.info(key)
        if key.endswith(".weight_scale_inv"):
            weight = key[: -len("_scale_inv")]
            if weight not in present:
                raise InputError(f"{where}: {key} has no weight {weight!r} beside it")
            if checkpoint.info(weight).dtype not in FP8_WEIGHT_DTYPES:
                raise UnsupportedAdapterError(
                    f"{where}: {weight} is {checkpoint.info(weight).dtype}, scaled by {key}; "
                    "only float8 (e4m3, e5m2) weights of an fp8 checkpoint are supported "
                    "(not packed FP4)"
                )
            continue
        if info.dtype not in FP8_WEIGHT_DTYPES:
            continue
        scale = key + "_scale_inv"
        if not key.endswith(".weight") or scale not in present:
            raise InputError(
                f"{where}: {key} is {info.dtype} without a {scale.rpartition('.')[2]!r} beside it; the "
                "fp8 checkpoint is incomplete (rslora-tools never adds a delta to raw float8 values)"
            )
        if len(info.shape) < 2:
            raise InputError(
                f"{where}: {key} is a float8 tensor of shape {list(info.shape)}; fp8 weights are matrices"
            )
        scale_info = checkpoint.info(scale)
        if scale_info.dtype not in ("F32", "BF16", "F16", *_E8M0_DTYPES):
            raise InputError(f"{where}: {scale} is {scale_info.dtype}; fp8 scales are float32, bfloat16 or ue8m0")
        roles = {"weight": key, "scale_inv": scale}
        for side in (".activation_scale", ".input_scale"):
            if key[: -len(".weight")] + side in present:
                roles[side[1:]] = key[: -len(".weight")] + side
        found[key] = QuantizedWeight(key, scheme, roles, info.shape, "F32")
    return found


def _compressed_fp8_weights(scheme: QuantScheme, checkpoint: Checkpoint, where: str) -> dict[str, QuantizedWeight]:
    """compressed-tensors float-quantized: each float8 `.weight` with its `.weight_scale` (dequantized in the scale's
    dtype, as compressed-tensors' `_dequantize` does); a float8 weight without one is refused."""
    present = checkpoint.weight_map
    found = {}
    for key in checkpoint.tensor_names():
        info = checkpoint.info(key)
        if info.dtype not in FP8_WEIGHT_DTYPES:
            continue
        module = key[: -len(".weight")]
        scale = module + ".weight_scale"
        if not key.endswith(".weight") or scale not in present:
            raise InputError(
                f"{where}: {key} is {info.dtype} without a 'weight_scale' beside it; the compressed-tensors "
                "checkpoint is incomplete (rslora-tools never adds a delta to raw float8 values)"
            )
        scale_dtype = checkpoint.info(scale).dtype
        if scale_dtype not in ("F32", "BF16", "F16") or len(info.shape) != 2:
            raise InputError(
                f"{where}: {key} {list(info.shape)} with a {scale_dtype} scale is not a float-quantized "
                "weight (a matrix with a float scale)"
            )
        roles = {"weight": key, "weight_scale": scale}
        for side in ("input_scale", "weight_zero_point", "input_zero_point"):
            if f"{module}.{side}" in present:
                roles[side] = f"{module}.{side}"
        found[key] = QuantizedWeight(key, scheme, roles, info.shape, scale_dtype)
    return found


def _compressed_packed_weights(
    scheme: QuantScheme, checkpoint: Checkpoint, read: RawReader, where: str
) -> dict[str, QuantizedWeight]:
    """compressed-tensors pack-quantized and nvfp4-pack-quantized: each `<module>.weight_packed` with its scales
    (and `weight_shape`, zero points, global scale); the dequantized weight is `<module>.weight`, (out, in)."""
    present = checkpoint.weight_map
    found = {}
    nvfp4 = scheme.method == "ct_nvfp4"
    for key in checkpoint.tensor_names():
        if key.endswith(".weight_g_idx"):
            raise UnsupportedAdapterError(f"{where}: {key}: activation-order group indices are not supported")
        if not key.endswith(".weight_packed"):
            continue
        module = key[: -len(".weight_packed")]
        roles = {"weight_packed": key, "weight_scale": module + ".weight_scale"}
        roles |= (
            {"weight_global_scale": module + ".weight_global_scale"}
            if nvfp4
            else {"weight_shape": module + ".weight_shape"}
        )
        if not nvfp4 and not scheme.sym:
            roles["weight_zero_point"] = module + ".weight_zero_point"
        missing = [k for k in roles.values() if k not in present]
        if missing:
            raise InputError(f"{where}: the quantized module {module!r} lacks {missing[0]!r}")
        for side in ("input_global_scale", "input_scale", "input_zero_point"):
            if f"{module}.{side}" in present:
                roles[side] = f"{module}.{side}"
        packed = checkpoint.info(key)
        want = "U8" if nvfp4 else "I32"
        if packed.dtype != want or len(packed.shape) != 2:
            raise InputError(f"{where}: {key} is {packed.dtype}{list(packed.shape)}; {scheme.label} stores 2-D {want}")
        scale_dtype = checkpoint.info(roles["weight_scale"]).dtype
        if nvfp4:
            shape: tuple[int, ...] = (packed.shape[0], packed.shape[1] * 2)
            dtype = "BF16"  # compressed-tensors unpacks e2m1 values to bfloat16 and dequantizes in it
            if scale_dtype != "F8_E4M3":
                raise InputError(f"{where}: {roles['weight_scale']} is {scale_dtype}; NVFP4 scales are float8 e4m3")
        else:  # per group the scales give the shape (compressed-tensors needs whole groups): no tensor data read,
            # so a streamed base plans from headers; the stored weight_shape is checked when the weight is dequantized
            scale_shape = checkpoint.info(roles["weight_scale"]).shape
            if scheme.blocksize > 0 and len(scale_shape) == 2:
                shape = (packed.shape[0], scale_shape[1] * scheme.blocksize)
            elif checkpoint.remote:  # per channel, streamed: the packed width, checked against weight_shape later
                shape = (packed.shape[0], packed.shape[1] * 32 // scheme.bits)
            else:
                shape = _stored_shape(checkpoint, roles["weight_shape"], read, where)
            dtype = scale_dtype
            if scale_dtype not in ("F32", "BF16", "F16"):
                raise InputError(
                    f"{where}: {roles['weight_scale']} is {scale_dtype}; pack-quantized scales are floats"
                )
        found[module + ".weight"] = QuantizedWeight(module + ".weight", scheme, roles, shape, dtype)
    return found


def _stored_shape(checkpoint: Checkpoint, name: str, read: RawReader, where: str) -> tuple[int, ...]:
    info = checkpoint.info(name)
    if info.dtype not in ("I64", "I32") or info.shape != (2,):
        raise InputError(f"{where}: {name} is {info.dtype}{list(info.shape)}; it must hold a weight's two dimensions")
    values = tuple(array("q" if info.dtype == "I64" else "i", bytes(read(name))))
    if any(v <= 0 for v in values):
        raise InputError(f"{where}: {name} says the weight's shape is {list(values)}")
    return values


def _mxfp4_weights(scheme: QuantScheme, checkpoint: Checkpoint, where: str) -> dict[str, QuantizedWeight]:
    """MXFP4 experts: `<param>_blocks` (E, R, G, 16) uint8 with `<param>_scales` (E, R, G) uint8; the dequantized
    parameter is (E, G * 32, R), as transformers lays gpt-oss's experts out (input features first)."""
    present = checkpoint.weight_map
    config = checkpoint.config or {}
    dtype = config_dtype(config) or "BF16"
    found = {}
    for key in checkpoint.tensor_names():
        if not key.endswith("_blocks"):
            continue
        name = key[: -len("_blocks")]
        scales = name + "_scales"
        if scales not in present:
            raise InputError(f"{where}: {key} has no {scales.rpartition('.')[2]!r} beside it")
        blocks = checkpoint.info(key)
        if (
            blocks.dtype != "U8"
            or len(blocks.shape) != 4
            or blocks.shape[3] != 16
            or checkpoint.info(scales).dtype != "U8"
        ):
            raise InputError(
                f"{where}: {key} is {blocks.dtype}{list(blocks.shape)}; MXFP4 stores uint8 blocks of shape "
                "[experts, rows, groups, 16] with uint8 scales"
            )
        experts, rows, groups, _ = blocks.shape
        found[name] = QuantizedWeight(
            name, scheme, {"blocks": key, "scales": scales}, (experts, groups * 32, rows), dtype
        )
    return found
