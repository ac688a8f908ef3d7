"""QLoRA: merges into quantized bases and `--trained-on`, proven against bitsandbytes (CPU), transformers and PEFT.

The oracle (docs/quantization.md): transformers loads the base with its BitsAndBytesConfig,
`model.dequantize(dtype=D)` replaces every quantized Linear with bitsandbytes' dequantization,
then PEFT's merge_and_unload(). Shapes avoid bitsandbytes' AVX-512 dequantization bug (row
lengths that are multiples of 16 but not of the blocksize); the format itself is checked
against bitsandbytes' torch path for those shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft_oracle import (
    assert_same_tensors,
    make_adapter,
    make_gpt2,
    make_llama,
    read_folder,
    unique_tensors,
)
from quant_builders import (  # noqa: F401
    _as_int32,
    _gptq_checkpoint,
    _lora_for_proj,
    _pack_cols,
    _pack_rows,
)
from safetensors import safe_open
from safetensors.torch import save_file

from rslora_tools.compute import quantization as D
from rslora_tools.formats.quant import QuantScheme

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SHAPE = dict(hidden_size=64, intermediate_size=128)  # rows of 64 and 128: clear of the AVX-512 bug at blocksize 64


def bnb_config(kind: str, double_quant: bool = False, compute=torch.bfloat16, **kw):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **kw)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute,
        **kw,
    )


def oracle(base: Path, adapter: Path, dequant_dtype: torch.dtype, quantization=None) -> dict[str, torch.Tensor]:
    """transformers (+ bitsandbytes) loads BASE, dequantizes every quantized Linear to `dequant_dtype`, PEFT merges."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization} if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, **kwargs).dequantize(dtype=dequant_dtype)
    return unique_tensors(PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict())


def save_quantized(base: Path, out: Path, quantization) -> Path:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, quantization_config=quantization).save_pretrained(
        out
    )
    return out


@pytest.fixture(scope="module")
def qbase(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("qbase"), torch.bfloat16, **SHAPE)


@pytest.fixture(scope="module")
def qadapter(qbase, tmp_path_factory) -> Path:
    from peft import LoraConfig

    config = LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear")
    return make_adapter(qbase, tmp_path_factory.mktemp("qadapter"), config)


