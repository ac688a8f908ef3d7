"""extract: a tuned model built as BASE + known changes comes back as an adapter that PEFT merges to TUNED.

TUNED is BASE plus low-rank deltas of known, different ranks per module, bias changes, a changed
norm. The bound on the merged weights: the factorisation's float32 error, measured by the
report, plus PEFT's own float32 merge: |merged - tuned| <= 1e-5 * max|tuned| per tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft_oracle import make_gpt2, make_llama, peft_merged_state_dict, read_folder
from safetensors.torch import save_file

RANKS = {"q_proj": 2, "v_proj": 5, "down_proj": 3, "up_proj": 1}


def tuned_copy(base: Path, out: Path, edit) -> Path:
    """A copy of BASE with its tensors changed by `edit(tensors, generator)`."""
    tensors = read_folder(base)
    edit(tensors, torch.Generator().manual_seed(0))
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.json.index*"))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def low_rank(tensors: dict, g, ranks: dict[str, int], scale: float = 0.02) -> None:
    for key in list(tensors):
        for module, r in ranks.items():
            if f".{module}." in key and key.endswith(".weight") and tensors[key].dim() == 2:
                rows, cols = tensors[key].shape
                tensors[key] = (
                    tensors[key] + (torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)) * scale
                )


def assert_merges_to(base: Path, adapter: Path, tuned: Path, tied: str | None = None) -> None:
    """PEFT merges the adapter into BASE to TUNED. With tied embeddings (`tied`: the embedding tensor), PEFT's
    merge_and_unload adds the delta to the shared matrix twice, once for the embedding and once for the head it
    serves it on (peft 0.21.2, docs/peft-rules.md "Tied embeddings"): that tensor is checked through what PEFT
    serves (logits equal TUNED's) and rslora-tools' merge (which applies it once) instead."""
    merged, want = peft_merged_state_dict(base, adapter), read_folder(tuned)
    assert set(merged) == set(want)
    for key, value in want.items():
        if key != tied:
            assert torch.allclose(merged[key], value, rtol=0, atol=1e-5 * value.abs().max().item()), key
    if tied is not None:
        assert_served_like(base, adapter, tuned)
        ours = base.parent / f"{adapter.name}-merged"
        cli_run("merge", base, adapter, ours, "--overwrite")
        value = read_folder(ours)[tied]
        assert torch.allclose(value, want[tied], rtol=0, atol=1e-5 * want[tied].abs().max().item())


def assert_served_like(base: Path, adapter: Path, tuned: Path) -> None:
    """PEFT serving the adapter on BASE (unmerged) gives TUNED's logits."""
    from peft import PeftModel
    from peft_oracle import load_causal_lm

    ids = torch.arange(12).unsqueeze(0) % 60
    want = load_causal_lm(tuned)(ids).logits
    served = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))(ids).logits
    assert (served - want).abs().max().item() < 1e-4 * want.abs().max().item()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-llama")
    base = make_llama(root / "base", torch.float32)

    def edit(t, g):
        low_rank(t, g, RANKS)
        t["model.norm.weight"] = t["model.norm.weight"] + 0.1

    return base, tuned_copy(base, root / "tuned", edit)


@pytest.mark.parametrize("convention", ["--rslora", "--classic"])
def test_known_ranks_are_recovered_and_peft_merges_back_to_tuned(llama, tmp_path, convention):
    base, tuned = llama
    out = tmp_path / "adapter"
    report = json.loads(cli_run("extract", base, tuned, out, "--energy", "0.999", convention, "--json").stdout)
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    assert ranks == {
        f"model.layers.{i}.{part}.{module}": r
        for i in range(2)
        for module, r in RANKS.items()
        for part in (("self_attn",) if "proj" in module and module[0] in "qv" else ("mlp",))
    }
    assert report["modules_to_save"] == ["model.norm"] and report["biases"] == "none"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is (convention == "--rslora") and config["modules_to_save"] == ["model.norm"]
    assert len(set(config["rank_pattern"].values()) | {config["r"]}) == len(set(RANKS.values()))
    assert max(m["relative_error"] for m in report["modules"]) < 1e-5
    assert_merges_to(base, out, tuned)
    # rslora-tools' own merge of it gives TUNED too, and the adapter works with convert and inspect
    cli_run("merge", base, out, tmp_path / "merged")
    merged, want = read_folder(tmp_path / "merged"), read_folder(tuned)
    for key, value in want.items():
        assert torch.allclose(merged[key], value, rtol=0, atol=1e-5 * value.abs().max().item()), key
    cli_run("convert", out, tmp_path / "other", "--to-classic" if convention == "--rslora" else "--to-rslora")
    assert_merges_to(base, tmp_path / "other", tuned)
    assert json.loads(cli_run("inspect", out, "--json").stdout)["errors"] == 0


