"""The merge equals PEFT's merge_and_unload, torch.equal per tensor, across adapter features and dtypes.

Every adapter here is built by PEFT itself (get_peft_model + save_pretrained) with random,
non-zero LoRA weights; the expected values come from PeftModel.from_pretrained(...).merge_and_unload().
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import cli_run
from peft import LoraConfig
from peft_oracle import (
    TwoAttentions,
    assert_same_tensors,
    load_causal_lm,
    make_adapter,
    make_llama,
    peft_merged_state_dict,
    read_folder,
    save_module,
)

from rslora_tools.cli import cli

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]


def cli_merge(base: Path, adapter: Path, out: Path, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), str(out), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check(base: Path, adapter: Path, out: Path, *args: str, prepare=None, skip=()) -> dict:
    report = cli_merge(base, adapter, out, *args)
    assert_same_tensors(read_folder(out), peft_merged_state_dict(base, adapter, prepare=prepare), skip=skip)
    return report


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_classic_and_rslora_all_dtypes(bases, tmp_path, dtype, use_rslora):
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=use_rslora, target_modules=ALL_LINEAR, init_lora_weights=False)
    adapter = make_adapter(bases[dtype], tmp_path / "adapter", cfg)
    report = check(bases[dtype], adapter, tmp_path / "out")
    assert report["convention"] == ("rslora" if use_rslora else "classic")
    expected = 16 / 8**0.5 if use_rslora else 2.0
    assert report["scale_min"] == report["scale_max"] == expected
    assert report["modules"] == 14


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_patterns_overlapping_keys_and_float_alpha(bases, tmp_path, dtype):
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        rank_pattern={"o_proj": 4, "layers.1.mlp.down_proj": 2, "^model.layers.0.self_attn.q_proj": 6},
        alpha_pattern={"q_proj": 16, "^model.layers.0.self_attn.q_proj": 4, "down_proj": 3.5, "up_proj": 7.25},
    )
    adapter = make_adapter(bases[dtype], tmp_path / "adapter", cfg)
    report = check(bases[dtype], adapter, tmp_path / "out")
    # layer 0 q_proj matches two alpha keys with different values: PEFT (and we) take the first in file order
    assert any("several alpha_pattern keys" in w for w in report["warnings"])


def test_dora_linear(llama_bf16, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN, init_lora_weights=False)
    check(llama_bf16, make_adapter(llama_bf16, tmp_path / "adapter", cfg), tmp_path / "out")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dora_rslora_with_patterns(bases, tmp_path, dtype):
    cfg = LoraConfig(
        r=8,
        lora_alpha=8,
        use_rslora=True,
        use_dora=True,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        rank_pattern={"mlp.*": 4},
        alpha_pattern={"v_proj": 2.5},
    )
    check(bases[dtype], make_adapter(bases[dtype], tmp_path / "adapter", cfg), tmp_path / "out")


@pytest.mark.parametrize("use_dora", [False, True])
def test_embedding_lora(llama_bf16, tmp_path, use_dora):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=use_dora,
        target_modules=["embed_tokens", "q_proj"],
        init_lora_weights=False,
        use_rslora=True,
    )
    check(llama_bf16, make_adapter(llama_bf16, tmp_path / "adapter", cfg), tmp_path / "out")


@pytest.mark.parametrize("use_dora", [False, True])
def test_gpt2_conv1d_fan_in_fan_out(gpt2_bf16, tmp_path, use_dora):
    # c_attn (32, 96) is decided by shape; c_proj (32, 32) is square: decided by the architecture
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        use_dora=use_dora,
        target_modules=["c_attn", "c_proj", "c_fc"],
        init_lora_weights=False,
        fan_in_fan_out=True,
    )
    check(gpt2_bf16, make_adapter(gpt2_bf16, tmp_path / "adapter", cfg), tmp_path / "out")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, 3)
        self.c2 = torch.nn.Conv2d(6, 8, (3, 2))
        self.c2_1x1 = torch.nn.Conv2d(8, 8, 1)
        self.c3 = torch.nn.Conv3d(4, 5, (2, 3, 3))
        self.c3_11k = torch.nn.Conv3d(5, 6, (1, 1, 3))  # PEFT's own 1x1 shortcut crashes here (#3768)
        self.fc = torch.nn.Linear(8, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_1d_2d_3d(tmp_path, dtype, use_dora):
    torch.manual_seed(0)
    net = ConvNet().to(dtype)
    base = save_module(net, tmp_path / "base")
    targets = ["c1", "c2", "c2_1x1", "c3", "fc"]
    cfg = LoraConfig(
        r=2,
        lora_alpha=6,
        use_rslora=True,
        use_dora=use_dora,
        target_modules=targets,
        init_lora_weights=False,
        rank_pattern={"c3": 3},
    )
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    cli_merge(base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(net, adapter))


def test_conv3d_1x1xk_merges_with_the_general_formula(tmp_path):
    """PEFT crashes on Conv3d (1,1,k); we merge it: compare with the mathematical definition."""
    torch.manual_seed(0)
    net = ConvNet()
    base = save_module(net, tmp_path / "base")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c3_11k"], init_lora_weights=False)
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    cli_merge(base, adapter, tmp_path / "out")
    from safetensors.torch import load_file

    ad = load_file(adapter / "adapter_model.safetensors")
    a = ad["base_model.model.c3_11k.lora_A.weight"]  # (r, in, 1, 1, 3)
    b = ad["base_model.model.c3_11k.lora_B.weight"]  # (out, r, 1, 1, 1)
    delta = torch.einsum("or,rihwk->oihwk", b.flatten(1), a) * 2.0
    merged = read_folder(tmp_path / "out")["c3_11k.weight"]
    torch.testing.assert_close(merged, net.c3_11k.weight.detach() + delta, rtol=1e-5, atol=1e-6)


def test_lora_bias(tmp_path):
    base = make_llama(tmp_path / "base", torch.bfloat16, attention_bias=True)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=ATTN, init_lora_weights=False, use_rslora=True)
    check(base, make_adapter(base, tmp_path / "adapter", cfg), tmp_path / "out")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_all_and_lora_only(tmp_path, bias):
    base = make_llama(tmp_path / "base", torch.bfloat16, attention_bias=True)
    cfg = LoraConfig(r=4, lora_alpha=8, bias=bias, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    check(base, make_adapter(base, tmp_path / "adapter", cfg), tmp_path / "out")


def _resize(rows: int):
    def prepare(model):
        model.resize_token_embeddings(rows)

    return prepare


def test_modules_to_save_with_grown_vocabulary(llama_bf16, tmp_path):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        modules_to_save=["embed_tokens", "lm_head"],
    )
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg, prepare=_resize(80))
    report = check(llama_bf16, adapter, tmp_path / "out", prepare=_resize(80))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 80
    assert report["config_updates"] == {"vocab_size": 80}


def test_embedding_lora_on_grown_vocabulary_uses_saved_base_layer(llama_bf16, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False)
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg, prepare=_resize(72))
    check(llama_bf16, adapter, tmp_path / "out", prepare=_resize(72))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 72


def test_trainable_tokens(llama_bf16, tmp_path):
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=[1, 5, 7]
    )
    check(llama_bf16, make_adapter(llama_bf16, tmp_path / "adapter", cfg), tmp_path / "out")


def test_trainable_tokens_dict_form(llama_bf16, tmp_path):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        init_lora_weights=False,
        trainable_token_indices={"embed_tokens": [2, 3]},
    )
    check(llama_bf16, make_adapter(llama_bf16, tmp_path / "adapter", cfg), tmp_path / "out")


def test_sharded_base_keeps_its_shards(llama_sharded, tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR, init_lora_weights=False)
    adapter = make_adapter(llama_sharded, tmp_path / "adapter", cfg)
    report = check(llama_sharded, adapter, tmp_path / "out")
    base_index = json.loads((llama_sharded / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert sorted(report["shards"]) == sorted(set(base_index["weight_map"].values()))
    assert out_index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in read_folder(tmp_path / "out").values()
    )


def test_reshard_and_merge_into_single_file(llama_sharded, llama_bf16, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(llama_sharded, tmp_path / "adapter", cfg)
    expected = peft_merged_state_dict(llama_sharded, adapter)
    cli_merge(llama_sharded, adapter, tmp_path / "one", "--max-shard-size", "10GB")
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert_same_tensors(read_folder(tmp_path / "one"), expected)
    cli_merge(llama_sharded, adapter, tmp_path / "many", "--max-shard-size", "30KB")
    names = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    assert_same_tensors(read_folder(tmp_path / "many"), expected)


def test_output_dtype_option(llama_fp32, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(llama_fp32, tmp_path / "adapter", cfg)
    cli_merge(llama_fp32, adapter, tmp_path / "out", "--dtype", "bf16")
    model = AutoModelForCausalLM.from_pretrained(llama_fp32, dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    assert_same_tensors(read_folder(tmp_path / "out"), dict(expected))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_tied_lm_head_lora_unties_and_keeps_embedding(llama_tied, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
    adapter = make_adapter(llama_tied, tmp_path / "adapter", cfg)
    report = cli_merge(llama_tied, adapter, tmp_path / "out")
    expected = peft_merged_state_dict(llama_tied, adapter)
    merged = read_folder(tmp_path / "out")
    base = read_folder(llama_tied)
    assert "lm_head.weight" not in base
    # PEFT adds the head's delta into the shared tensor (changing the input embedding too); we untie instead
    assert "lm_head.weight" not in expected  # PEFT's result stays tied: one shared tensor
    assert torch.equal(merged["lm_head.weight"], expected["model.embed_tokens.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert_same_tensors(merged, expected, skip={"lm_head.weight", "model.embed_tokens.weight"})
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("tied" in w for w in report["warnings"])


def test_tied_embedding_lora_unties_and_keeps_head(llama_tied, tmp_path):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens"], init_lora_weights=False)
    adapter = make_adapter(llama_tied, tmp_path / "adapter", cfg)
    cli_merge(llama_tied, adapter, tmp_path / "out")
    expected = peft_merged_state_dict(llama_tied, adapter)
    merged, base = read_folder(tmp_path / "out"), read_folder(llama_tied)
    assert torch.equal(merged["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
    # during training the head used the plain embedding, so the merged head is the base embedding
    assert torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_tied_trainable_tokens_stay_tied(llama_tied, tmp_path):
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=[3, 4]
    )
    adapter = make_adapter(llama_tied, tmp_path / "adapter", cfg)
    check(llama_tied, adapter, tmp_path / "out", skip={"lm_head.weight"})
    assert "lm_head.weight" not in read_folder(tmp_path / "out")


def test_adapter_trained_on_bare_model_merges_into_causal_lm_checkpoint(llama_bf16, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    bare = AutoModel.from_pretrained(llama_bf16, dtype="auto")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False, use_rslora=True)
    adapter = make_adapter(bare, tmp_path / "adapter", cfg)
    keys = json.loads(json.dumps(list(read_folder(adapter).keys())))
    assert all(k.startswith("base_model.model.layers.") for k in keys)
    cli_merge(llama_bf16, adapter, tmp_path / "out")
    expected = PeftModel.from_pretrained(
        AutoModel.from_pretrained(llama_bf16, dtype="auto"), str(adapter)
    ).merge_and_unload()
    expected_sd = {f"model.{k}": v for k, v in expected.state_dict().items()}
    merged = read_folder(tmp_path / "out")
    assert_same_tensors(merged, expected_sd, skip={"lm_head.weight"})


def test_causal_lm_adapter_merges_into_bare_model_checkpoint(llama_bf16, tmp_path):
    from transformers import AutoModel

    bare_dir = tmp_path / "bare"
    AutoModel.from_pretrained(llama_bf16, dtype="auto").save_pretrained(bare_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg)
    cli_merge(bare_dir, adapter, tmp_path / "out")
    expected = peft_merged_state_dict(llama_bf16, adapter)
    expected_sd = {k.removeprefix("model."): v for k, v in expected.items() if k != "lm_head.weight"}
    assert_same_tensors(read_folder(tmp_path / "out"), expected_sd)


def test_adapter_in_subfolder_and_bin_next_to_safetensors(llama_bf16, tmp_path):
    from peft import get_peft_model
    from peft_oracle import perturb_trainable

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    model = get_peft_model(load_causal_lm(llama_bf16), cfg, adapter_name="mine")
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    sub = tmp_path / "adapter" / "mine"
    assert (sub / "adapter_model.safetensors").is_file()
    # a stale pickle next to the safetensors file is never read
    (sub / "adapter_model.bin").write_bytes(b"not a pickle")
    cli_merge(llama_bf16, tmp_path / "adapter", tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(llama_bf16, sub))


def test_bf16_saved_adapter(llama_bf16, tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=32, use_rslora=True, target_modules=ALL_LINEAR, init_lora_weights=False)
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg, save_dtype=torch.bfloat16)
    check(llama_bf16, adapter, tmp_path / "out")


def test_side_files_are_copied_and_tokenizer_comes_from_adapter(llama_bf16, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_bf16, base)
    (base / "tokenizer.json").write_text('{"base": true}')
    (base / "tokenizer_config.json").write_text('{"base": true}')
    (base / "README.md").write_text("# the base model card")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(base, tmp_path / "adapter", cfg)
    (adapter / "tokenizer.json").write_text('{"trained": true}')
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    cli_merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    assert (out / "tokenizer.json").read_text() == '{"trained": true}'
    assert (out / "chat_template.jinja").is_file()
    assert not (out / "tokenizer_config.json").exists()  # the tokenizer is taken whole from the adapter
    assert not (out / "README.md").exists()
    assert not (out / "adapter_config.json").exists()


def test_every_shard_has_pt_format_metadata(llama_sharded, tmp_path):
    from safetensors import safe_open

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    cli_merge(llama_sharded, make_adapter(llama_sharded, tmp_path / "adapter", cfg), tmp_path / "out")
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt"


class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(2048, 700, bias=False)  # merged in 512-row blocks, the last one overlapping
        self.down = torch.nn.Linear(4096, 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_linear_merged_in_blocks_equals_peft(tmp_path, dtype):
    torch.manual_seed(0)
    net = Wide().to(dtype)
    base = save_module(net, tmp_path / "base")
    cfg = LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=["up", "down"], init_lora_weights=False)
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    cli_merge(base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(net, adapter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multihead_attention_in_and_out_proj(tmp_path, dtype):
    """PEFT's MHA LoRA: in_proj double-rounded, out_proj delta applied twice, patterns by the MHA's name."""
    torch.manual_seed(0)
    net = TwoAttentions().to(dtype)
    base = save_module(net, tmp_path / "base")
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["mha", "other"],
        init_lora_weights=False,
        rank_pattern={"other": 2},
        alpha_pattern={"other": 3},
    )
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    cli_merge(base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(net, adapter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_embedding_merged_in_blocks_equals_peft(tmp_path, dtype):
    """A vocabulary big enough that the embedding delta is added in several row blocks."""
    base = make_llama(tmp_path / "base", dtype, vocab_size=40_000)
    cfg = LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    adapter = make_adapter(base, tmp_path / "adapter", cfg)
    check(base, adapter, tmp_path / "out")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_torch_path_and_kernel_path_both_equal_peft(bases, tmp_path, dtype, monkeypatch):
    """Linear and embedding LoRA go through the C kernel when it is built; with RSLORA_TOOLS_KERNEL=0 through torch."""
    from rslora_tools.compute import kernel

    cfg = LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR + ["embed_tokens"], init_lora_weights=False
    )
    adapter = make_adapter(bases[dtype], tmp_path / "adapter", cfg)
    expected = peft_merged_state_dict(bases[dtype], adapter)
    plan = cli_merge(bases[dtype], adapter, tmp_path / "plan", "--dry-run")
    assert {c["by"] for c in plan["changes"]} == {"kernel" if kernel.available() else "torch"}
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")
    cli_merge(bases[dtype], adapter, tmp_path / "torch")
    assert_same_tensors(read_folder(tmp_path / "torch"), expected)
    monkeypatch.delenv("RSLORA_TOOLS_KERNEL")
    cli_merge(bases[dtype], adapter, tmp_path / "default")
    assert_same_tensors(read_folder(tmp_path / "default"), expected)


def test_plain_linear_merge_never_imports_torch(llama_bf16, tmp_path):
    """With the kernel, a merge of linear LoRA weights (and modules saved whole) runs without torch,
    which takes a second to import."""
    import subprocess
    import sys

    from rslora_tools.compute import kernel

    if not kernel.available():
        pytest.skip("merge kernel not built or CPU without AVX2/FMA/F16C")
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        modules_to_save=["lm_head"],
    )
    adapter = make_adapter(llama_bf16, tmp_path / "adapter", cfg)
    code = (
        "import sys; from rslora_tools.cli import main; sys.argv = ['rslora-tools', 'merge', *sys.argv[1:], '-q']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(llama_bf16), str(adapter), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False", result.stderr
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(llama_bf16, adapter))


class _TwoLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 48, bias=False)
        self.b = torch.nn.Linear(48, 64, bias=False)


def test_non_finite_base_weights_are_merged_by_torch(tmp_path, monkeypatch):
    """An Inf in a base weight makes a sum the kernel does not round like torch: that tensor is recomputed with
    torch."""
    import importlib

    executor = importlib.import_module("rslora_tools.execute.executor")
    torch.manual_seed(0)
    net = _TwoLinear().to(torch.bfloat16)
    with torch.no_grad():
        net.a.weight[3, 7] = float("inf")
        net.a.weight[5, 1] = -float("inf")
    base = save_module(net, tmp_path / "base")
    cfg = LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=["a", "b"], init_lora_weights=False)
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    by_torch = []
    real = executor.with_torch
    monkeypatch.setattr(executor, "with_torch", lambda run, t, writer: by_torch.append(t.name) or real(run, t, writer))
    cli_merge(base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(net, adapter))
    from rslora_tools.compute import kernel

    assert by_torch == (["a.weight"] if kernel.available() else ["a.weight", "b.weight"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mica_merges_with_its_own_rounding(bases, tmp_path, dtype):
    """MiCA's merge casts the delta to the weight's dtype before adding (two roundings): a plain Linear merge was
    one ulp off in bf16 (issue 36)."""
    base = bases[dtype]
    adapter = make_adapter(
        base,
        tmp_path / "mica",
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="mica", target_modules=["q_proj", "v_proj", "embed_tokens"]),
    )
    cli_run("merge", base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(base, adapter))


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_velora_and_monteclora_merge_as_plain_lora_without_their_training_tensors(llama_bf16, tmp_path, variant):
    """Their saved training-only tensors (lora_velora_embed, lora_monteclora_sampler.*) were blamed on the base
    ("matches no tensor in the base checkpoint"); PEFT merges them as B @ A."""
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    extra = {"velora_config": VeloraConfig()} if variant == "velora" else {"monteclora_config": MontecloraConfig()}
    adapter = make_adapter(
        llama_bf16,
        tmp_path / variant,
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"], **extra),
    )
    cli_run("merge", llama_bf16, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(llama_bf16, adapter))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_target_parameters_on_a_linear_weight_round_as_peft_param_wrapper(bases, tmp_path, dtype):
    """`target_parameters=["q_proj.weight"]`: PEFT wraps the 2-D weight as a parameter (ParamWrapper: the delta cast to
    the weight's dtype, then added: two roundings), not as a Linear; the Linear path was one ulp off (issue 36)."""
    base = bases[dtype]
    adapter = make_adapter(
        base,
        tmp_path / "param",
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[], target_parameters=["q_proj.weight"]),
    )
    cli_run("merge", base, adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(base, adapter))


