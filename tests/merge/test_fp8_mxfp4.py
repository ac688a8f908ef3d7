"""Block-scaled FP8, compressed-tensors FP8 and MXFP4 bases, merged into the weights the adapter was trained on.

The oracle: transformers loads the quantized checkpoint dequantized (FP8 on a machine without a GPU, MXFP4 with
`Mxfp4Config(dequantize=True)`, compressed-tensors with `CompressedTensorsConfig(dequantize=True)`, which
decompresses through the compressed-tensors package), PEFT merges, `save_pretrained` writes. Test checkpoints are
packed here from
known codes (transformers quantizes FP8 only on a GPU). Where transformers 5.25 dequantizes FP8 wrongly (a
dimension that is not a multiple of the block: it derives the block from the scale grid), the oracle is the
format's definition (one scale per `weight_block_size` block, the edge blocks partial), as DeepSeek's
reference dequantization computes it (docs/quantization.md, "FP8 and MXFP4").
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from helpers import cli_run
from peft import LoraConfig, PeftModel, get_peft_model
from peft_oracle import assert_same_tensors, read_folder
from quant_builders import ct_compress
from safetensors.torch import load_file, save_file

from rslora_tools.compute.quantization import dequantize_fp8, dequantize_mxfp4


def tiny_llama(folder: Path, hidden: int, intermediate: int, kv_heads: int = 2) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def definition(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """FP8 blocks by their definition, block by block: q * scale of its block in float32 (edges partial)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale[i, j]
    return out


