"""Every LoRA-family tuner besides LoRA merges as PEFT's merge_and_unload, torch.equal per tensor.

The adapters are built by PEFT itself (get_peft_model + save_pretrained) with random, non-zero factors; the
expected values come from PeftModel.from_pretrained(...).merge_and_unload(), on fp32, bf16 and fp16 bases, on
Linear layers and, where the tuner wraps them, Conv1d / Conv2d layers and transformers' Conv1D.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, VeraConfig
from peft_oracle import assert_same_tensors, make_adapter, peft_merged_state_dict, read_folder, save_module

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli_merge(base: Path, adapter: Path, out: Path, *args: str) -> dict:
    return json.loads(cli_run("merge", base, adapter, out, "--json", *args).stdout)


def check(base, adapter: Path, out: Path, *args: str, model=None) -> dict:
    report = cli_merge(base, adapter, out, *args)
    assert_same_tensors(read_folder(out), peft_merged_state_dict(model if model is not None else base, adapter))
    return report


def adalora(**kw):
    return AdaLoraConfig(total_step=10, init_lora_weights=False, **kw)


LINEAR_CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=ALL_LINEAR, init_weights=False),
    "loha-patterns": lambda: LoHaConfig(
        r=4,
        alpha=8,
        target_modules=ALL_LINEAR,
        init_weights=False,
        rank_pattern={"o_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"q_proj": 3.5, "up_proj": 16},
    ),
    "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=ALL_LINEAR, init_weights=False),
    "lokr-decompose-both": lambda: LoKrConfig(
        r=2, alpha=6, target_modules=ALL_LINEAR, init_weights=False, decompose_both=True, decompose_factor=4
    ),
    "lokr-patterns": lambda: LoKrConfig(
        r=8,
        alpha=4,
        target_modules=ALL_LINEAR,
        init_weights=False,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"k_proj": 1},
    ),
    "adalora": lambda: adalora(init_r=6, target_r=3, lora_alpha=16, target_modules=ALL_LINEAR),
    "vera": lambda: VeraConfig(r=8, target_modules=ALL_LINEAR, init_weights=False),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(LINEAR_CONFIGS))
def test_linear_layers_all_dtypes(bases, tmp_path, name, dtype):
    adapter = make_adapter(bases[dtype], tmp_path / "adapter", LINEAR_CONFIGS[name]())
    report = check(bases[dtype], adapter, tmp_path / "out")
    assert report["modules"] == 14


def test_factors_saved_in_half_precision(llama_bf16, tmp_path):
    """Factors saved in bf16 are upcast as PEFT loads them, then merged in float32."""
    cfg = LoHaConfig(r=4, alpha=8, target_modules=ALL_LINEAR, init_weights=False)
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg, save_dtype=torch.bfloat16)
    check(llama_bf16, adapter, tmp_path / "out")


def prune_adalora(model) -> None:
    """AdaLoRA after its rank allocation: a rank mask per module, as update_and_allocate leaves in the config (the
    saved factors are cut to the kept ranks, the scale stays lora_alpha / init_r)."""
    config = model.peft_config["default"]
    masks = {}
    for name, _ in model.named_parameters():
        if name.endswith("lora_E.default"):
            key = name.removeprefix("base_model.model.")
            keep = [True, False, True, True, False, False] if "q_proj" in name else [False] * 5 + [True]
            if "layers.1.mlp.down_proj" in name:
                keep = [False] * 6  # every rank pruned
            masks[key] = keep
    config.rank_pattern = masks


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adalora_pruned_ranks(bases, tmp_path, dtype):
    cfg = adalora(init_r=6, target_r=3, lora_alpha=12, target_modules=ALL_LINEAR)
    adapter = make_adapter(bases[dtype], tmp_path / "adapter", cfg, after=prune_adalora)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["rank_pattern"]
    report = check(bases[dtype], adapter, tmp_path / "out")
    assert report["modules"] == 14


def test_adalora_alpha_zero_takes_the_rank(llama_fp32, tmp_path):
    cfg = adalora(init_r=4, target_r=2, lora_alpha=0, target_modules=["q_proj", "v_proj"])
    check(llama_fp32, make_adapter(llama_fp32, tmp_path / "adapter", cfg), tmp_path / "out")


@pytest.mark.parametrize(
    "config",
    [
        lambda: adalora(init_r=4, target_r=2, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
        lambda: VeraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_weights=False),
    ],
    ids=["adalora", "vera"],
)
def test_gpt2_conv1d(gpt2_bf16, tmp_path, config):
    check(gpt2_bf16, make_adapter(gpt2_bf16, tmp_path / "adapter", config()), tmp_path / "out")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, 3)
        self.c1_k1 = torch.nn.Conv1d(6, 6, 1)
        self.c2 = torch.nn.Conv2d(6, 8, (3, 2))
        self.c2_1x1 = torch.nn.Conv2d(8, 8, 1)
        self.c2_big = torch.nn.Conv2d(8, 16, 3)
        self.fc = torch.nn.Linear(8, 12)


CONV_CONFIGS = {
    "loha": lambda: LoHaConfig(r=2, alpha=6, target_modules=["c1", "c1_k1", "c2", "c2_1x1", "c2_big", "fc"]),
    "loha-effective-conv": lambda: LoHaConfig(
        r=2, alpha=6, target_modules=["c1", "c1_k1", "c2", "c2_1x1", "c2_big", "fc"], use_effective_conv2d=True
    ),
    "lokr": lambda: LoKrConfig(r=2, alpha=6, target_modules=["c1", "c1_k1", "c2", "c2_1x1", "c2_big", "fc"]),
    "lokr-effective-conv": lambda: LoKrConfig(  # c1 (a Conv1d's CP form) crashes PEFT: test below
        r=1,
        alpha=3,
        target_modules=["c1_k1", "c2", "c2_1x1", "c2_big", "fc"],
        use_effective_conv2d=True,
        decompose_both=True,
    ),
    "adalora": lambda: adalora(init_r=3, target_r=2, lora_alpha=5, target_modules=["c2", "c2_1x1", "c2_big", "fc"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_layers(tmp_path, name, dtype):
    torch.manual_seed(0)
    net = ConvNet().to(dtype)
    base = save_module(net, tmp_path / "base")
    config = CONV_CONFIGS[name]()
    config.init_weights = False
    config.init_lora_weights = False
    adapter = make_adapter(net, tmp_path / "adapter", config)
    check(base, adapter, tmp_path / "out", model=net)


def test_lokr_conv1d_effective_form_merges_where_peft_crashes(tmp_path):
    """PEFT 0.21.2's LoKr crashes in torch.kron on a Conv1d's CP form (lokr_t2 of shape (r, r, k, 1)); we merge it:
    compare with the definition, the Kronecker product of w1 with each kernel tap of w2."""
    torch.manual_seed(0)
    net = ConvNet()
    base = save_module(net, tmp_path / "base")
    config = LoKrConfig(r=1, alpha=3, target_modules=["c1"], use_effective_conv2d=True, init_weights=False)
    adapter = make_adapter(net, tmp_path / "adapter", config)
    cli_merge(base, adapter, tmp_path / "out")
    from safetensors.torch import load_file

    ad = {k.rsplit(".", 1)[-1]: v for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert set(ad) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    w2 = torch.einsum("ijkl,ip,jr->prkl", ad["lokr_t2"], ad["lokr_w2_a"], ad["lokr_w2_b"])  # (c, d, k, 1)
    taps = [torch.kron(ad["lokr_w1"], w2[:, :, k, 0]) for k in range(w2.shape[2])]
    delta = torch.stack(taps, -1) * 3.0
    merged = read_folder(tmp_path / "out")["c1.weight"]
    torch.testing.assert_close(merged, net.c1.weight.detach() + delta, rtol=1e-5, atol=1e-6)


def test_commands_other_than_a_single_merge_refuse_other_tuners_in_one_line(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "adapter", LINEAR_CONFIGS["loha"]())
    for args in (
        ["inspect", str(adapter)],
        ["verify", str(llama_fp32), str(llama_fp32), str(adapter)],
        ["convert", str(adapter), str(tmp_path / "c"), "--to-rslora"],
        ["merge", str(llama_fp32), str(adapter), str(adapter), str(tmp_path / "m")],
    ):
        result = cli_run(*args, code=1)
        assert "a LoHa adapter; " in result.output and "LoRA adapters only so far" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