@pytest.fixture(scope="module")
def qv_adapter(qbase, tmp_path_factory) -> Path:
    """Targets q and v only: the other quantized Linear weights are only dequantized."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "v_proj"])
    return make_adapter(qbase, tmp_path_factory.mktemp("qv-adapter"), config)


PREQUANTIZED = {  # name -> (BitsAndBytesConfig args, dtype the oracle dequantizes to = the merge dtype)
    "nf4-double-quant": (("nf4", True), torch.bfloat16),
    "nf4": (("nf4", False), torch.bfloat16),
    "fp4-compute-fp32": (("fp4", False, torch.float32), torch.float32),
    "int8": (("int8",), torch.bfloat16),
}


@pytest.fixture(scope="module")
def prequantized(qbase, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prequantized")
    return {name: save_quantized(qbase, root / name, bnb_config(*args)) for name, (args, _) in PREQUANTIZED.items()}


@pytest.mark.parametrize("name", list(PREQUANTIZED))
def test_merge_into_prequantized_base_equals_dequantize_then_peft(name, prequantized, qadapter, tmp_path):
    base = prequantized[name]
    result = cli_run("merge", base, qadapter, tmp_path / "out", "-q", code=None)
    assert result.exit_code == 0, result.output
    actual = read_folder(tmp_path / "out")
    assert_same_tensors(actual, oracle(base, qadapter, PREQUANTIZED[name][1]))
    assert not any(
        k.endswith((".absmax", ".quant_map", ".SCB", ".weight_format")) or ".quant_state." in k or ".nested_" in k
        for k in actual
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    verify = cli_run("verify", tmp_path / "out", base, qadapter, code=None)
    assert verify.exit_code == 0 and verify.output.startswith("EXACT"), verify.output


def test_untargeted_quantized_weights_are_bitsandbytes_dequantization(prequantized, qv_adapter, tmp_path):
    """Weights the adapter leaves alone are bitsandbytes' own dequantization (cast to the compute dtype);
    the tensors that were never quantized are byte-identical to the base."""
    base = prequantized["nf4-double-quant"]
    cli_run("merge", base, qv_adapter, tmp_path / "out", "-q")
    actual = read_folder(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    layer = model.model.layers[1].mlp.down_proj
    expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert torch.equal(actual["model.layers.1.mlp.down_proj.weight"], expected)
    with safe_open(base / "model.safetensors", "pt") as f:
        for key in (
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
        ):
            raw = f.get_tensor(key)
            assert actual[key].dtype == raw.dtype and torch.equal(actual[key].view(torch.uint8), raw.view(torch.uint8))
    assert_same_tensors(actual, oracle(base, qv_adapter, torch.bfloat16))


TRAINED_ON = {  # name -> (CLI flags, BitsAndBytesConfig args)
    "nf4-double-quant": (["--trained-on", "nf4", "--double-quant"], ("nf4", True)),
    "nf4": (["--trained-on", "nf4"], ("nf4", False)),
    "fp4": (["--trained-on", "fp4"], ("fp4", False)),
    "fp4-double-quant": (["--trained-on", "fp4", "--double-quant"], ("fp4", True)),
    "int8": (["--trained-on", "int8"], ("int8",)),
}


@pytest.mark.parametrize("name", list(TRAINED_ON))
def test_trained_on_equals_transformers_bitsandbytes_then_peft(name, qbase, qadapter, tmp_path):
    flags, args = TRAINED_ON[name]
    result = cli_run("merge", qbase, qadapter, tmp_path / "out", "-q", *flags, code=None)
    assert result.exit_code == 0, result.output
    actual = read_folder(tmp_path / "out")
    assert_same_tensors(actual, oracle(qbase, qadapter, torch.bfloat16, bnb_config(*args)))
    with safe_open(qbase / "model.safetensors", "pt") as f:  # never quantized: the base's bytes
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
            assert torch.equal(actual[key].view(torch.uint8), f.get_tensor(key).view(torch.uint8))
    assert json.loads((tmp_path / "out" / "rslora_tools.json").read_text())["quantization"]["mode"] == "as trained"
    verify = cli_run("verify", tmp_path / "out", qbase, qadapter, code=None)  # the scheme comes from rslora_tools.json
    assert verify.exit_code == 0 and verify.output.startswith("EXACT"), verify.output
    plain = cli_run(
        "verify", tmp_path / "out", qbase, qadapter, "--trained-on", "fp4" if "nf4" in name else "nf4", code=None
    )
    assert plain.exit_code == 1 and "MISMATCH" in plain.output


def test_trained_on_blocksize_and_skip_modules(tmp_path, monkeypatch):
    """--quant-blocksize 128, and --skip-modules, which replaces transformers' default skips (so lm_head is
    quantized)."""
    from peft import LoraConfig

    base = make_llama(tmp_path / "base", torch.bfloat16, hidden_size=128, intermediate_size=256)
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    )
    result = cli_run(
        "merge",
        base,
        adapter,
        tmp_path / "out",
        "-q",
        "--trained-on",
        "nf4",
        "--quant-blocksize",
        "128",
        "--double-quant",
        "--skip-modules",
        "mlp.up_proj,o_proj",
        code=None,
    )
    assert result.exit_code == 0, result.output
    original = bnb.nn.Params4bit.__new__  # transformers has no blocksize setting: bitsandbytes' layers get 128

    def with_blocksize_128(cls, *args, **kwargs):
        kwargs["blocksize"] = 128
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Params4bit, "__new__", staticmethod(with_blocksize_128))
    config = bnb_config("nf4", True, llm_int8_skip_modules=["mlp.up_proj", "o_proj"])
    actual = read_folder(tmp_path / "out")
    assert_same_tensors(actual, oracle(base, adapter, torch.bfloat16, config))
    with safe_open(base / "model.safetensors", "pt") as f:
        assert not torch.equal(actual["lm_head.weight"], f.get_tensor("lm_head.weight"))
        assert torch.equal(
            actual["model.layers.0.mlp.up_proj.weight"], f.get_tensor("model.layers.0.mlp.up_proj.weight")
        )


def test_gpt2_conv1d_trained_on_nf4(tmp_path):
    """GPT-2's Conv1D weights are quantized transposed, as transformers does, and written back (in, out)."""
    from peft import LoraConfig

    base = make_gpt2(tmp_path / "base", torch.bfloat16, n_embd=64)  # rows of 64: clear of the AVX-512 bug
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    )
    result = cli_run("merge", base, adapter, tmp_path / "out", "-q", "--trained-on", "nf4", code=None)
    assert result.exit_code == 0, result.output
    actual = read_folder(tmp_path / "out")
    expected = oracle(base, adapter, torch.bfloat16, bnb_config("nf4"))
    for key, value in expected.items():
        if key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            expected[key] = (
                value.T.contiguous()
            )  # transformers' dequantized Linear is (out, in); GPT-2 stores (in, out)
    assert_same_tensors(actual, expected)


