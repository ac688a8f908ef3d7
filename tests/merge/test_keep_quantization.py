"""`merge --keep-quantization`: the merged weights written back in the base's own format.

The oracle: PEFT merges into the model transformers dequantizes (as in test_fp8_mxfp4.py), then the format's own
quantizer quantizes the merged weights: transformers 5.25's `Fp8Quantize` for block-scaled FP8, compressed-tensors'
`calculate_qparams` and `quantize` for its float-quantized FP8. The written codes and scales must equal those, the
other stored tensors must be the base's bytes, and transformers must load the result as it loads the base.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import cli_run, edit_tensors
from safetensors.torch import load_file, save_file
from test_fp8_mxfp4 import (
    LORA,
    adapter,
    compressed_fp8_checkpoint,
    fp8_checkpoint,
    gpt_oss_mxfp4,
    peft_merge,
    tiny_llama,
)

from rslora_tools.compute.requantize import quantize_fp8_blocks


def fp8_quantize(w: torch.Tensor, block: int, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own FP8 quantizer (what FineGrainedFP8Config applies to a bf16 model)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=[block, block], scale_fmt=scale_fmt)
    out = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("x.weight", w)
    return out["x.weight"], out["x.weight_scale_inv"]


def load_dequantized(folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).state_dict()


def peft_reference(tmp_path: Path, quantized: Path, ad: Path, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's merge into the model transformers dequantizes from `quantized`."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16, **kwargs)
    return peft_merge(model, ad, tmp_path / "peft")


CHANGED = [
    f"model.layers.{i}.{p}"
    for i in range(2)
    for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")
]


def test_fp8_blocks_keep_their_format_with_transformers_quantizer(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)  # every dimension a multiple of 32
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    result = cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", "--keep-quantization", "--json")
    report = json.loads(result.stdout)
    assert report["quantization"]["mode"] == "kept"
    assert sorted(report["quantization"]["requantized"]) == sorted(m + ".weight" for m in CHANGED)
    assert any("10 of 14 quantized weights are changed by the adapter" in n for n in report["notes"])
    peft = peft_reference(tmp_path, tmp_path / "fp8", ad)
    out, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "fp8" / "model.safetensors")
    assert sorted(out) == sorted(stored)
    for name, value in stored.items():
        module = name.rsplit(".", 1)[0]
        if module in CHANGED:
            q, inv = fp8_quantize(peft[module + ".weight"], 32)
            expected = q if name.endswith(".weight") else inv
            assert out[name].dtype == value.dtype and torch.equal(
                out[name].view(torch.uint8), expected.view(torch.uint8)
            ), name
        else:  # untouched: the base's bytes
            assert torch.equal(out[name].view(torch.uint8), value.view(torch.uint8)), name
    base_config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        == base_config["quantization_config"]
    )
    # transformers loads it as it loads the base: each weight is the quantizer's codes times its scales
    loaded = load_dequantized(tmp_path / "out")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    for module in CHANGED:
        q, inv = fp8_quantize(peft[module + ".weight"], 32)
        assert torch.equal(loaded[module + ".weight"], Fp8Dequantize(None)._dequantize_one(q, inv, torch.bfloat16))
    checked = json.loads(cli_run("verify", tmp_path / "out", tmp_path / "fp8", ad, "--json").stdout)
    assert checked["verdict"] == "exact", checked


def test_partial_fp8_blocks_are_quantized_by_the_format_definition(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)  # k/v: 48 rows; blocks of 32: partial edges
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", "--keep-quantization")
    out = load_file(tmp_path / "out" / "model.safetensors")
    merged = {}  # what the merge quantized: the as-trained merge, which test_fp8_mxfp4 proves against PEFT
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "plain")
    merged = load_file(tmp_path / "plain" / "model.safetensors")
    for module in CHANGED:
        w = merged[module + ".weight"].float()
        rows, cols = w.shape
        for i in range(0, rows, 32):
            for j in range(0, cols, 32):
                part = w[i : i + 32, j : j + 32]
                amax = part.abs().max()
                inv = out[module + ".weight_scale_inv"][i // 32, j // 32]
                assert inv == (1.0 / (448.0 / amax)).float(), (module, i, j)
                codes = torch.clamp(part * (448.0 / amax), -448, 448).to(torch.float8_e4m3fn)
                assert torch.equal(
                    out[module + ".weight"][i : i + 32, j : j + 32].view(torch.uint8), codes.view(torch.uint8)
                )
    checked = json.loads(cli_run("verify", tmp_path / "out", tmp_path / "fp8", ad, "--json").stdout)
    assert checked["verdict"] == "exact"


def test_fp8_quantizer_is_transformers_op_for_op():
    torch.manual_seed(5)
    w = torch.randn(2, 64, 96, dtype=torch.bfloat16)
    w[0, :32, :32] = 0  # an all-zero block: scale 1
    for scale_fmt, scale_dtype in ((None, torch.float32), ("ue8m0", torch.float8_e8m0fnu)):
        theirs_q, theirs_inv = fp8_quantize(w, 32, scale_fmt)
        ours_q, ours_inv = quantize_fp8_blocks(w, (32, 32), torch.float8_e4m3fn, scale_dtype)
        assert torch.equal(ours_q.view(torch.uint8), theirs_q.view(torch.uint8))
        assert ours_inv.dtype == theirs_inv.dtype and torch.equal(ours_inv.float(), theirs_inv.float())
    _, as_bytes = quantize_fp8_blocks(w, (32, 32), torch.float8_e4m3fn, torch.uint8)  # ue8m0 stored as uint8
    assert torch.equal((as_bytes.float() - 127).exp2(), fp8_quantize(w, 32, "ue8m0")[1].float())


def ct_reference(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' own FP8 quantization of a bf16 weight: min/max as its observers take them,
    calculate_qparams, quantize."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    if strategy == "channel":
        lo, hi = torch.amin(w, dim=1, keepdim=True), torch.amax(w, dim=1, keepdim=True)
    else:
        lo, hi = torch.aminmax(w)
    scale, zero = calculate_qparams(lo, hi, args)
    return quantize(w, scale, zero, args, dtype=torch.float8_e4m3fn), scale


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_keeps_its_format_with_its_quantizer(tmp_path, strategy):
    pytest.importorskip("compressed_tensors")
    from transformers import CompressedTensorsConfig

    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    compressed_fp8_checkpoint(base, tmp_path / "ct", strategy, torch.bfloat16)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", "--keep-quantization")
    peft = peft_reference(tmp_path, tmp_path / "ct", ad, quantization_config=CompressedTensorsConfig(dequantize=True))
    out, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ct" / "model.safetensors")
    assert sorted(out) == sorted(stored)
    for name, value in stored.items():
        module = name.rsplit(".", 1)[0]
        if module in CHANGED:
            q, scale = ct_reference(peft[module + ".weight"], strategy)
            expected = q if name.endswith(".weight") else scale.reshape(value.shape)
            assert out[name].dtype == value.dtype and torch.equal(
                out[name].view(torch.uint8), expected.view(torch.uint8)
            ), name
        else:
            assert torch.equal(out[name].view(torch.uint8), value.view(torch.uint8)), name
    loaded = load_dequantized(tmp_path / "out", quantization_config=CompressedTensorsConfig(dequantize=True))
    for module in CHANGED:
        q, scale = ct_reference(peft[module + ".weight"], strategy)
        assert torch.equal(loaded[module + ".weight"], (q.to(scale.dtype) * scale).to(torch.bfloat16))
    checked = json.loads(cli_run("verify", tmp_path / "out", tmp_path / "ct", ad, "--json").stdout)
    assert checked["verdict"] == "exact"


def test_verify_finds_a_changed_code(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", "--keep-quantization", "--verify")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight_scale_inv"
    tensors[name] = tensors[name] * 2
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    checked = json.loads(cli_run("verify", tmp_path / "out", tmp_path / "fp8", ad, "--json", code=1).stdout)
    assert [t["name"] for t in checked["tensors"] if t["status"] == "mismatch"] == [name]


def test_a_dry_run_says_what_requantizing_would_lose_of_the_delta(tmp_path):
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)
    fp8_checkpoint(base, tmp_path / "fp8", block=32)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    for extra in ((), ("--keep-quantization",)):
        report = json.loads(
            cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", "--dry-run", "--json", *extra).stdout
        )
        measured = report["quantization"]["measured"]
        assert report["quantization"]["measure"] == "requantization of the merged weights"
        assert measured["tensors"] == 8 and measured["of"] == 10
        assert 0 < measured["quant_error_over_delta"] < 10 and 0 < measured["delta_over_weight"]
    text = cli_run("merge", tmp_path / "fp8", ad, tmp_path / "out", "--dry-run").output
    assert "requantiz" in text


def test_keep_quantization_refusals(tmp_path):
    from quant_builders import _gptq_checkpoint, _lora_for_proj

    gptq, _ = _gptq_checkpoint(tmp_path / "gptq", 4, "gptq", False)
    ad = _lora_for_proj(tmp_path / "adapter", 24, 64)
    result = cli_run("merge", gptq, ad, tmp_path / "out", "--keep-quantization", code=1)
    assert (
        "--keep-quantization is not supported for gptq 4-bit (group 16, gptq) bases yet (block-scaled FP8"
        in result.output
    )
    base = tiny_llama(tmp_path / "base", hidden=64, intermediate=96)
    plain = adapter(base, tmp_path / "plain-adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    result = cli_run("merge", base, plain, tmp_path / "out", "--keep-quantization", code=1)
    assert "--keep-quantization keeps a quantized base's format, and this base is not quantized" in result.output
    result = cli_run("merge", gptq, ad, tmp_path / "out", "--keep-quantization", "--trained-on", "nf4", code=2)
    assert (
        "--keep-quantization keeps a quantized base's format; --trained-on is for an unquantized base" in result.output
    )
    assert not (tmp_path / "out").exists()


def assert_kept(tmp_path: Path, base: Path, ad: Path, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    """OUT holds `expected` (module -> stored tensors by role) for the changed modules and the base's bytes for every
    other tensor, and verify finds it exact."""
    out, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    assert sorted(out) == sorted(stored)
    for module, tensors in expected.items():
        for key, value in tensors.items():
            assert torch.equal(out[f"{module}.{key}"].view(torch.uint8), value.contiguous().view(torch.uint8)), (
                module,
                key,
            )
    for name, value in stored.items():
        if name.rsplit(".", 1)[0] not in expected:
            assert torch.equal(out[name].view(torch.uint8), value.view(torch.uint8)), name
    checked = json.loads(cli_run("verify", tmp_path / "out", base, ad, "--json").stdout)
    assert checked["verdict"] == "exact"


@pytest.mark.parametrize("kind", ["int4-group", "int4-group-asym", "int8-channel", "nvfp4"])
def test_compressed_tensors_packed_formats_keep_theirs_with_their_compressor(tmp_path, kind):
    """compressed-tensors' own compressor on PEFT's merged weight (for NVFP4, with llm-compressor's NVFP4 preset:
    float8 scales)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from quant_builders import ct_compress
    from test_fp8_mxfp4 import PACKED, compressed_packed_checkpoint
    from transformers import CompressedTensorsConfig

    fmt, weights = PACKED[kind]
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    compressed_packed_checkpoint(base, tmp_path / "ct", fmt, weights)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", "--keep-quantization")
    peft = peft_reference(tmp_path, tmp_path / "ct", ad, quantization_config=CompressedTensorsConfig(dequantize=True))
    if kind == "nvfp4":  # q/k/v and gate/up quantized with one global scale per group (llm-compressor's rule)
        stored = load_file(tmp_path / "ct" / "model.safetensors")
        assert_kept(tmp_path, tmp_path / "ct", ad, nvfp4_expected(peft, stored, set(CHANGED), NVFP4["weights"]))
        return
    args = QuantizationArgs(**weights)
    assert_kept(tmp_path, tmp_path / "ct", ad, {m: ct_compress(peft[m + ".weight"], args)[0] for m in CHANGED})


