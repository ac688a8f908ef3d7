"""target_parameters (PEFT's ParamWrapper on MoE expert parameters) against PEFT's merge."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig
from peft_oracle import (
    assert_same_tensors,
    make_adapter,
    peft_merged_state_dict,
    read_folder,
    save_module,
)

from rslora_tools.cli import cli


def tiny_mixtral(dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    return AutoModelForCausalLM.from_config(config).to(dtype)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_fused_expert_parameters_equal_peft(tmp_path, use_rslora):
    model = tiny_mixtral()
    # a checkpoint that stores the experts fused, as the model holds them (E, out, in)
    base = save_module(model, tmp_path / "base")
    (base / "config.json").write_text(model.config.to_json_string())
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=use_rslora,
        init_lora_weights=False,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"down_proj": 3},
    )
    adapter = make_adapter(model, tmp_path / "adapter", cfg)
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["modules"] == 2 * 2 + 2
    assert_same_tensors(read_folder(tmp_path / "out"), peft_merged_state_dict(model, adapter))


def test_target_parameters_convert_and_inspect(tmp_path):
    """rank_pattern keys match `<module>.<param>` for expert parameters; convert keeps every scale."""
    model = tiny_mixtral(torch.float32)
    base = save_module(model, tmp_path / "base")
    (base / "config.json").write_text(model.config.to_json_string())
    cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        init_lora_weights=False,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"down_proj": 5},
    )
    adapter = make_adapter(model, tmp_path / "adapter", cfg)
    runner = CliRunner()
    report = json.loads(runner.invoke(cli, ["inspect", str(adapter), "--json"]).stdout)
    down = [m for m in report["modules"] if m["pattern_name"].endswith("experts.down_proj")]
    assert down and all((m["kind"], m["rank"], m["alpha"]) == ("param", 3, 5) for m in down)
    assert report["errors"] == 0
    result = runner.invoke(cli, ["convert", str(adapter), str(tmp_path / "classic"), "--to-classic"])
    assert result.exit_code == 0, result.output
    want = peft_merged_state_dict(model, adapter)
    got = peft_merged_state_dict(model, tmp_path / "classic")
    assert all(torch.equal(got[k], v) for k, v in want.items())