def test_dry_run_and_report_say_what_is_quantized(prequantized, qbase, qadapter, tmp_path):
    result = cli_run(
        "merge",
        qbase,
        qadapter,
        tmp_path / "out",
        "--dry-run",
        "--json",
        "--trained-on",
        "nf4",
        "--double-quant",
        code=None,
    )
    report = json.loads(result.output)
    assert report["quantization"]["mode"] == "as trained" and report["quantization"]["weights"] == 14
    assert report["quantization"]["scheme"] == "nf4 (double quant, blocksize 64)"
    by = {c["tensor"]: c for c in report["changes"]}
    from rslora_tools.compute import kernel

    assert by["model.layers.0.mlp.up_proj.weight"]["by"] == ("quant-kernel" if kernel.available() else "dequant")
    assert "quantized as trained (nf4)" in by["model.layers.0.mlp.up_proj.weight"]["how"]
    assert "model.embed_tokens.weight" not in by and "lm_head.weight" not in by
    text = cli_run("merge", prequantized["fp4-compute-fp32"], qadapter, tmp_path / "out2", "--dry-run", code=None)
    assert "dequantized (fp4)" in text.output and "config.json: quantization_config removed" in text.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_sharded_prequantized_base(qbase, qadapter, tmp_path):
    """A sharded 4-bit checkpoint: the index lists the dequantized weights, none of the quantization tensors."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(
        qbase, dtype=torch.bfloat16, quantization_config=bnb_config("nf4", True)
    ).save_pretrained(base, max_shard_size="40KB")
    assert (base / "model.safetensors.index.json").is_file()
    cli_run("merge", base, qadapter, tmp_path / "out", "-q")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(read_folder(tmp_path / "out"))
    assert_same_tensors(read_folder(tmp_path / "out"), oracle(base, qadapter, torch.bfloat16))
    cli_run("verify", tmp_path / "out", base, qadapter)


def test_quantization_errors(prequantized, qbase, qadapter, tmp_path):
    out = tmp_path / "out"
    result = cli_run("merge", prequantized["nf4"], qadapter, out, "--trained-on", "nf4", code=None)
    assert result.exit_code == 1 and "already quantized" in result.output
    result = cli_run(
        "merge", qbase, qadapter, out, "--double-quant", code=None
    )  # flag mistakes are usage errors (exit 2)
    assert result.exit_code == 2 and "--trained-on" in result.output
    result = cli_run("merge", qbase, qadapter, out, "--trained-on", "int8", "--double-quant", code=None)
    assert result.exit_code == 2 and "int8" in result.output
    assert not out.exists()


# ---- the arithmetic against bitsandbytes itself ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_4bit_quantize_and_dequantize_match_bitsandbytes(method, double_quant, dtype):
    torch.manual_seed(0)
    for shape in [(64, 64), (128, 192), (40, 50), (37, 64), (7, 30), (3, 1000)]:
        w = (torch.randn(shape) * 0.05).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=method)
        expected = F.dequantize_4bit(packed, state)
        actual = D.simulate(w, QuantScheme(method, blocksize=64, double_quant=double_quant))
        assert_same_bits_but_fp4_zero_sign(actual, expected, method, shape)
        absmax = (
            state.absmax
            if not double_quant
            else D.dequantize_blockwise_8bit(state.absmax, state.state2.absmax, state.state2.code, 256) + state.offset
        )
        from_packed = D.dequantize_4bit(packed, absmax, method, 64, tuple(shape), dtype)
        assert_same_bits_but_fp4_zero_sign(from_packed, expected, method, shape)


def assert_same_bits_but_fp4_zero_sign(actual: torch.Tensor, expected: torch.Tensor, method: str, shape) -> None:
    """Same bits; except that bitsandbytes' scalar CPU path (rows whose length is not a multiple of 16) writes -0.0
    for FP4 code 0b1000, where its torch and AVX-512 paths and rslora-tools write +0.0 (docs/quantization.md)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    same = actual.view(-1).view(torch.uint8 if actual.element_size() == 1 else _int_of(actual)) == expected.view(
        -1
    ).view(_int_of(expected))
    if method == "fp4":
        zero_sign = (actual.view(-1) == 0) & (expected.view(-1) == 0) & torch.signbit(expected.view(-1))
        same |= zero_sign
    assert bool(same.all()), f"{method} {shape}: {int((~same).sum())} elements differ"