def test_a_full_rank_change_has_the_error_the_report_promises(tmp_path):
    base = make_llama(tmp_path / "base", torch.float32)

    def edit(t, g):
        for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"):
            t[key] = t[key] + torch.randn(t[key].shape, generator=g) * 0.02

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    before, after = read_folder(base), read_folder(tuned)
    for args in (("--rank", "4"), ("--max-error", "0.5"), ("--energy", "0.8")):
        out = tmp_path / "-".join(args)
        report = json.loads(cli_run("extract", base, tuned, out, *args, "--json").stdout)
        merged = peft_merged_state_dict(base, out)
        for m in report["modules"]:
            key = m["name"] + ".weight"
            delta = after[key].double() - before[key].double()
            measured = ((merged[key].double() - after[key].double()).norm() / delta.norm()).item()
            assert abs(measured - m["relative_error"]) < 1e-4, (args, m, measured)
            if args[0] == "--max-error":
                assert m["relative_error"] <= 0.5
            if args[0] == "--energy":
                assert m["energy"] >= 0.8 - 1e-6
            if args[0] == "--rank":
                assert m["rank"] == 4 and 0.3 < m["relative_error"] < 1.0  # a full-rank change loses much at rank 4


def qwen2(path: Path) -> Path:
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
    )
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize("with_o_proj", [False, True], ids=["qkv-only:lora_bias", "with-o_proj:lora_only"])
def test_bias_changes_are_carried_never_dropped(tmp_path, with_o_proj):
    """Qwen2 has q/k/v biases, no o_proj/MLP biases. Changing only q/k/v: lora_bias (every LoRA module has a bias);
    changing o_proj too: PEFT refuses lora_bias on it, so bias="lora_only" with the tuned bias vectors."""
    base = qwen2(tmp_path / "base")
    modules = {"q_proj": 2, "k_proj": 2, "v_proj": 3, **({"o_proj": 2} if with_o_proj else {})}

    def edit(t, g):
        low_rank(t, g, modules)
        for key in list(t):
            if key.endswith(("q_proj.bias", "v_proj.bias")):
                t[key] = t[key] + torch.randn(t[key].shape, generator=g) * 0.3

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    out = tmp_path / "adapter"
    report = json.loads(cli_run("extract", base, tuned, out, "--energy", "0.999", "--json").stdout)
    assert report["biases"] == ("lora_only" if with_o_proj else "lora_bias")
    assert len(report["bias_modules"]) == 4  # q and v biases of both layers
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_bias"] is (not with_o_proj) and config["bias"] == ("lora_only" if with_o_proj else "none")
    assert_merges_to(base, out, tuned)


def test_gpt2_conv1d_and_embedding_lora(tmp_path):
    base = make_gpt2(tmp_path / "base", torch.float32)

    def edit(t, g):
        for key in list(t):
            if key.endswith(("attn.c_attn.weight", "mlp.c_fc.weight", "wte.weight")):
                rows, cols = t[key].shape
                t[key] = t[key] + (torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)) * 0.02

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    out = tmp_path / "adapter"
    report = json.loads(cli_run("extract", base, tuned, out, "--energy", "0.999", "--json").stdout)
    kinds = {m["name"]: m["kind"] for m in report["modules"]}
    assert kinds["transformer.wte"] == "embedding" and kinds["transformer.h.0.attn.c_attn"] == "conv1d"
    assert {m["rank"] for m in report["modules"]} == {2}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert "lm_head" in config["target_modules"]  # GPT-2's tied head gets the embedding's LoRA (PEFT ties only
    assert not config.get("ensure_weight_tying")  # modules named embed_tokens)
    assert_merges_to(base, out, tuned, tied="transformer.wte.weight")


