"""convert: every output gives PEFT's per-module delta of the original adapter.

Config rewrites (--to-*) are checked with PEFT itself, bit for bit: the converted adapter,
loaded by PEFT, has the same scaling and merges to the same tensors. Baked forms are checked
to float32 rounding. Runtime targets are checked with the scale rule each runtime applies
(docs/runtimes.md), written out here independently of rslora_tools/runtimes.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig
from peft_oracle import load_causal_lm, make_adapter, make_gpt2, peft_merged_state_dict
from safetensors import safe_open

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]


def convert(adapter: Path, out: Path, *args: str) -> dict:
    return json.loads(cli_run("convert", adapter, out, "--json", *args).stdout)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def peft_layers(base: Path, adapter: Path) -> dict[str, tuple[float, torch.Tensor]]:
    """PEFT's own scaling and delta (get_delta_weight) for every LoRA layer of the loaded adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.scaling:
            with torch.no_grad():
                out[name.removeprefix("base_model.model.")] = (
                    module.scaling["default"],
                    module.get_delta_weight("default").float(),
                )
    return out


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, msg=None) -> None:
    """Equal up to float32 rounding of a rescaled product (a bf16 rounding would be ~100x larger)."""
    atol = 2e-5 * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-5, atol=atol, msg=msg)


def assert_same_peft_deltas(base: Path, original: Path, converted: Path, *, exact: bool) -> None:
    want, got = peft_layers(base, original), peft_layers(base, converted)
    assert want.keys() == got.keys()
    for name, (scale, delta) in want.items():
        if exact:
            assert got[name][0] == scale, name
            assert torch.equal(got[name][1], delta), name
        else:
            assert_close_fp32(got[name][1], delta, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_merge(base: Path, original: Path, converted: Path, *, exact: bool) -> None:
    want = peft_merged_state_dict(base, original)
    got = peft_merged_state_dict(base, converted)
    for k, v in want.items():
        if exact:
            assert torch.equal(got[k], v), k
        else:
            assert_close_fp32(got[k], v, msg=lambda m, k=k: f"{k}: {m}")


def patterned(use_rslora: bool, **extra) -> LoraConfig:
    return LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=use_rslora,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        rank_pattern={"o_proj": 4, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 8.5, "v_proj": 3},
        **extra,
    )


# --- --to-rslora / --to-classic: config-only rewrites, exact --------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_convention_rewrite_is_exact_and_keeps_weights(llama_fp32, tmp_path, use_rslora):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(use_rslora))
    to = "--to-classic" if use_rslora else "--to-rslora"
    report = convert(adapter, tmp_path / "c", to)
    assert report["action"] == "config"
    assert config(tmp_path / "c")["use_rslora"] is (not use_rslora)
    assert (tmp_path / "c/adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "c", exact=True)
    assert_same_merge(llama_fp32, adapter, tmp_path / "c", exact=True)


@pytest.mark.parametrize("start", [False, True])
def test_round_trip_gives_back_config_and_weights(llama_fp32, tmp_path, start):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(start))
    there = "--to-classic" if start else "--to-rslora"
    back = "--to-rslora" if start else "--to-classic"
    convert(adapter, tmp_path / "there", there)
    convert(tmp_path / "there", tmp_path / "back", back)
    assert config(tmp_path / "back") == config(adapter)
    assert (tmp_path / "back/adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    assert (tmp_path / "back/adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_overlapping_patterns_are_rewritten_to_full_names(llama_fp32, tmp_path):
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        rank_pattern={"proj": 4, "q_proj": 2},
        alpha_pattern={"^model.layers.0.self_attn.q_proj": 5, "q_proj": 7.5},
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    convert(adapter, tmp_path / "c", "--to-classic")
    new = config(tmp_path / "c")
    assert new["rank_pattern"].keys() == new["alpha_pattern"].keys()
    assert all(re.fullmatch(r"[\w.]+", k) for k in new["alpha_pattern"])
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "c", exact=True)