FUSED = {
    "q_proj": ("q_proj", "k_proj", "v_proj"),
    "k_proj": ("q_proj", "k_proj", "v_proj"),
    "v_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_proj": ("gate_proj", "up_proj"),
    "up_proj": ("gate_proj", "up_proj"),
}


def nvfp4_expected(
    peft: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], changed: set[str], args
) -> dict[str, dict[str, torch.Tensor]]:
    """What a kept NVFP4 merge must write (module -> stored tensors by role), by llm-compressor's rule on PEFT's merged
    model (update_fused_layer_weight_global_scales: q/k/v, and gate/up, share the smallest global scale): a group's
    scale is the smallest of compressed-tensors' generate_gparam over its changed members' merged weights and its
    unchanged members' stored scales; each changed member is compressed with it by compressed-tensors, an unchanged
    one too where that scale is not its own (else its stored bytes stay)."""
    from compressed_tensors.quantization.utils import generate_gparam
    from quant_builders import ct_compress

    expected = {}
    for module in sorted({n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}):
        parent, _, leaf = module.rpartition(".")
        group = [f"{parent}.{m}" for m in FUSED.get(leaf, (leaf,))]
        if not changed.intersection(group):
            continue
        scales = [
            generate_gparam(peft[m + ".weight"].amin(), peft[m + ".weight"].amax())
            if m in changed
            else stored[m + ".weight_global_scale"]
            for m in group
        ]
        scale = torch.min(torch.cat([s.reshape(1) for s in scales])).reshape([1])
        if module in changed or not torch.equal(stored[module + ".weight_global_scale"], scale):
            expected[module] = ct_compress(peft[module + ".weight"], args, scale)[0]
    return expected