def test_a_null_dtype_beside_torch_dtype_is_read_as_transformers_reads_it(llama_bf16, tmp_path):
    """config.json with `"dtype": null` and `"torch_dtype": "bfloat16"`: transformers loads bfloat16, and the merge of
    an FP8 base writes its dequantized weights in BF16 beside the BF16 tensors (it wrote F32: issue 36)."""
    from safetensors import safe_open

    from rslora_tools.formats.quant import config_dtype

    fp8 = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama-fp8"
    base = tmp_path / "base"
    shutil.copytree(fp8, base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (base / "config.json").write_text(json.dumps({**config, "dtype": None, "torch_dtype": "bfloat16"}))
    assert config_dtype(json.loads((base / "config.json").read_text())) == "BF16"
    from transformers import AutoConfig

    assert str(AutoConfig.from_pretrained(base).dtype) == "torch.bfloat16"  # transformers' own reading
    adapter = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama-rslora"
    cli_run("merge", base, adapter, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes


class _WideNet(torch.nn.Module):
    """Layers the merge computes with torch (convolutions, DoRA), large enough for torch to split its work."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4096, 256)
        self.conv = torch.nn.Conv2d(64, 128, 3)
        self.lin = torch.nn.Linear(512, 512)
        self.small = torch.nn.Conv1d(4, 6, 3)  # fp32: torch's delta is one ulp apart between 1 and 2 threads here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_computes_each_tensor_on_one_thread_whatever_the_thread_count(tmp_path, monkeypatch, use_dora, dtype):
    """Merged bytes must not depend on the machine's core count (issue 36: embedding and convolution LoRA/DoRA
    merges differed by 3.8e-6 between 1 and 2 torch threads on another machine): torch computes each tensor on one
    intra-op thread, and a merge run with OMP_NUM_THREADS 1, 2 and 4 writes the same bytes, PEFT's."""
    import os
    import subprocess
    import sys

    from rslora_tools.compute import torch_ops

    torch.manual_seed(0)
    net = _WideNet().to(dtype)
    base = save_module(net, tmp_path / "base")
    cfg = LoraConfig(
        r=16,
        lora_alpha=8,
        use_rslora=True,
        use_dora=use_dora,
        init_lora_weights=False,
        target_modules=["emb", "conv", "lin", "small"],
    )
    adapter = make_adapter(net, tmp_path / "adapter", cfg)
    seen = []
    real = torch_ops.apply_lora
    monkeypatch.setattr(
        torch_ops, "apply_lora", lambda w, op, read: seen.append(torch.get_num_threads()) or real(w, op, read)
    )
    monkeypatch.setenv("RSLORA_TOOLS_KERNEL", "0")  # every tensor through torch
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cli_run("merge", base, adapter, tmp_path / "out")
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}, seen
    outputs = []
    for threads in ("1", "2", "4"):
        out = tmp_path / f"out{threads}"
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, RSLORA_TOOLS_KERNEL="0")
        subprocess.run([sys.executable, "-m", "rslora_tools", "merge", base, adapter, out, "-q"], env=env, check=True)
        outputs.append((out / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert_same_tensors(read_folder(tmp_path / "out1"), peft_merged_state_dict(net, adapter))