def _int_of(t: torch.Tensor) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[t.element_size()]


def test_4bit_format_on_the_shapes_of_the_avx512_bug():
    """Rows of 32 with blocks of 64: bitsandbytes' torch path (the format) agrees with rslora-tools bit for bit."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    torch.manual_seed(1)
    for method in ("nf4", "fp4"):
        w = (torch.randn(48, 32) * 0.05).to(torch.bfloat16)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=method)
        expected = _dequantize_4bit_compute(
            packed.reshape(-1), state.absmax, _get_4bit_code(method, w.device), 64, (48, 32), torch.bfloat16
        )
        actual = D.dequantize_4bit(packed, state.absmax, method, 64, (48, 32), torch.bfloat16)
        assert torch.equal(actual.view(torch.int16), expected.view(torch.int16))


def test_double_quantization_lookup_table_matches_bitsandbytes():
    """8-bit blockwise quantization of the absmax values goes through bitsandbytes' 65536-entry table, not
    nearest-code."""
    torch.manual_seed(2)
    assert torch.equal(D.dynamic_map(), F.create_dynamic_map())
    x = torch.cat([torch.ones(4000, 1), torch.rand(4000, 255) * 2 - 1], dim=1).reshape(-1)
    q, state = F.quantize_blockwise(x, blocksize=256)
    mine, absmax = D.quantize_blockwise_8bit(x, 256)
    assert torch.equal(mine, q) and torch.equal(absmax, state.absmax)
    nearest = torch.argmin((x.view(-1, 1) - D.dynamic_map().view(1, -1)).abs(), dim=1).to(torch.uint8)
    assert (nearest != q).any()  # the table is why an exact nearest search would not do


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_matches_bitsandbytes(dtype):
    torch.manual_seed(3)
    w = (torch.randn(48, 40) * 0.05).to(dtype)
    params = bnb.nn.Int8Params(w.clone(), requires_grad=False).to("cpu")
    q, scb = D.quantize_int8(w)
    assert torch.equal(q, params.data) and torch.equal(scb, params.SCB)
    assert torch.equal(D.dequantize_int8(q, scb), F.int8_vectorwise_dequant(params.data, params.SCB))


def test_keep_in_fp32_table_matches_transformers():
    """quant_plan.KEEP_IN_FP32 is what transformers' model classes declare, for each model type listed."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    from rslora_tools.plan.quantization import KEEP_IN_FP32

    for model_type, names in KEEP_IN_FP32.items():
        module_name = model_type_to_module_name(model_type)
        module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        declared = {
            tuple(obj._keep_in_fp32_modules)
            for obj in vars(module).values()
            if isinstance(obj, type)
            and obj.__module__ == module.__name__
            and getattr(obj, "_keep_in_fp32_modules", None)
        }
        assert declared == {names}, model_type
    llama = importlib.import_module("transformers.models.llama.modeling_llama")
    assert not llama.LlamaForCausalLM._keep_in_fp32_modules


# ---- GPTQ and AWQ, from the format definition ---------------------------------------------------------------


@pytest.mark.parametrize("bits,fmt,desc_act", [(4, "gptq", False), (4, "gptq_v2", True), (8, "gptq", True)])
def test_gptq_dequantization_from_the_format(bits, fmt, desc_act, tmp_path):
    base, weight = _gptq_checkpoint(tmp_path / "base", bits, fmt, desc_act)
    adapter = _lora_for_proj(tmp_path / "adapter", 24, 64)
    cli_run("merge", base, adapter, tmp_path / "out", "-q")
    merged = read_folder(tmp_path / "out")
    a = read_folder(adapter)
    delta = a["base_model.model.model.proj.lora_B.weight"] @ a["base_model.model.model.proj.lora_A.weight"]
    expected = weight.clone()
    expected += delta * (8 / 4**0.5)
    assert set(merged) == {"model.proj.weight", "model.norm.weight"}
    assert torch.equal(merged["model.proj.weight"], expected)
    cli_run("verify", tmp_path / "out", base, adapter)


def test_gptq_v1_zero_of_fifteen_carries_like_gptqmodel(tmp_path):
    """A v1 zero word holding 15 in a field: gptqmodel adds 0x11111111 to the whole word, and the carry
    reaches the next field; rslora-tools reads it the same way."""
    words = torch.tensor([[0x0000000F]], dtype=torch.int32)
    fields = D._unpack(words + 0x11111111, 4, 1)
    assert fields.tolist() == [[0, 2, 1, 1, 1, 1, 1, 1]]


