"""Quantized checkpoints built from known codes (GPTQ), and a LoRA for them: shared by the QLoRA tests and the
reliability table's malformed quantized bases; and compressed-tensors' own compressor on one weight (ct_compress)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(in, out) codes -> int32 words of 32/bits fields along the rows, lowest bits first (GPTQ qweight)."""
    k = 32 // bits
    words = torch.zeros(codes.shape[0] // k, codes.shape[1], dtype=torch.int64)
    for j in range(k):
        words |= codes[j::k].to(torch.int64) << (bits * j)
    return _as_int32(words)


def _pack_cols(codes: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """(rows, cols) codes -> int32 words of 32/bits fields along the columns, field j holding column order[j]."""
    k = 32 // bits
    order = order or list(range(k))
    words = torch.zeros(codes.shape[0], codes.shape[1] // k, dtype=torch.int64)
    for j in range(k):
        words |= codes[:, order[j] :: k].to(torch.int64) << (bits * j)
    return _as_int32(words)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _gptq_checkpoint(folder: Path, bits: int, fmt: str, desc_act: bool, group: int = 16) -> tuple[Path, torch.Tensor]:
    """A one-layer GPTQ checkpoint from known codes; returns it and the weight it encodes, (out, in) fp16."""
    torch.manual_seed(4)
    out_f, in_f = 24, 64
    groups = in_f // group
    maxq = 2**bits - 1
    q = torch.randint(0, maxq + 1, (in_f, out_f))
    zeros = torch.randint(1, maxq, (groups, out_f))  # a v1 checkpoint stores zero - 1: keep it >= 0
    scales = (torch.rand(groups, out_f) * 0.01 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_f) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(in_f)]
    weight = (scales[g_idx].float() * (q - zeros[g_idx]).float()).to(torch.float16).T.contiguous()
    stored_zeros = zeros - 1 if fmt == "gptq" else zeros
    tensors = {
        "model.proj.qweight": _pack_rows(q, bits),
        "model.proj.qzeros": _pack_cols(stored_zeros, bits),
        "model.proj.scales": scales,
        "model.proj.g_idx": g_idx.to(torch.int32),
        "model.norm.weight": torch.ones(in_f, dtype=torch.float16),
    }
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "model_type": "toy",
        "dtype": "float16",
        "quantization_config": {
            "quant_method": "gptq",
            "bits": bits,
            "group_size": group,
            "desc_act": desc_act,
            "sym": False,
            "checkpoint_format": fmt,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, weight


def _lora_for_proj(folder: Path, out_f: int, in_f: int) -> Path:
    torch.manual_seed(5)
    folder.mkdir(parents=True)
    save_file(
        {
            "base_model.model.model.proj.lora_A.weight": torch.randn(4, in_f) * 0.1,
            "base_model.model.model.proj.lora_B.weight": torch.randn(out_f, 4) * 0.1,
        },
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["proj"]})
    )
    return folder


def ct_compress(
    w: torch.Tensor, args, global_scale: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], Any, Any]:
    """One weight through compressed-tensors' own compressor for `args` (a QuantizationArgs: pack-quantized INT, or
    NVFP4 when 4-bit float), its scales from calculate_qparams on min/max as its observers take them (NVFP4: and
    generate_gparam's global scale, or `global_scale`, its fused group's as llm-compressor sets it). Returns the
    stored tensors by role, the compressor and the scheme."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    nvfp4 = args.type == "float" and args.num_bits == 4
    size = args.group_size or w.shape[1]
    groups = w.unflatten(-1, (w.shape[1] // size, size))
    state = {"weight": w}
    if nvfp4:
        state["weight_global_scale"] = generate_gparam(w.amin(), w.amax()) if global_scale is None else global_scale
    state["weight_scale"], state["weight_zero_point"] = calculate_qparams(
        groups.amin(-1), groups.amax(-1), args, global_scale=state.get("weight_global_scale")
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = NVFP4PackedCompressor if nvfp4 else PackedQuantizationCompressor
    return compressor.compress(state, scheme), compressor, scheme


def fused_global_scales(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llm-compressor's update_fused_layer_weight_global_scales on a Llama's weights (module -> weight): q/k/v of a
    layer, and its gate/up, each given the smallest of the members' generate_gparam (module -> global scale)."""
    from compressed_tensors.quantization.utils import generate_gparam

    own = {m: generate_gparam(w.amin(), w.amax()) for m, w in weights.items()}
    shared = {}
    for m in own:
        parent, _, leaf = m.rpartition(".")
        group = {
            "q_proj": ("q_proj", "k_proj", "v_proj"),
            "k_proj": ("q_proj", "k_proj", "v_proj"),
            "v_proj": ("q_proj", "k_proj", "v_proj"),
            "gate_proj": ("gate_proj", "up_proj"),
            "up_proj": ("gate_proj", "up_proj"),
        }.get(leaf, (leaf,))
        shared[m] = torch.min(torch.cat([own[f"{parent}.{g}"] for g in group])).reshape([1])
    return shared