@pytest.mark.parametrize("alpha", [0.5, 400])
def test_nvfp4_fused_groups_keep_one_global_scale(tmp_path, alpha):
    """An llm-compressor NVFP4 base (q/k/v and gate/up share a global scale, as vLLM and SGLang need: they serve a
    fused layer with the largest) and an adapter on q_proj, v_proj and gate_proj only: the kept merge gives each
    group one scale again, by llm-compressor's rule. The untouched k_proj and up_proj hold their groups' ranges: at
    alpha 0.5 the ranges stay and they keep their bytes; at alpha 400 the merge widens them and they are quantized
    again with their group's scale. verify checks the rule."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from test_fp8_mxfp4 import PACKED, compressed_packed_checkpoint
    from transformers import CompressedTensorsConfig

    fmt, weights = PACKED["nvfp4"]
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    edit_tensors(
        base / "model.safetensors",
        lambda t: t.update(  # the untouched members hold their groups' ranges
            {n: w * 4 for n, w in t.items() if n.endswith(("k_proj.weight", "up_proj.weight"))}
        ),
    )
    compressed_packed_checkpoint(base, tmp_path / "ct", fmt, weights, fused=True)
    ad = adapter(
        base,
        tmp_path / "adapter",
        r=8,
        lora_alpha=alpha,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "gate_proj"],
    )
    result = cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", "--keep-quantization", "--json")
    assert any(
        "4 groups of weights that vLLM and SGLang load as one layer (q/k/v, gate/up) keep one "
        "weight_global_scale each" in n
        for n in json.loads(result.stdout)["notes"]
    )
    peft = peft_reference(tmp_path, tmp_path / "ct", ad, quantization_config=CompressedTensorsConfig(dequantize=True))
    stored = load_file(tmp_path / "ct" / "model.safetensors")
    changed = {
        f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj")
    }
    expected = nvfp4_expected(peft, stored, changed, NVFP4["weights"])
    untouched = {m for m in expected if m not in changed}
    widened = {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.k_proj", "mlp.up_proj")}
    assert untouched == (set() if alpha < 1 else widened), untouched
    assert_kept(tmp_path, tmp_path / "ct", ad, expected)
    out = load_file(tmp_path / "out" / "model.safetensors")
    for i in range(2):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            scales = {float(out[f"model.layers.{i}.{m}.weight_global_scale"]) for m in group}
            assert len(scales) == 1, (i, group, scales)


def test_verify_finds_a_fused_nvfp4_group_split(tmp_path):
    """A kept NVFP4 merge whose q_proj has a global scale of its own (what rslora-tools wrote before): verify names
    the group and why it is wrong, and the verdict is not exact."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from quant_builders import ct_compress
    from test_fp8_mxfp4 import PACKED, compressed_packed_checkpoint
    from transformers import CompressedTensorsConfig

    fmt, weights = PACKED["nvfp4"]
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    edit_tensors(
        base / "model.safetensors",
        lambda t: t.update(  # k_proj holds the group's range
            {n: w * 4 for n, w in t.items() if n.endswith("k_proj.weight")}
        ),
    )
    compressed_packed_checkpoint(base, tmp_path / "ct", fmt, weights, fused=True)
    ad = adapter(base, tmp_path / "adapter", r=8, lora_alpha=0.5, use_rslora=True, target_modules=["q_proj"])
    cli_run("merge", tmp_path / "ct", ad, tmp_path / "out", "--keep-quantization")
    peft = peft_reference(tmp_path, tmp_path / "ct", ad, quantization_config=CompressedTensorsConfig(dequantize=True))
    own = ct_compress(peft["model.layers.0.self_attn.q_proj.weight"], NVFP4["weights"])[0]  # its own global scale
    edit_tensors(
        tmp_path / "out" / "model.safetensors",
        lambda t: t.update({f"model.layers.0.self_attn.q_proj.{k}": v for k, v in own.items()}),
    )
    checked = json.loads(cli_run("verify", tmp_path / "out", tmp_path / "ct", ad, "--json", code=1).stdout)
    assert checked["verdict"] == "mismatch"
    assert any(
        p.startswith(
            "model.layers.0.self_attn: q_proj/k_proj/v_proj share one weight_global_scale in BASE "
            "but not in the merged folder ("
        )
        and p.endswith(
            "); vLLM and SGLang load them as one layer with the largest, serving the others at the wrong scale"
        )
        for p in checked["problems"]
    ), checked["problems"]


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_reference(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 by its definition, value by value: per 32 inputs the e8m0 scale 2 ** ceil(log2(amax / 6)), each value
    / scale to the nearest e2m1 value (a tie to the even code; above 6: 6), the sign kept (-0 included)."""
    experts, inputs, outputs = param.shape
    x = param.to(torch.bfloat16).float().transpose(1, 2)
    blocks = torch.zeros(experts, outputs, inputs // 32, 16, dtype=torch.uint8)
    scales = torch.zeros(experts, outputs, inputs // 32, dtype=torch.uint8)
    for e in range(experts):
        for o in range(outputs):
            for g in range(inputs // 32):
                group = x[e, o, g * 32 : (g + 1) * 32]
                amax = float(group.abs().max())
                exponent = 0 if amax == 0 else int(torch.ceil(torch.log2(torch.tensor(amax / 6.0))))
                scales[e, o, g] = 0 if amax == 0 else exponent + 127
                codes = []
                for v in group.tolist():
                    q = 0.0 if amax == 0 else v / 2.0**exponent
                    distance = [abs(abs(q) - c) for c in E2M1]
                    best = min(range(8), key=lambda i: (distance[i], i % 2))  # nearest, a tie to the even code
                    codes.append(best | (8 if torch.signbit(torch.tensor(q)) else 0))
                blocks[e, o, g] = torch.tensor([codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(16)])
    return blocks, scales


def test_mxfp4_experts_keep_their_format(tmp_path):
    from transformers import Mxfp4Config

    base = gpt_oss_mxfp4(tmp_path)
    ad = adapter(
        tmp_path / "bf16",
        tmp_path / "adapter",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj"],
    )
    result = json.loads(cli_run("merge", base, ad, tmp_path / "out", "--keep-quantization", "--json").stdout)
    assert sorted(result["quantization"]["requantized"]) == [
        f"model.layers.{i}.mlp.experts.gate_up_proj_blocks" for i in range(2)
    ]
    peft = peft_reference(tmp_path, base, ad, quantization_config=Mxfp4Config(dequantize=True))
    out, stored = load_file(tmp_path / "out" / "model.safetensors"), load_file(base / "model.safetensors")
    assert sorted(out) == sorted(stored)
    for i in range(2):
        name = f"model.layers.{i}.mlp.experts.gate_up_proj"
        blocks, scales = mxfp4_reference(peft[name])
        assert torch.equal(out[name + "_blocks"], blocks) and torch.equal(out[name + "_scales"], scales)
    for name, value in stored.items():
        if "gate_up_proj" not in name and "q_proj" not in name:
            assert torch.equal(out[name].view(torch.uint8), value.view(torch.uint8)), name
    checked = json.loads(cli_run("verify", tmp_path / "out", base, ad, "--json").stdout)
    assert checked["verdict"] == "exact"


def test_mxfp4_quantizer_gives_back_the_codes_it_was_given():
    from rslora_tools.compute.quantization import dequantize_mxfp4
    from rslora_tools.compute.requantize import quantize_mxfp4

    torch.manual_seed(7)
    blocks = torch.randint(0, 256, (2, 8, 3, 16), dtype=torch.uint8)
    blocks[..., 0] = (blocks[..., 0] & 0xF0) | 0x7  # a 6 in every group: the scale comes back the same
    scales = torch.randint(110, 130, (2, 8, 3), dtype=torch.uint8)
    assert [
        torch.equal(a, b)
        for a, b in zip(quantize_mxfp4(dequantize_mxfp4(blocks, scales, torch.bfloat16)), (blocks, scales))
    ] == [True, True]
    param = torch.randn(2, 64, 4, dtype=torch.bfloat16) * 3
    param[0, :32, 0] = 0  # an all-zero group
    param[1, :32, 1] = 0  # ties at the group's scale 2 ** -3, -0 among them
    param[1, :8, 1] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * 2**-3
    param[1, 8:12, 1] = torch.tensor([-0.25, -2.5, -0.0, 0.1]) * 2**-3
    blocks, scales = quantize_mxfp4(param)
    assert [torch.equal(a, b) for a, b in zip((blocks, scales), mxfp4_reference(param))] == [True, True]
    assert scales[1, 1, 0] == 124 and blocks[1, 1, 0, :6].tolist() == [0x07, 0x22, 0x44, 0x66, 0xC8, 0x08]


@pytest.mark.parametrize("base_format", ["fp8-blocks", "ct-fp8-channel"])
def test_kept_fp8_bands_from_the_kernel_equal_the_whole_tensor_torch_path(tmp_path, base_format, monkeypatch):
    """--keep-quantization quantizes an FP8 weight a band at a time after the kernel merged it; the torch path does
    the whole tensor (proven against the quantizers above): the same bytes, partial blocks included."""
    base = tiny_llama(tmp_path / "base", hidden=96, intermediate=160)
    if base_format == "fp8-blocks":
        fp8_checkpoint(base, tmp_path / "q", block=32)
    else:
        compressed_fp8_checkpoint(base, tmp_path / "q", "channel", torch.bfloat16)
    ad = adapter(base, tmp_path / "adapter", **LORA)
    report = json.loads(cli_run("merge", tmp_path / "q", ad, tmp_path / "k", "--keep-quantization", "--json").stdout)
    assert {c["by"] for c in report["changes"] if "quantized back" in c["how"]} == {"requant-kernel"}
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    torch_report = json.loads(
        cli_run("merge", tmp_path / "q", ad, tmp_path / "t", "--keep-quantization", "--json").stdout
    )
    kernel_out, torch_out = (
        load_file(tmp_path / "k" / "model.safetensors"),
        load_file(tmp_path / "t" / "model.safetensors"),
    )
    assert all(torch.equal(kernel_out[k].view(torch.uint8), torch_out[k].view(torch.uint8)) for k in torch_out)
    ours, theirs = report["quantization"]["requantized"], torch_report["quantization"]["requantized"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["error_over_delta"] == pytest.approx(theirs[name]["error_over_delta"], rel=1e-3)