def test_a_tied_embedding_is_served_through_the_tied_head_too(tmp_path):
    """A Llama with tied embeddings: the embedding LoRA alone would leave PEFT's lm_head without the delta (logits
    off by far more than rounding); ensure_weight_tying and the head's mirrored LoRA, as PEFT saves them, fix it."""
    base = make_llama(tmp_path / "base", torch.float32, tie=True)

    def edit(t, g):
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"] + 0.1 * (
            torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
        )
        low_rank(t, g, {"q_proj": 2})

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    out = tmp_path / "adapter"
    cli_run("extract", base, tuned, out, "--rank", "4")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["ensure_weight_tying"] is True and "lm_head" not in config["target_modules"]
    assert_merges_to(base, out, tuned, tied="model.embed_tokens.weight")


def test_a_fine_tune_of_norms_only_writes_no_adapter_peft_would_refuse(tmp_path):
    base = make_llama(tmp_path / "base", torch.float32)

    def edit(t, g):
        t["model.norm.weight"] = t["model.norm.weight"] * 1.5

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    result = cli_run("extract", base, tuned, tmp_path / "out", code=None)
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert "only in tensors LoRA cannot express (model.norm)" in result.output
    assert "PEFT refuses an adapter without LoRA modules" in result.output


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_tuned_model_with_nan_or_inf_gives_one_true_line(tmp_path, value):
    base = make_llama(tmp_path / "base", torch.float32)

    def edit(t, g):
        low_rank(t, g, {"q_proj": 2})
        t["model.layers.0.self_attn.q_proj.weight"][3, 5] = value

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    result = cli_run("extract", base, tuned, tmp_path / "out", code=None)
    line = result.output.strip()
    assert result.exit_code == 1 and line.count("\n") == 0 and "unexpected" not in line, line
    assert line == (
        "Error: model.layers.0.self_attn.q_proj.weight: TUNED's tensor holds 1 NaN or Inf value; a "
        "delta with NaN or Inf cannot be an adapter (a diverged fine-tune?), so nothing was written"
    )
    assert not (tmp_path / "out").exists()


def test_every_kind_of_change_is_in_the_adapter(tmp_path):
    """A bias change on a module whose weight did not change, and a changed norm: modules_to_save, listed."""
    base = qwen2(tmp_path / "base")

    def edit(t, g):
        t["model.layers.0.self_attn.k_proj.bias"] = t["model.layers.0.self_attn.k_proj.bias"] + 0.5
        t["model.layers.1.input_layernorm.weight"] = t["model.layers.1.input_layernorm.weight"] * 1.5
        low_rank(t, g, {"up_proj": 2})

    tuned = tuned_copy(base, tmp_path / "tuned", edit)
    out = tmp_path / "adapter"
    report = json.loads(cli_run("extract", base, tuned, out, "--json").stdout)
    assert report["modules_to_save"] == ["model.layers.0.self_attn.k_proj", "model.layers.1.input_layernorm"]
    text = cli_run("extract", base, tuned, tmp_path / "again").output
    assert "modules_to_save: model.layers.0.self_attn.k_proj" in text
    assert_merges_to(base, out, tuned)


def test_refusals_and_dry_run(llama, tmp_path):
    base, tuned = llama
    dry = json.loads(cli_run("extract", base, tuned, tmp_path / "d", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and len(dry["modules"]) > 0 and not (tmp_path / "d").exists()
    grown = make_llama(tmp_path / "grown", torch.float32, vocab_size=80)
    cases = [
        (("extract", base, grown, tmp_path / "o"), "BASE and"),
        (("extract", base, base, tmp_path / "o"), "identical"),
        (("extract", base, tuned, tmp_path / "o", "--rank", "4", "--energy", "0.9"), "choose one of"),
        (("extract", base, tuned, tmp_path / "o", "--energy", "1.5"), "--energy"),
    ]
    for args, expected in cases:
        result = cli_run(*args, code=None)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code != 0 and len(errors) == 1 and expected in errors[0], result.output
        assert not (tmp_path / "o").exists()