def test_awq_gemm_dequantization_from_the_format(tmp_path):
    torch.manual_seed(6)
    out_f, in_f, group = 32, 64, 16
    groups = in_f // group
    q = torch.randint(0, 16, (in_f, out_f))
    zeros = torch.randint(0, 16, (groups, out_f))
    scales = (torch.rand(groups, out_f) * 0.01 + 0.001).to(torch.float16)
    rows = torch.arange(in_f) // group
    weight = ((q - zeros[rows]).float() * scales[rows].float()).to(torch.float16).T.contiguous()
    awq_order = [0, 2, 4, 6, 1, 3, 5, 7]
    tensors = {
        "model.proj.qweight": _pack_cols_awq(q, awq_order),
        "model.proj.qzeros": _pack_cols_awq(zeros, awq_order),
        "model.proj.scales": scales,
    }
    base = tmp_path / "base"
    base.mkdir()
    save_file(tensors, base / "model.safetensors")
    (base / "config.json").write_text(
        json.dumps(
            {
                "dtype": "float16",
                "quantization_config": {
                    "quant_method": "awq",
                    "bits": 4,
                    "group_size": group,
                    "version": "gemm",
                    "zero_point": True,
                },
            }
        )
    )
    adapter = _lora_for_proj(tmp_path / "adapter", out_f, in_f)
    cli_run("merge", base, adapter, tmp_path / "out", "-q")
    a = read_folder(adapter)
    expected = weight.clone()
    expected += (a["base_model.model.model.proj.lora_B.weight"] @ a["base_model.model.model.proj.lora_A.weight"]) * 4.0
    assert torch.equal(read_folder(tmp_path / "out")["model.proj.weight"], expected)
    gemv = json.loads((base / "config.json").read_text())
    gemv["quantization_config"]["version"] = "gemv"
    (base / "config.json").write_text(json.dumps(gemv))
    refused = cli_run("merge", base, adapter, tmp_path / "out2", code=None)
    assert refused.exit_code == 1 and "'gemv'" in refused.output


def _pack_cols_awq(codes: torch.Tensor, order: list[int]) -> torch.Tensor:
    """AWQ GEMM packing: word c holds columns 8c + order[j] in field j."""
    words = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        words |= codes[:, order[j] :: 8].to(torch.int64) << (4 * j)
    return _as_int32(words)