def fp8_checkpoint(base: Path, folder: Path, block: int) -> dict[str, torch.Tensor]:
    """BASE's projections as block-scaled FP8 (amax / 448 per block), the rest as it is; returns the definition's
    dequantized weights (bf16) by name."""
    tensors, reference = {}, {}
    for name, w in load_file(base / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            tensors[name] = w
            continue
        rows, cols = w.shape
        grid = (-(-rows // block), -(-cols // block))
        scale = torch.empty(grid)
        q = torch.empty(w.shape)
        for i in range(grid[0]):
            for j in range(grid[1]):
                part = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
                scale[i, j] = part.abs().max() / 448.0
                q[i * block : (i + 1) * block, j * block : (j + 1) * block] = part / scale[i, j]
        tensors[name] = q.to(torch.float8_e4m3fn)
        tensors[name[: -len("weight")] + "weight_scale_inv"] = scale
        reference[name] = definition(tensors[name], scale, block).to(torch.bfloat16)
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "weight_block_size": [block, block],
        "activation_scheme": "dynamic",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return reference


def adapter(base: Path, folder: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        get_peft_model(model, LoraConfig(init_lora_weights=False, **config)).save_pretrained(folder)
    return folder


def peft_merge(model, adapter_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(out)
    return read_folder(out)


LORA = dict(
    r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]
)


def test_fp8_blocks_merge_as_peft_merges_the_model_transformers_dequantizes(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)  # every dimension a multiple of 32
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    result = cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out")
    assert "the base is quantized (fp8 (blocks 32x32)): 14 weights are dequantized and merged in BF16" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)  # no GPU: dequantized
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merge(model, ad, tmp_path / "peft"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    report = json.loads(cli_run("inspect", ad, "--base", tmp_path / "fp8", "--json").stdout)
    assert report["base_format"] == "fp8 (blocks 32x32)"
    changed = sorted(sum(report["applies_to"].values(), []))
    assert len(changed) == 10 and sorted(report["quantized_targets"]) == changed  # 5 projections x 2 layers, all fp8
    assert not any(k.endswith("scale_inv") for k in read_folder(tmp_path / "out"))


def test_partial_fp8_blocks_follow_the_format(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)  # k/v: 48 rows; blocks of 32: partial edges
    reference = fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.load_state_dict(reference, strict=False)
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merge(model, ad, tmp_path / "peft"))
    if transformers.__version__ == "5.25.0":  # the fact docs/quantization.md records for this release
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).state_dict()
        wrong = sorted(k for k in reference if not torch.equal(loaded[k], reference[k]))
        assert wrong == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "kv"]


def test_fp8_dequantization_is_transformers_op_for_op():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    torch.manual_seed(2)
    q = (torch.randn(3, 64, 96) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(3, 2, 3) / 100
    ue8m0 = torch.randint(110, 130, (3, 2, 3), dtype=torch.uint8)
    for s in (scale, ue8m0):
        theirs = Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16)
        assert torch.equal(dequantize_fp8(q, s, (32, 32)).to(torch.bfloat16), theirs)


def test_a_float8_weight_without_its_scale_is_refused(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    ad = adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", code=1)
    assert (
        "model.layers.0.mlp.up_proj.weight is F8_E4M3 without a 'weight_scale_inv' beside it; the fp8 checkpoint "
        "is incomplete (rslora-tools never adds a delta to raw float8 values)"
    ) in result.output
    assert not (tmp_path / "out").exists()


def gpt_oss_mxfp4(folder: Path, intermediate: int = 96) -> Path:
    """A tiny gpt-oss whose experts are MXFP4 (random codes and exponents), the rest bf16, as OpenAI ships it."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder / "bf16")
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, t in load_file(folder / "bf16" / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = t.shape  # stored (E, in, out); packed as (E, out, in / 32, 16)
            tensors[name + "_blocks"] = torch.randint(
                0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8, generator=generator
            )
            tensors[name + "_scales"] = torch.randint(
                118, 126, (experts, outputs, inputs // 32), dtype=torch.uint8, generator=generator
            )
        else:
            tensors[name] = t
    (folder / "mxfp4").mkdir()
    save_file(tensors, folder / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config_json = json.loads((folder / "bf16" / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "mxfp4" / "config.json").write_text(json.dumps(config_json))
    return folder / "mxfp4"


@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
def test_mxfp4_experts_merge_as_peft_merges_the_model_transformers_dequantizes(tmp_path, use_rslora):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    base = gpt_oss_mxfp4(tmp_path)
    ad = adapter(
        tmp_path / "bf16",
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        use_rslora=use_rslora,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    result = cli_run("merge", base, ad, tmp_path / "out")
    assert "the base is quantized (mxfp4 (blocks of 32, e8m0 scales)): 4 weights are dequantized" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True)
        )
    merged = read_folder(tmp_path / "out")
    assert_same_tensors(merged, peft_merge(model, ad, tmp_path / "peft"))
    assert merged["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 192)
    assert not any(k.endswith(("_blocks", "_scales")) for k in merged)
    text = cli_run("inspect", ad, "--base", base).output
    assert (
        "  base format: mxfp4 (blocks of 32, e8m0 scales); 4 of the 6 tensors the adapter changes are stored "
        "quantized (merge dequantizes them and writes them unquantized)"
    ) in text


def test_square_gpt_oss_experts_merge_as_peft_merges_them(tmp_path):
    """gpt-oss's down_proj is square (hidden = intermediate = 2880): oriented as PEFT orients it (is_transposed)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    base = gpt_oss_mxfp4(tmp_path, intermediate=64)
    ad = adapter(
        tmp_path / "bf16",
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    for quantized, folder in ((False, tmp_path / "bf16"), (True, base)):
        cli_run("merge", folder, ad, tmp_path / f"out-{quantized}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"quantization_config": Mxfp4Config(dequantize=True)} if quantized else {}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **extra)
        merged = read_folder(tmp_path / f"out-{quantized}")
        assert merged["model.layers.0.mlp.experts.down_proj"].shape == (4, 64, 64)
        assert_same_tensors(merged, peft_merge(model, ad, tmp_path / f"peft-{quantized}"))


def test_mxfp4_dequantization_is_transformers_op_for_op():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(4)
    blocks = torch.randint(0, 256, (2, 48, 3, 16), dtype=torch.uint8)
    scales = torch.randint(100, 140, (2, 48, 3), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(
            dequantize_mxfp4(blocks, scales, dtype), convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        )


def compressed_fp8_checkpoint(base: Path, folder: Path, strategy: str, scale_dtype: torch.dtype) -> None:
    """BASE's projections as llm-compressor writes FP8 (`float-quantized`): float8 weight, `weight_scale` per tensor
    or per output channel."""
    tensors = {}
    for name, w in load_file(base / "model.safetensors").items():
        if not name.endswith("proj.weight"):
            tensors[name] = w
            continue
        w = w.float()
        amax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().max().reshape(1)
        scale = (amax / 448.0).to(scale_dtype)
        tensors[name] = (w / scale.float()).to(torch.float8_e4m3fn)
        tensors[name[: -len("weight")] + "weight_scale"] = scale
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "weights": {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False},
            }
        },
        "ignore": ["lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("strategy", "scale_dtype"), [("channel", torch.bfloat16), ("tensor", torch.float32)])
def test_compressed_tensors_fp8_merges_as_peft_merges_the_decompressed_model(tmp_path, strategy, scale_dtype):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    compressed_fp8_checkpoint(base, tmp_path / "ct", strategy, scale_dtype)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    result = cli_run("merge", tmp_path / "ct", ad, tmp_path / "out")
    assert f"compressed-tensors float-quantized fp8 (per {strategy})" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merge(model, ad, tmp_path / "peft"))


def test_other_compressed_tensors_formats_are_refused_by_name(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)
    compressed_fp8_checkpoint(base, tmp_path / "ct", "channel", torch.bfloat16)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config["quantization_config"]["format"] = "int-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        type="int", num_bits=8, strategy="channel"
    )
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    ad = adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", code=1)
    assert (
        "compressed-tensors int-quantized (int 8-bit, strategy channel) in config group 'group_0' is not supported; "
        "rslora-tools reads float-quantized FP8 (per tensor or channel), pack-quantized INT4/INT8 (per group or "
        "channel) and nvfp4-pack-quantized weights"
    ) in result.output


def compressed_packed_checkpoint(base: Path, folder: Path, fmt: str, weights: dict, fused: bool = False) -> None:
    """BASE's projections compressed by compressed-tensors' own compressor for `fmt` (quant_builders.ct_compress),
    the rest as it is; `fused` (NVFP4): q/k/v and gate/up with one global scale each, as llm-compressor writes them."""
    from compressed_tensors.quantization import QuantizationArgs
    from quant_builders import fused_global_scales

    args = QuantizationArgs(**weights)
    stored = load_file(base / "model.safetensors")
    shared = fused_global_scales(
        {n.removesuffix(".weight"): w for n, w in stored.items() if n.endswith("proj.weight")}
    )
    tensors = {}
    for name, w in stored.items():
        if not name.endswith("proj.weight"):
            tensors[name] = w
            continue
        module = name[: -len("weight")]
        scale = shared[module.removesuffix(".")] if fused else None
        tensors |= {module + key: value for key, value in ct_compress(w, args, scale)[0].items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": weights}},
        "ignore": ["lm_head"],
    }
    (folder / "config.json").write_text(json.dumps(config))


PACKED = {
    "int4-group": ("pack-quantized", dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True)),
    "int4-group-asym": (
        "pack-quantized",
        dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    ),
    "int8-channel": ("pack-quantized", dict(num_bits=8, type="int", strategy="channel", symmetric=True)),
    "nvfp4": (
        "nvfp4-pack-quantized",
        dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True),
    ),
}


