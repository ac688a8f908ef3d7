"""`inspect ADAPTER --base BASE`: will it apply? Every adapter module with the base tensors it changes (after any
renaming or expert split), and an error when it changes nothing or was trained on another model."""

from __future__ import annotations

import json
import shutil
import warnings

from helpers import ADAPTER, BASE, cli_run
from layout_models import moe_model, qwen2_vl
from peft import LoraConfig, get_peft_model


def test_each_module_and_the_tensors_it_changes(tmp_path):
    model, _ = qwen2_vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "qkv"])).save_pretrained(
            tmp_path / "a"
        )
    report = json.loads(cli_run("inspect", tmp_path / "a", "--base", tmp_path / "base", "--json").stdout)
    assert report["applies_to"] == {
        "model.language_model.layers.0.self_attn.q_proj": ["model.layers.0.self_attn.q_proj.weight"],
        "model.language_model.layers.1.self_attn.q_proj": ["model.layers.1.self_attn.q_proj.weight"],
        "model.visual.blocks.0.attn.qkv": ["visual.blocks.0.attn.qkv.weight"],
    }
    assert report["errors"] == 0
    text = cli_run("inspect", tmp_path / "a", "--base", tmp_path / "base").output
    assert (
        "  applies to (3 base tensors):\n  model.language_model.layers.0.self_attn.q_proj -> "
        "model.layers.0.self_attn.q_proj.weight\n" in text
    )


def test_fused_experts_apply_to_every_expert(tmp_path):
    model = moe_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "base")
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_parameters=["experts.down_proj"])).save_pretrained(
            tmp_path / "a"
        )
    report = json.loads(cli_run("inspect", tmp_path / "a", "--base", tmp_path / "base", "--json").stdout)
    assert report["applies_to"]["model.layers.0.mlp.experts"] == [
        f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight" for e in range(4)
    ]


def test_an_adapter_that_changes_nothing_of_the_base_fails(tmp_path):
    model, _ = qwen2_vl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"])).save_pretrained(tmp_path / "a")
    result = cli_run("inspect", tmp_path / "a", "--base", BASE, code=1)
    assert (
        "error: the adapter changes no tensor of the base: served on it, it would change nothing [applies-to-nothing]"
    ) in result.output
    assert json.loads(cli_run("inspect", tmp_path / "a", "--base", BASE, "--json", code=1).stdout)["applies_to"] == {}


def test_an_adapter_trained_on_another_model_fails(tmp_path, monkeypatch):
    cli_run("inspect", ADAPTER, "--base", BASE)  # its own base: fine
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "fixtures" / "tiny-llama"  # what the adapter records, here a model of another shape
    shutil.copytree(BASE, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    adapter = tmp_path / "fixtures" / "adapter"
    shutil.copytree(ADAPTER, adapter)
    result = cli_run("inspect", adapter, "--base", BASE, code=1)
    assert (
        f"error: the adapter records its base as 'fixtures/tiny-llama' ({other}), whose config.json differs from "
        "BASE's in num_hidden_layers [base-differs]"
    ) in result.output


def test_an_adapter_trained_on_another_model_class_fails(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(ADAPTER, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": "LlavaForConditionalGeneration", "parent_library": "transformers"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli_run("inspect", adapter, "--base", BASE, code=1)
    assert (
        "error: the adapter was trained on a LlavaForConditionalGeneration, BASE is a LlamaForCausalLM: names "
        "may match while runtimes load the two differently [base-class]"
    ) in result.output