def test_merging_as_trained_gives_the_model_the_adapter_was_trained_with(qbase, tmp_path, capsys):
    """Logits of the QLoRA model (PEFT on the 4-bit base, the model that was trained) against a merge into the
    original bf16 weights and a merge as trained. The README quotes the numbers this prints."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    def small_delta(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.02)  # a delta about a tenth of the weights, as after real training

    adapter = make_adapter(
        qbase,
        tmp_path / "adapter",
        LoraConfig(r=16, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
        after=small_delta,
    )
    quantization = bnb_config("nf4", True)
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(qbase, dtype=torch.bfloat16, quantization_config=quantization),
        str(adapter),
    )
    cli_run("merge", qbase, adapter, tmp_path / "original", "-q")
    cli_run("merge", qbase, adapter, tmp_path / "as-trained", "-q", "--trained-on", "nf4", "--double-quant")
    tokens = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(tokens).logits.float()
        measured = {}
        for name in ("original", "as-trained"):
            logits = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16)(tokens).logits.float()
            top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            measured[name] = ((logits - reference).abs().mean().item(), top1)
    with capsys.disabled():
        print(
            "\nlogits vs the QLoRA model (mean |diff|, top-1 agreement):",
            {k: (f"{e:.2e}", f"{t:.0%}") for k, (e, t) in measured.items()},
        )
    assert measured["as-trained"][0] < measured["original"][0] / 4
    assert measured["as-trained"][1] > measured["original"][1]


@pytest.mark.parametrize("wide", [True, False])
def test_kernel_4bit_path_matches_torch_path(wide):
    """The C kernel's quantize-dequantize (AVX-512 and AVX2) gives the torch path's bits, block offsets included."""
    from rslora_tools.compute import kernel
    from rslora_tools.formats.safetensors_file import tensor_bytes

    if not kernel.available():
        pytest.skip("the merge kernel is not available here")
    torch.manual_seed(7)
    for dtype, name in [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")]:
        for method in ("nf4", "fp4"):
            for blocksize, double_quant in [(64, False), (64, True), (128, True), (256, False)]:
                w = (torch.randn(96, 512) * 0.03).to(dtype)
                w[5, :blocksize] = 0  # an all-zero block
                absmax = bytearray(w.numel() // blocksize * 4)
                assert kernel.block_absmax(tensor_bytes(w), name, blocksize, memoryview(absmax)) == 0
                am = torch.frombuffer(absmax, dtype=torch.float32)
                scale = D.double_quantized_absmax(am) if double_quant else am.clone()
                out = torch.empty_like(w)
                half = w.numel() // 2  # two calls, the second starting mid-tensor, as the executor's blocks of rows do
                first = half // blocksize
                for lo, hi, block in ((0, half, 0), (half, w.numel(), first)):
                    kernel.simulate_4bit(
                        tensor_bytes(w.view(-1)[lo:hi]),
                        name,
                        method,
                        blocksize,
                        block,
                        memoryview(absmax),
                        memoryview(bytearray(tensor_bytes(scale))),
                        tensor_bytes(out.view(-1)[lo:hi]),
                        wide=wide,
                    )
                expected = D.simulate(w, QuantScheme(method, blocksize=blocksize, double_quant=double_quant))
                assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), (name, method, blocksize)


@pytest.mark.parametrize("double_quant", [False, True])
def test_trained_on_kernel_path_over_several_blocks_of_rows(double_quant, tmp_path, monkeypatch):
    """A weight of 2 MB goes through the kernel in several blocks of rows; it equals bitsandbytes' quantization
    plus PEFT's delta, and the torch path (RSLORA_TOOLS_KERNEL=0) gives the same bytes."""
    from peft import LoraConfig

    base = make_llama(
        tmp_path / "base",
        torch.bfloat16,
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=1,
    )
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["down_proj", "up_proj"]),
    )
    flags = ["--trained-on", "nf4"] + (["--double-quant"] if double_quant else [])
    dry = json.loads(cli_run("merge", base, adapter, tmp_path / "x", "--dry-run", "--json", *flags).output)
    from rslora_tools.compute import kernel

    if kernel.available():
        assert {c["by"] for c in dry["changes"] if "mlp" in c["tensor"]} == {"quant-kernel"}
    cli_run("merge", base, adapter, tmp_path / "kernel", "-q", *flags)
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    cli_run("merge", base, adapter, tmp_path / "torch", "-q", *flags)
    kernel_out, torch_out = read_folder(tmp_path / "kernel"), read_folder(tmp_path / "torch")
    assert_same_tensors(kernel_out, torch_out)
    expected = oracle(base, adapter, torch.bfloat16, bnb_config("nf4", double_quant))
    assert_same_tensors(kernel_out, expected)


def test_prequantized_bf16_quant_storage_and_dtype_override(qbase, qadapter, tmp_path):
    """bnb_4bit_quant_storage=bfloat16 (FSDP-QLoRA checkpoints) packs the codes in bf16 words; --dtype fp32 merges in
    fp32, as dequantize(dtype=float32) then PEFT does."""
    base = save_quantized(
        qbase, tmp_path / "bf16-storage", bnb_config("nf4", True, bnb_4bit_quant_storage=torch.bfloat16)
    )
    with safe_open(base / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    cli_run("merge", base, qadapter, tmp_path / "out", "-q")
    assert_same_tensors(read_folder(tmp_path / "out"), oracle(base, qadapter, torch.bfloat16))
    cli_run("merge", base, qadapter, tmp_path / "fp32", "-q", "--dtype", "fp32")
    merged = read_folder(tmp_path / "fp32")
    expected = oracle(base, qadapter, torch.float32)
    for key in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert merged[key].dtype == torch.float32 and torch.equal(merged[key], expected[key])
    cli_run("verify", tmp_path / "fp32", base, qadapter)


def test_stacked_merge_into_a_quantized_base_equals_peft(prequantized, qadapter, qv_adapter, tmp_path):
    """Two QLoRA adapters stacked on one NF4 base: dequantized, then merged one after another (PEFT's order)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = prequantized["nf4-double-quant"]
    result = cli_run("merge", base, qadapter, qv_adapter, tmp_path / "out", "-q", code=None)
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).dequantize(dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, str(qadapter), adapter_name="a")
    model.load_adapter(str(qv_adapter), adapter_name="b")
    expected = unique_tensors(model.merge_and_unload(adapter_names=["a", "b"]).state_dict())
    assert_same_tensors(read_folder(tmp_path / "out"), expected)