def legacy_scale(cfg: dict, name: str, version: str) -> float:
    """The scale older PEFT versions compute (docs/peft-rules.md, Patterns): 0.13 one combined lookup, 0.14
    `.*\\.key$`."""
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    def find(keys):
        return next((k for k in keys if re.match(rf".*\.{k}$", name)), name)

    if version == "0.13":
        key = find([*rank_pattern, *alpha_pattern])
        r, alpha = rank_pattern.get(key, cfg["r"]), alpha_pattern.get(key, cfg["lora_alpha"])
    else:
        r = rank_pattern.get(find(rank_pattern), cfg["r"])
        alpha = alpha_pattern.get(find(alpha_pattern), cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


@pytest.mark.parametrize("overlapping", [False, True])
def test_rewritten_patterns_mean_the_same_in_old_peft_versions(llama_fp32, tmp_path, overlapping):
    if overlapping:
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=ALL_LINEAR,
            init_lora_weights=False,
            rank_pattern={"proj": 4, "q_proj": 2},
            alpha_pattern={"layers.0.self_attn.q_proj": 5, "q_proj": 7.5},
        )
    else:
        cfg = patterned(True)
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    convert(adapter, tmp_path / "c", "--to-classic")
    new = config(tmp_path / "c")
    for name, (scale, _) in peft_layers(llama_fp32, adapter).items():
        for version in ("0.13", "0.14"):
            assert legacy_scale(new, name, version) == scale, (name, version)


def test_same_convention_is_a_noop_copy(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    (adapter / "tokenizer.json").write_text("{}")
    result = cli_run("convert", adapter, tmp_path / "c", "--to-rslora")
    assert "already rsLoRA" in result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (tmp_path / "c" / name).read_bytes() == (adapter / name).read_bytes()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_bake_folds_the_scale_change_into_lora_b(llama_fp32, tmp_path, use_rslora):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(use_rslora))
    report = convert(adapter, tmp_path / "c", "--to-classic" if use_rslora else "--to-rslora", "--bake")
    assert report["action"] == "bake" and report["weights_changed"]
    new, old = config(tmp_path / "c"), config(adapter)
    assert {k: v for k, v in new.items() if k != "use_rslora"} == {k: v for k, v in old.items() if k != "use_rslora"}
    with safe_open(tmp_path / "c/adapter_model.safetensors", "pt") as f:
        assert "rslora_tools.conversion" in f.metadata()
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "c", exact=False)
    assert_same_merge(llama_fp32, adapter, tmp_path / "c", exact=False)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dora_and_embedding_lora_convert_exactly(llama_fp32, tmp_path, use_dora):
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        use_dora=use_dora,
        init_lora_weights=False,
        target_modules=["embed_tokens", "q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    convert(adapter, tmp_path / "c", "--to-classic")
    assert_same_merge(llama_fp32, adapter, tmp_path / "c", exact=True)
    convert(adapter, tmp_path / "b", "--to-classic", "--bake")
    assert_same_merge(llama_fp32, adapter, tmp_path / "b", exact=False)


def test_fan_in_fan_out_gpt2_converts_exactly(tmp_path):
    base = make_gpt2(tmp_path / "gpt2", torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_proj"],
        rank_pattern={"c_proj": 2},
        init_lora_weights=False,
    )
    adapter = make_adapter(base, tmp_path / "a", cfg)
    convert(adapter, tmp_path / "c", "--to-classic")
    assert_same_merge(base, adapter, tmp_path / "c", exact=True)
    convert(adapter, tmp_path / "v", "--target", "vllm")
    assert_same_merge(base, adapter, tmp_path / "v", exact=False)


# --- --target RUNTIME --------------------------------------------------------------------------------


def served_scale(runtime: str, cfg: dict, name: str, b_shape: tuple[int, ...]) -> float:
    """The scale each runtime applies, per docs/runtimes.md (read from each release's source, or measured).

    vLLM >= 0.32 resolves the patterns per module as PEFT does; older vLLM, TGI and LoRAX use the
    global r and lora_alpha; vLLM <= 0.6.4 and SGLang also ignore use_rslora (vLLM 0.6.5-0.6.6
    refuse it); llama.cpp takes the rank from B's shape and one alpha.
    """
    rslora = cfg.get("use_rslora")
    if runtime == "vllm@0.6.5":
        assert not rslora, "vLLM 0.6.5 refuses rsLoRA adapters"
    if runtime == "vllm":
        r = next((v for k, v in cfg["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", name)), cfg["r"])
        alpha = next(
            (v for k, v in cfg["alpha_pattern"].items() if re.match(rf"(.*\.)?({k})$", name)), cfg["lora_alpha"]
        )
        return alpha / math.sqrt(r) if rslora else alpha / r
    alpha, r = cfg["lora_alpha"], cfg["r"]
    if runtime in ("vllm@0.31.0", "tgi", "lorax"):
        return alpha / math.sqrt(r) if rslora else alpha / r
    if runtime in ("sglang", "vllm@0.6.4", "vllm@0.6.5"):
        return alpha / r
    if runtime == "llama.cpp":
        return alpha / b_shape[1]
    raise AssertionError(runtime)


def served_deltas(folder: Path, runtime: str) -> dict[str, torch.Tensor]:
    cfg = config(folder)
    out = {}
    for key, b in tensors(folder).items():
        if key.endswith("lora_B.weight"):
            a = tensors(folder)[key.replace("lora_B", "lora_A")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            out[name] = (b.float() @ a.float()) * served_scale(runtime, cfg, name, tuple(b.shape))
    return out


@pytest.mark.parametrize(
    "runtime", ["vllm", "vllm@0.31.0", "vllm@0.6.5", "vllm@0.6.4", "tgi", "lorax", "sglang", "llama.cpp"]
)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_target_runtime_serves_peft_scales(llama_fp32, tmp_path, runtime, use_rslora):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(use_rslora), save_dtype=torch.bfloat16)
    report = convert(adapter, tmp_path / "t", "--target", runtime)
    assert report["action"] == "copy" if runtime == "vllm" else report["action"] in ("config", "unit")
    want = peft_layers(llama_fp32, adapter)
    got = served_deltas(tmp_path / "t", runtime)
    assert want.keys() == got.keys()
    for name, (_, delta) in want.items():
        assert_close_fp32(got[name], delta, msg=lambda m, name=name: f"{name}: {m}")
    # The converted adapter is still right for PEFT too.
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "t", exact=False)