@pytest.mark.parametrize("kind", list(PACKED))
def test_compressed_tensors_packed_formats_merge_as_peft_merges_the_decompressed_model(tmp_path, kind):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    fmt, weights = PACKED[kind]
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    compressed_packed_checkpoint(base, tmp_path / "ct", fmt, weights)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    result = cli_run("merge", tmp_path / "ct", ad, tmp_path / "out")
    assert f"compressed-tensors {fmt}" in result.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / "ct", dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    merged = read_folder(tmp_path / "out")
    assert_same_tensors(merged, peft_merge(model, ad, tmp_path / "peft"))
    assert not any(k.endswith(("weight_packed", "weight_scale", "weight_shape")) for k in merged)


def test_packed_dequantization_is_compressed_tensors_op_for_op():
    from compressed_tensors.quantization import QuantizationArgs

    from rslora_tools.compute.quantization import dequantize_ct_int, dequantize_nvfp4

    torch.manual_seed(6)
    for rows, cols in ((48, 96), (37, 64)):  # 37 rows: zero points straddle int32 words
        w = torch.randn(rows, cols, dtype=torch.bfloat16)
        for bits in (4, 8):
            for size, sym in ((32, True), (32, False), (None, True), (None, False)):
                args = QuantizationArgs(
                    num_bits=bits, type="int", strategy="group" if size else "channel", group_size=size, symmetric=sym
                )
                packed, compressor, scheme = ct_compress(w, args)
                theirs = compressor.decompress(packed, scheme)["weight"]
                ours = dequantize_ct_int(
                    packed["weight_packed"],
                    packed["weight_scale"],
                    packed.get("weight_zero_point"),
                    (rows, cols),
                    bits,
                )
                assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), (rows, bits, size, sym)
        args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
        packed, compressor, scheme = ct_compress(w, args)
        theirs = compressor.decompress(packed, scheme)["weight"]
        ours = dequantize_nvfp4(packed["weight_packed"], packed["weight_scale"], packed["weight_global_scale"])
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


