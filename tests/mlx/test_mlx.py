"""mlx-lm adapters both ways, proven on mlx-lm itself (mlx-lm 0.32.2, mlx 0.32.4 on CPU; docs/mlx.md).

PEFT -> mlx-lm: `convert --target mlx` gives logits in mlx-lm equal to PEFT's (fp32, within 1e-5) for
classic LoRA, rsLoRA, rank/alpha patterns and DoRA on tiny Llama and Qwen2 models, and mlx-lm wraps
exactly the adapter's modules. mlx-lm -> Hugging Face: an adapter trained for a few steps by mlx-lm's
own LoRA and DoRA layers merges into the transformers checkpoint and gives mlx-lm's logits (and
mlx_lm.fuse's weights), converts to a PEFT adapter PEFT serves the same, and round trips are exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_run
from peft import LoraConfig, PeftModel
from peft_oracle import assert_same_tensors, load_causal_lm, make_adapter, make_llama, read_folder

if os.environ.get("RSLORA_TOOLS_REQUIRE_MLX"):
    import mlx_lm  # noqa: F401  (CI: the tests must run, not skip)
else:
    pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (pip install -e '.[test]' on Linux or macOS)")

import mlx.core as mx  # noqa: E402
import mlx.nn as mnn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_lm.tuner.trainer import default_loss  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

IDS = [[1, 5, 9, 20, 33, 2, 47, 11, 63, 8]]
TOLERANCE = 1e-5


def make_qwen2(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    # mlx-lm 0.32.2's qwen2.py reads a top-level rope_theta (default 1e6), not transformers 5's rope_parameters:
    # without it the two run different base models (measured: logits 3e-4 apart without any adapter)
    saved = json.loads((path / "config.json").read_text())
    saved["rope_theta"] = saved["rope_parameters"]["rope_theta"]
    (path / "config.json").write_text(json.dumps(saved))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return {
        "llama": make_llama(tmp_path_factory.mktemp("llama"), torch.float32),
        "qwen2": make_qwen2(tmp_path_factory.mktemp("qwen2")),
    }


def mlx_model(base: Path, adapter: Path | None = None):
    model, _ = load_model(base)
    if adapter is not None:
        load_adapters(model, str(adapter))
    return model


def mlx_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    return np.array(mlx_model(base, adapter)(mx.array(IDS)))


def peft_logits(base: Path, adapter: Path | None = None) -> np.ndarray:
    model = load_causal_lm(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def wrapped_modules(model) -> set[str]:
    """The modules mlx-lm wrapped with LoRA or DoRA."""
    return {name for name, m in model.named_modules() if hasattr(m, "lora_a")}


CONFIGS = {
    "classic": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 5}),
    "dora": dict(r=4, lora_alpha=12, use_rslora=True, use_dora=True),
    "some-layers": dict(r=4, lora_alpha=8, layers_to_transform=[1]),
    "lm-head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
}


def peft_adapter(base: Path, out: Path, name: str) -> Path:
    fields = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], **CONFIGS[name]}
    return make_adapter(base, out, LoraConfig(**fields))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_converted_adapter_gives_peft_logits_in_mlx_lm(models, tmp_path, arch, name):
    base = models[arch]
    adapter = peft_adapter(base, tmp_path / "peft", name)
    result = cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx")
    assert "mlx-lm adapter" in result.output
    model = mlx_model(base, tmp_path / "mlx")
    peft_modules = {
        k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in read_folder(adapter) if ".lora_A." in k
    }
    assert wrapped_modules(model) == peft_modules  # every module, and nothing else
    got = np.array(model(mx.array(IDS)))
    want = peft_logits(base, adapter)
    assert np.abs(got - want).max() < TOLERANCE
    assert np.abs(want - peft_logits(base)).max() > 1e-3  # the adapter changes the model
    assert np.abs(mlx_logits(base) - peft_logits(base)).max() < TOLERANCE  # the same base model


def test_patterns_get_one_rank_and_scale_with_the_rest_folded_and_padded(models, tmp_path):
    adapter = peft_adapter(models["llama"], tmp_path / "peft", "patterns")
    result = cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx", "--json")
    report = json.loads(result.output)
    assert "4 modules with another PEFT scale: the ratio folded into lora_b" in report["message"]
    assert "2 modules of a smaller rank padded with zeros (exact)" in report["message"]
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 16 / 8**0.5
    assert config["num_layers"] == 2 and config["lora_parameters"]["keys"] == [
        "mlp.down_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]


def test_a_layer_subset_is_named_by_full_paths(models, tmp_path):
    adapter = peft_adapter(models["llama"], tmp_path / "peft", "some-layers")
    cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx")
    keys = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["lora_parameters"]["keys"]
    assert keys[0] == "model.layers.1.mlp.down_proj" and all(k.startswith("model.layers.1.") for k in keys)


@pytest.mark.parametrize("name", ["classic", "rslora", "dora"])
def test_peft_to_mlx_to_peft_is_exact(models, tmp_path, name):
    base = models["llama"]
    adapter = peft_adapter(base, tmp_path / "peft", name)
    cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx")
    to = "--to-rslora" if CONFIGS[name].get("use_rslora") else "--to-classic"
    cli_run("convert", tmp_path / "mlx", tmp_path / "back", to)
    original, back = read_folder(adapter), read_folder(tmp_path / "back")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["use_rslora"] == bool(CONFIGS[name].get("use_rslora"))
    cli_run("merge", base, adapter, tmp_path / "m1")
    cli_run("merge", base, tmp_path / "back", tmp_path / "m2")
    assert_same_tensors(read_folder(tmp_path / "m2"), read_folder(tmp_path / "m1"))


def mlx_trained(base: Path, out: Path, *, dora: bool, num_layers: int = 2, scale: float = 3.0, steps: int = 4) -> Path:
    """An adapter trained for a few steps with mlx-lm's own LoRA/DoRA layers and loss, saved as mlx_lm.lora saves
    it."""
    mx.random.seed(0)
    model = mlx_model(base)
    model.freeze()
    params = {"rank": 4, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    optimizer = optim.Adam(learning_rate=3e-2)
    loss_and_grad = mnn.value_and_grad(model, default_loss)
    batch = mx.array(np.random.default_rng(0).integers(0, 64, (2, 12)))
    lengths = mx.array([[0, 11], [0, 11]])
    for _ in range(steps):
        (_, _), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    config = {
        "model": str(base),
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "seed": 0,
        "iters": steps,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return out


def fused_weights(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    """What mlx_lm.fuse writes (mlx-lm 0.32.2, fuse.py main): every LoRA module fused, de-quantized."""
    model = mlx_model(base, adapter)
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_mlx_trained_adapter_merges_into_the_transformers_base(models, tmp_path, arch, dora):
    base = models[arch]
    adapter = mlx_trained(base, tmp_path / "mlx", dora=dora, num_layers=2 if arch == "llama" else 1)
    want = mlx_logits(base, adapter)
    assert np.abs(want - mlx_logits(base)).max() > 1e-3  # training moved it
    cli_run("merge", base, adapter, tmp_path / "merged")
    assert np.abs(peft_logits(tmp_path / "merged") - want).max() < TOLERANCE
    merged, fused = read_folder(tmp_path / "merged"), fused_weights(base, adapter)
    assert set(merged) == set(fused)
    assert max(float(np.abs(merged[k].numpy() - fused[k]).max()) for k in fused) < 1e-6
    assert "exact" in cli_run("verify", tmp_path / "merged", base, adapter).output
    cli_run("convert", adapter, tmp_path / "peft", "--target", "peft" if dora else "vllm")  # vLLM refuses DoRA
    assert np.abs(peft_logits(base, tmp_path / "peft") - want).max() < TOLERANCE


def test_mlx_to_peft_to_mlx_is_exact(models, tmp_path):
    adapter = mlx_trained(models["llama"], tmp_path / "mlx", dora=True, scale=20.0)
    cli_run("convert", adapter, tmp_path / "peft", "--to-rslora")
    cli_run("convert", tmp_path / "peft", tmp_path / "again", "--target", "mlx")
    original, again = read_folder(adapter), read_folder(tmp_path / "again")
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["scale"] == 20.0 and config["fine_tune_type"] == "dora"


def test_inspect_reads_an_mlx_adapter_and_says_who_serves_it(models, tmp_path):
    adapter = mlx_trained(models["llama"], tmp_path / "mlx", dora=False, num_layers=1)
    report = json.loads(cli_run("inspect", adapter, "--json").output)
    assert report["adapter_format"] == "mlx-lm" and report["r"] == 4 and report["lora_alpha"] == 12
    assert report["runtimes"]["mlx"]["status"] == "exact"
    assert "not mlx-lm's (convert --target vllm writes one)" in report["runtimes"]["vllm"]["reasons"][0]
    peft = json.loads(cli_run("inspect", peft_adapter(models["llama"], tmp_path / "peft", "rslora"), "--json").output)
    assert peft["runtimes"]["mlx"]["status"] == "cannot serve"


@pytest.mark.parametrize(
    "fields, says",
    [
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(lora_bias=True), "lora_bias"),
        (dict(target_modules=["embed_tokens", "q_proj"]), "embedding LoRA"),
    ],
)
def test_what_mlx_lm_cannot_serve_is_refused(models, tmp_path, fields, says):
    adapter = make_adapter(
        models["llama"], tmp_path / "peft", LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **fields})
    )
    result = cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx", code=1)
    assert "mlx-lm cannot serve this adapter" in result.output and says in result.output
    assert not (tmp_path / "mlx").exists()


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda c: c.update(fine_tune_type="full"), "rslora-tools extract"),
        (lambda c: c["lora_parameters"].pop("scale"), "lora_parameters.scale"),
        (lambda c: c["lora_parameters"].update(rank=8), "not rank 8"),
    ],
)
def test_a_broken_or_full_mlx_adapter_is_refused_in_one_line(models, tmp_path, edit, says):
    adapter = mlx_trained(models["llama"], tmp_path / "mlx", dora=False, num_layers=1, steps=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli_run("merge", models["llama"], adapter, tmp_path / "out", code=None)
    assert result.exit_code != 0 and says in result.output and len(result.output.strip().splitlines()) == 1


def test_an_mlx_adapter_from_the_hub_merges_and_a_converted_one_gets_an_mlx_card(models, tmp_path, fake_hub):
    adapter = mlx_trained(models["llama"], tmp_path / "mlx", dora=False)
    fake_hub.upload_local_folder("me/mlx-adapter", adapter)
    cli_run("merge", models["llama"], "me/mlx-adapter", tmp_path / "from-hub")
    cli_run("merge", models["llama"], adapter, tmp_path / "local")
    assert_same_tensors(read_folder(tmp_path / "from-hub"), read_folder(tmp_path / "local"))
    cli_run("convert", peft_adapter(models["llama"], tmp_path / "peft", "rslora"), tmp_path / "out", "--target", "mlx")
    preview = json.loads(cli_run("push", tmp_path / "out", "me/adapter-mlx", "--dry-run", "--json").output)
    assert "library_name: mlx" in preview["card"] and "from mlx_lm import generate, load" in preview["card"]
    assert "peft" not in preview["card"].split("---")[1]  # not announced as a PEFT adapter


def test_a_dry_run_writes_nothing(models, tmp_path):
    adapter = peft_adapter(models["llama"], tmp_path / "peft", "dora")
    report = json.loads(cli_run("convert", adapter, tmp_path / "mlx", "--target", "mlx", "--dry-run", "--json").output)
    assert report["dry_run"] and report["action"] == "mlx" and not (tmp_path / "mlx").exists()


@pytest.mark.parametrize(
    "tensors, says",
    [
        (
            {
                "model.layers.0.mlp.switch_mlp.gate_proj.lora_a": torch.zeros(4, 4, 32),
                "model.layers.0.mlp.switch_mlp.gate_proj.lora_b": torch.zeros(4, 48, 4),
            },
            "fused MoE experts (SwitchLinear)",
        ),
        (
            {"model.embed_tokens.lora_a": torch.zeros(64, 4), "model.embed_tokens.lora_b": torch.zeros(4, 32)},
            "mlx-lm embedding LoRA is not read",
        ),
        ({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, "is not an mlx-lm LoRA or DoRA tensor"),
    ],
)
def test_mlx_adapters_rslora_tools_cannot_read_are_refused(models, tmp_path, tensors, says):
    from safetensors.torch import save_file

    (tmp_path / "mlx").mkdir()
    save_file(tensors, tmp_path / "mlx" / "adapters.safetensors")
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0}}
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(config))
    result = cli_run("inspect", tmp_path / "mlx", code=1)
    assert says in result.output