def test_target_that_already_serves_right_is_a_noop(llama_fp32, tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    for runtime in ("peft", "vllm", "tgi"):
        report = convert(adapter, tmp_path / runtime, "--target", runtime)
        assert report["action"] == "copy", runtime
        assert (tmp_path / runtime / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()


def test_sglang_gets_a_lossless_config_rewrite_when_one_scale_fits(llama_fp32, tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN, init_lora_weights=False)
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    report = convert(adapter, tmp_path / "s", "--target", "sglang")
    assert report["action"] == "config" and not report["weights_changed"]
    assert config(tmp_path / "s")["use_rslora"] is False
    assert (tmp_path / "s/adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()
    for name, (_, delta) in peft_layers(llama_fp32, adapter).items():
        assert_close_fp32(served_deltas(tmp_path / "s", "sglang")[name], delta)
    report = convert(adapter, tmp_path / "v", "--target", "vllm@0.6.5")  # refuses rsLoRA: the same rewrite
    assert report["action"] == "config" and config(tmp_path / "v")["use_rslora"] is False


def test_unit_form(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True), save_dtype=torch.bfloat16)
    convert(adapter, tmp_path / "u", "--target", "unit")
    cfg = config(tmp_path / "u")
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert all(t.dtype == torch.float32 for t in tensors(tmp_path / "u").values())  # nothing rounded away
    for name, (scale, _) in peft_layers(llama_fp32, tmp_path / "u").items():
        assert scale == 1.0, name
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "u", exact=False)


@pytest.mark.parametrize(
    ("runtime", "cfg_kwargs", "says"),
    [
        ("vllm", {"use_dora": True}, "DoRA"),
        ("vllm", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("vllm", {"lora_bias": True}, "lora_bias"),
        ("vllm", {"bias": "all"}, "trained biases"),
        ("vllm@0.20.0", {"use_dora": True}, "DoRA"),
        ("tgi", {"target_modules": ["embed_tokens", "q_proj"]}, "embedding"),
        ("lorax", {"use_dora": True}, "DoRA"),
        ("llama.cpp", {"use_dora": True}, "DoRA"),
    ],
)
def test_runtime_that_cannot_serve_is_refused(llama_fp32, tmp_path, runtime, cfg_kwargs, says):
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": False, **cfg_kwargs}
    adapter = make_adapter(llama_fp32, tmp_path / "a", LoraConfig(**kwargs))
    result = cli_run("convert", adapter, tmp_path / "t", "--target", runtime, code=None)
    assert result.exit_code == 1
    assert says in result.output and "merge" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_other_files_travel_and_readme_gets_a_note(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    (adapter / "tokenizer_config.json").write_text('{"x": 1}')
    readme = (adapter / "README.md").read_text()
    convert(adapter, tmp_path / "c", "--to-classic")
    out = tmp_path / "c"
    assert (out / "tokenizer_config.json").read_text() == '{"x": 1}'
    note = (out / "README.md").read_text()
    assert note.startswith(readme.rstrip("\n")) and "Converted with rslora-tools" in note
    provenance = json.loads((out / "rslora_tools.json").read_text())
    assert provenance["operation"] == "convert" and provenance["convention"] == "classic"


def test_dry_run_writes_nothing(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    report = convert(adapter, tmp_path / "c", "--to-classic", "--dry-run")
    assert report["dry_run"] and "lora_alpha" in report["config_changes"]
    assert not (tmp_path / "c").exists()
    text = cli_run("convert", adapter, tmp_path / "c", "--target", "vllm", "--dry-run").output
    assert text.startswith("Would write") and not (tmp_path / "c").exists()


def test_convert_needs_exactly_one_mode(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    cli_run("convert", adapter, tmp_path / "c", code=2)
    cli_run("convert", adapter, tmp_path / "c", "--to-classic", "--target", "vllm", code=2)
    result = cli_run("convert", adapter, adapter / "inner", "--to-classic", code=None)
    assert result.exit_code == 1 and "input" in result.output


# --- GGUF for llama.cpp ------------------------------------------------------------------------------


def llama_cpp_deltas(path: Path) -> tuple[float, dict[str, torch.Tensor]]:
    """Read a GGUF LoRA back and compute each tensor's delta the way llama.cpp does: scale * (b @ a)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields["adapter.lora.alpha"]
    alpha = float(field.parts[field.data[0]][0])
    assert bytes(reader.fields["general.type"].parts[-1]).decode() == "adapter"
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        base, kind = t.name.rsplit(".", 1)
        pairs.setdefault(base, {})[kind] = torch.tensor(t.data.copy()).reshape([int(x) for x in reversed(t.shape)])
    out = {}
    for base, p in pairs.items():
        rank = p["lora_b"].shape[1]  # llama.cpp: b->ne[0]
        scale = alpha / rank if alpha else 1.0
        if base == "token_embd.weight":  # get_rows(a, tokens) then b: the [vocab, dim] delta is a @ b^T
            out[base] = (p["lora_a"] @ p["lora_b"].T) * scale
        else:
            out[base] = (p["lora_b"] @ p["lora_a"]) * scale
    return alpha, out


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute on the rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(module: str) -> str:
    if module == "model.embed_tokens":
        return "token_embd.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"


@pytest.mark.parametrize("patterns", [False, True])
def test_gguf_lora_reproduces_peft_deltas(llama_fp32, tmp_path, patterns):
    kwargs = dict(rank_pattern={"o_proj": 4}, alpha_pattern={"down_proj": 8.5}) if patterns else {}
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        init_lora_weights=False,
        target_modules=["embed_tokens", *ALL_LINEAR],
        **kwargs,
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg, save_dtype=torch.bfloat16)
    report = convert(adapter, tmp_path / "lora.gguf", "--target", "llama.cpp", "--base", llama_fp32)
    assert report["action"] == "gguf"
    alpha, got = llama_cpp_deltas(tmp_path / "lora.gguf")
    assert (alpha == 0) == patterns  # one alpha fits when every module has the same rank and scale
    heads, kv_heads = 4, 2
    want = peft_layers(llama_fp32, adapter)
    assert {gguf_name(n) for n in want} == set(got)
    for name, (_, delta) in want.items():
        g = got[gguf_name(name)]
        if name.endswith("q_proj"):
            g = unpermute(g, heads)
        elif name.endswith("k_proj"):
            g = unpermute(g, kv_heads)
        assert g.shape == delta.shape, (
            name
        )  # the embedding's delta is laid over the [vocab, dim] table, never transposed
        assert_close_fp32(g, delta, msg=lambda m, name=name: f"{name}: {m}")


def test_gguf_needs_base_and_refuses_what_it_cannot_hold(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    result = cli_run("convert", adapter, tmp_path / "x.gguf", "--target", "llama.cpp", code=None)
    assert result.exit_code == 2 and "--base" in result.output  # a missing flag: a usage error
    bias = make_adapter(
        llama_fp32,
        tmp_path / "b",
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False),
    )
    result = cli_run("convert", bias, tmp_path / "y.gguf", "--target", "llama.cpp", "--base", llama_fp32, code=None)
    assert result.exit_code == 1 and "lora_bias" in result.output and not (tmp_path / "y.gguf").exists()


def test_target_peft_makes_order_dependent_patterns_version_stable(llama_fp32, tmp_path):
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=ALL_LINEAR,
        init_lora_weights=False,
        alpha_pattern={"^model.layers.0.self_attn.q_proj": 5, "q_proj": 7.5},
    )
    adapter = make_adapter(llama_fp32, tmp_path / "a", cfg)
    report = convert(adapter, tmp_path / "p", "--target", "peft")
    assert report["action"] == "config" and config(tmp_path / "p")["use_rslora"] is True
    new = config(tmp_path / "p")
    for name, (scale, _) in peft_layers(llama_fp32, adapter).items():
        for version in ("0.13", "0.14"):
            assert legacy_scale(new, name, version) == scale, (name, version)
    assert_same_peft_deltas(llama_fp32, adapter, tmp_path / "p", exact=True)


def test_gguf_output_may_not_land_in_an_input(llama_fp32, tmp_path):
    adapter = make_adapter(llama_fp32, tmp_path / "a", patterned(True))
    result = cli_run(
        "convert", adapter, adapter / "lora.gguf", "--target", "llama.cpp", "--base", llama_fp32, code=None
    )
    assert result.exit_code == 1 and "may not be an input or inside one" in result.output
    assert not (adapter / "lora.gguf").exists()
    cli_run("convert", adapter, tmp_path / "x.gguf", "--target", "llama.cpp", "--base", llama_fp32)
    result = cli_run("convert", adapter, tmp_path / "x.gguf", "--target", "llama.cpp", "--base", llama_fp32, code=None)
    assert "--overwrite" in result.output


def test_multihead_attention_adapter_converts_exactly(tmp_path):
    from peft_oracle import TwoAttentions

    torch.manual_seed(0)
    net = TwoAttentions()
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["mha", "other"],
        init_lora_weights=False,
        rank_pattern={"other": 2},
        alpha_pattern={"other": 3},
    )
    adapter = make_adapter(net, tmp_path / "a", cfg)
    convert(adapter, tmp_path / "c", "--to-classic")
    want, got = peft_merged_state_dict(net, adapter), peft_merged_state_dict(net, tmp_path / "c")
    assert all(torch.equal(got[k], v) for k, v in want.items())
    report = json.loads(cli_run("inspect", adapter, "--json").stdout)
    rows = {m["name"]: (m["kind"], m["pattern_name"], m["rank"], m["scale"]) for m in report["modules"]}
    assert rows["other"] == ("module", "other", 2, 3 / math.sqrt(2))
    assert rows["other.out_proj"] == ("mha out_proj", "other", 2, 3 / math.sqrt(2))  # the MHA's rank and alpha
    assert rows["mha.out_proj"] == ("mha out_proj", "mha", 4, 8 / 2)