@pytest.mark.parametrize("variant", ["ue8m0-scales", "e5m2-codes", "nan-code"])
def test_the_fp8_kernel_path_gives_the_torch_paths_bits(tmp_path, variant, monkeypatch):
    """The kernel dequantizes float8 bands straight into the merge dtype; torch computes float32(q) * scale, then
    .to(dtype) (proven against transformers above). A NaN code sends the tensor back to torch."""
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    generator = torch.Generator().manual_seed(8)
    for name in [n for n in tensors if n.endswith("weight_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        if variant == "ue8m0-scales":
            tensors[name] = torch.randint(115, 125, tensors[name].shape, dtype=torch.uint8, generator=generator)
        elif variant == "e5m2-codes":
            tensors[weight] = tensors[weight].float().to(torch.float8_e5m2)
        elif weight.endswith("layers.0.mlp.up_proj.weight"):
            tensors[weight].view(torch.uint8)[0, 0] = 0x7F  # NaN in e4m3fn
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    ad = adapter(base, tmp_path / "adapter", **LORA)
    report = json.loads(cli_run("merge", tmp_path / "fp8", ad, tmp_path / "kernel", "--dry-run", "--json").stdout)
    assert {c["by"] for c in report["changes"]} == {"dequant-kernel"}
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "kernel")
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "torch")
    kernel_out, torch_out = read_folder(tmp_path / "kernel"), read_folder(tmp_path / "torch")
    assert sorted(kernel_out) == sorted(torch_out)
    assert all(torch.equal(kernel_out[k].view(torch.uint8), torch_out[k].view(torch.uint8)) for k in kernel_out)


def test_a_weight_shape_the_scales_contradict_is_refused(tmp_path):
    """Per group the scales give the shape (so a streamed base plans from headers); the stored weight_shape must
    agree."""
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    compressed_packed_checkpoint(base, tmp_path / "ct", *PACKED["int4-group"])
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([160, 64])
    save_file(tensors, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})
    ad = adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", code=1)
    assert (
        "model.layers.0.mlp.up_proj.weight_shape says [160, 64], but the packed weight and its scales are "
        "[160, 96]; the compressed-tensors checkpoint is corrupt"
    ) in result.output
    assert not (tmp_path / "out").exists()
