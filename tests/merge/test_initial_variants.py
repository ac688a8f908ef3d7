"""PiSSA, OLoRA, CorDA, LoRA-GA and EVA adapters, built by PEFT on a tiny model and "trained" (A and B perturbed).

The first four start from a residual base W_res = W - s * B0 @ A0. PEFT's model after training is
W_res + s * B @ A; that is the oracle: PEFT loads the trained adapter onto the residual base it
built and merges it (with init_lora_weights=True, so that loading does not subtract again).

- `merge BASE ADAPTER OUT --initial INIT` merges s * (B @ A - B0 @ A0) into the original W in one
  rounding; the oracle rounds W - s*B0@A0 first. Per element the two agree within
      |ours - PEFT| <= (3r + 6) * u * (|W| + |s| * (|B| @ |A| + |B0| @ |A0|)),   u = 2**-24,
  the float32 error bound of the two matrix products (r terms each, 2r in ours) and the three
  roundings (residual, merge, ours), checked here element by element (BOUND).
- `merge RESIDUAL ADAPTER OUT --base-is-residual` is PEFT's merge, bit for bit.
- `convert ADAPTER OUT --initial INIT` merges (by PEFT) to exactly what PEFT's own conversion
  (save_pretrained(path_initial_model_for_weight_conversion=...)) merges to, where that
  conversion keeps the scale; for rsLoRA with patterns, where PEFT refuses, it merges exactly
  as `merge --initial` does.
- EVA is plain LoRA once initialised (B0 = 0) with a data-driven rank_pattern: it merges and
  converts exactly like any adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig
from peft_oracle import (
    assert_same_tensors,
    load_causal_lm,
    make_init_variant,
    make_llama,
    peft_merged_state_dict,
    perturb_trainable,
    read_folder,
    unique_tensors,
)
from safetensors import safe_open

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
U = 2.0**-24  # float32 unit roundoff

# name -> (init_lora_weights, use_rslora, rank_pattern, alpha_pattern)
VARIANTS = {
    "pissa": ("pissa", True, {}, {}),
    "pissa_niter": ("pissa_niter_4", True, {"up_proj": 4}, {"down_proj": 8}),
    "olora": ("olora", False, {}, {}),
    "olora_rslora_patterns": ("olora", True, {"q_proj": 4}, {"v_proj": 12}),
    "corda": ("corda", True, {}, {}),
    "lora_ga": ("lora_ga", False, {"up_proj": 4}, {"down_proj": 8}),
    # rsLoRA, r=1 and alpha 7 on up_proj: no alpha gives 7/sqrt(1) at rank 2, so the scales are folded (unit form)
    "pissa_unit": ("pissa", True, {"up_proj": 1}, {"up_proj": 7}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("iv-base"), torch.float32)


@pytest.fixture(scope="module")
def variants(base, tmp_path_factory):
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            init, use_rslora, rank_pattern, alpha_pattern = VARIANTS[name]
            built[name] = make_init_variant(
                base,
                tmp_path_factory.mktemp(name),
                LoraConfig(
                    r=8,
                    lora_alpha=16,
                    use_rslora=use_rslora,
                    target_modules=TARGETS,
                    init_lora_weights=init,
                    rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern,
                ),
            )
        return built[name]

    return get


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def residual_route(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT's model after training: the trained adapter merged into the residual base; and each layer's scale."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    config = LoraConfig.from_pretrained(folder / "trained")
    config.init_lora_weights = True  # the residual base is already residual: loading must not subtract again
    model = PeftModel.from_pretrained(load_causal_lm(folder / "residual"), str(folder / "trained"), config=config)
    scales = {
        name.removeprefix("base_model.model.") + ".weight": m.scaling["default"]
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer) and "default" in m.scaling
    }
    return unique_tensors(model.merge_and_unload().state_dict()), scales


def bound(folder: Path, original: dict[str, torch.Tensor], key: str, scale: float) -> torch.Tensor:
    """BOUND of the module docstring for one weight, in float64."""
    module = "base_model.model." + key.removesuffix(".weight")
    trained, init = adapter_tensors(folder / "trained"), adapter_tensors(folder / "init")
    a, b = trained[module + ".lora_A.weight"].double(), trained[module + ".lora_B.weight"].double()
    a0, b0 = init[module + ".lora_A.weight"].double(), init[module + ".lora_B.weight"].double()
    r = a.shape[0]
    magnitude = original[key].double().abs() + abs(scale) * (b.abs() @ a.abs() + b0.abs() @ a0.abs())
    return (3 * r + 6) * U * magnitude


def assert_within_bound(folder: Path, merged: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    expected, scales = residual_route(folder)
    assert set(merged) == set(expected)
    differing = 0
    for key, want in expected.items():
        got = merged[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if key not in scales:  # not a LoRA target: the original tensor, untouched by either route
            assert torch.equal(got, original[key]) and torch.equal(want, original[key]), key
            continue
        diff = (got.double() - want.double()).abs()
        limit = bound(folder, original, key, scales[key])
        assert bool((diff <= limit).all()), f"{key}: {diff.max().item()} exceeds the float32 bound"
        differing += int((diff > 0).sum())
    assert differing > 0  # the two routes round differently: this checks the bound, not an accident of equality


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merge_with_initial_equals_peft_on_the_residual_base_within_float32_rounding(name, base, variants, tmp_path):
    folder = variants(name)
    init = json.loads((folder / "init" / "adapter_config.json").read_text())["init_lora_weights"]
    assert init == VARIANTS[name][0]  # PEFT saved the variant: it really built it
    out = tmp_path / "merged"
    report = json.loads(cli_run("merge", base, folder / "trained", out, "--initial", folder / "init", "--json").stdout)
    assert any("relative to the original base" in note for note in report["notes"])
    assert_within_bound(folder, read_folder(out), read_folder(base))
    provenance = json.loads((out / "rslora_tools.json").read_text())
    assert "initial" in provenance
    checked = json.loads(
        cli_run("verify", out, base, folder / "trained", "--initial", folder / "init", "--json").stdout
    )
    assert checked["verdict"] == "exact", checked["problems"]


@pytest.mark.parametrize("name", ["pissa", "olora", "lora_ga", "pissa_niter"])
def test_base_is_residual_merges_exactly_like_peft(name, variants, tmp_path):
    folder = variants(name)
    out = tmp_path / "merged"
    cli_run("merge", folder / "residual", folder / "trained", out, "--base-is-residual")
    expected, _ = residual_route(folder)
    assert_same_tensors(read_folder(out), expected)
    assert json.loads((out / "rslora_tools.json").read_text())["base_is_residual"] is True


def peft_conversion(folder: Path, tmp_path: Path) -> Path:
    """PEFT's own conversion, on copies (it rewrites the INIT folder's config)."""
    from peft import PeftModel

    work = tmp_path / "peft-conversion"
    shutil.copytree(folder / "init", work / "init")
    config = LoraConfig.from_pretrained(folder / "trained")
    config.init_lora_weights = True
    model = PeftModel.from_pretrained(load_causal_lm(folder / "residual"), str(folder / "trained"), config=config)
    model.save_pretrained(work / "converted", path_initial_model_for_weight_conversion=str(work / "init"))
    return work / "converted"


@pytest.mark.parametrize("name", ["olora", "lora_ga", "pissa", "corda"])
def test_convert_initial_merges_like_peft_own_conversion(name, base, variants, tmp_path):
    folder = variants(name)
    ours = tmp_path / "ours"
    report = json.loads(cli_run("convert", folder / "trained", ours, "--initial", folder / "init", "--json").stdout)
    assert report["action"] == "initial"
    config = json.loads((ours / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 16
    theirs = peft_conversion(folder, tmp_path)
    their_config = json.loads((theirs / "adapter_config.json").read_text())
    merged_ours = peft_merged_state_dict(base, ours)
    merged_theirs = peft_merged_state_dict(base, theirs)
    if not their_config["use_rslora"]:
        # classic: 2*alpha / 2r is alpha / r exactly, so PEFT's conversion is exact and ours equals it bit for bit
        assert_same_tensors(merged_ours, merged_theirs)
    else:
        # rsLoRA: PEFT writes alpha*sqrt(2), whose scale at rank 2r is not alpha/sqrt(r) exactly for every alpha;
        # ours keeps it exactly; the merges agree to float32 rounding of that scale
        for key, want in merged_theirs.items():
            assert torch.allclose(merged_ours[key], want, rtol=0, atol=4e-6 * max(1.0, want.abs().max().item())), key
    # and it is what merge --initial writes, bit for bit
    direct = tmp_path / "direct"
    cli_run("merge", base, folder / "trained", direct, "--initial", folder / "init")
    assert_same_tensors(merged_ours, read_folder(direct))


def test_peft_conversion_rsLoRA_alpha_is_inexact_where_ours_is_exact(variants, tmp_path):
    """A documented comparison, not an oracle: PEFT's alpha*sqrt(2) at rank 2r misses alpha/sqrt(r) for r=8,
    alpha=16."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    folder = variants("pissa")
    ours = tmp_path / "ours"
    cli_run("convert", folder / "trained", ours, "--initial", folder / "init")
    theirs = peft_conversion(folder, tmp_path)
    exact = 16 / math.sqrt(8)

    def scales(adapter: Path) -> set[float]:
        model = PeftModel.from_pretrained(load_causal_lm(folder / "residual"), str(adapter))
        return {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.scaling}

    assert scales(ours) == {exact}
    assert scales(theirs) == {16 * 2**0.5 / math.sqrt(16)} != {exact}


def test_convert_initial_rslora_with_patterns_where_peft_refuses(base, variants, tmp_path):
    folder = variants("pissa_niter")
    with pytest.raises(ValueError, match="rank_pattern"):
        peft_conversion(folder, tmp_path)
    assert not (tmp_path / "peft-conversion" / "converted" / "adapter_model.safetensors").exists()
    ours = tmp_path / "ours"
    cli_run("convert", folder / "trained", ours, "--initial", folder / "init")
    config = json.loads((ours / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 16 and config["rank_pattern"] == {"up_proj": 8}
    direct = tmp_path / "direct"
    cli_run("merge", base, folder / "trained", direct, "--initial", folder / "init")
    assert_same_tensors(peft_merged_state_dict(base, ours), read_folder(direct))


def test_unit_form_when_no_alpha_keeps_a_scale(base, variants, tmp_path):
    folder = variants("pissa_unit")
    ours = tmp_path / "ours"
    result = cli_run("convert", folder / "trained", ours, "--initial", folder / "init")
    assert "unit-scale form" in result.output
    config = json.loads((ours / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    direct = tmp_path / "direct"
    cli_run("merge", base, folder / "trained", direct, "--initial", folder / "init")
    merged, want = peft_merged_state_dict(base, ours), read_folder(direct)
    for key, value in want.items():  # folded scales round once more than PEFT's scale multiply: float32 rounding
        assert torch.allclose(merged[key], value, rtol=0, atol=4e-6 * max(1.0, value.abs().max().item())), key


def test_convert_initial_with_a_runtime_target(base, variants, tmp_path):
    folder = variants("pissa_niter")
    out = tmp_path / "vllm"
    report = json.loads(
        cli_run(
            "convert", folder / "trained", out, "--initial", folder / "init", "--target", "vllm@0.6.3", "--json"
        ).stdout
    )
    assert "relative to the original base" in report["message"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True
    assert not config.get("use_rslora")
    # vLLM 0.6.3 applies the global lora_alpha / r to every module (docs/runtimes.md); under that rule the written
    # adapter is the delta merge --initial merges
    direct = read_folder(_merged(base, folder, tmp_path))
    original = read_folder(base)
    weights = adapter_tensors(out)
    scale = config["lora_alpha"] / config["r"]
    for key, value in direct.items():
        module = "base_model.model." + key.removesuffix(".weight")
        if module + ".lora_A.weight" not in weights:
            continue
        delta = scale * (weights[module + ".lora_B.weight"].float() @ weights[module + ".lora_A.weight"].float())
        assert torch.allclose(original[key] + delta, value, rtol=0, atol=4e-6), key


def _merged(base: Path, folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "merged-initial"
    if not out.exists():
        cli_run("merge", base, folder / "trained", out, "--initial", folder / "init")
    return out


def test_without_initial_merge_and_convert_refuse_with_the_flag_named(base, variants, tmp_path):
    folder = variants("olora")
    for args in (
        ("merge", base, folder / "trained", tmp_path / "m"),
        ("convert", folder / "trained", tmp_path / "c", "--to-rslora"),
    ):
        result = cli_run(*args, code=None)
        assert result.exit_code != 0
        lines = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(lines) == 1 and "--initial INIT" in lines[0] and "--base-is-residual" in lines[0], result.output
        assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()


def test_inspect_shows_the_variant_and_what_a_merge_needs(variants):
    folder = variants("corda")
    text = cli_run("inspect", folder / "trained").output
    assert "CorDA" in text and "--initial" in text
    data = json.loads(cli_run("inspect", folder / "trained", "--json").stdout)
    assert data["init_variant"] == "CorDA" and data["merge_needs_initial"] is True


def test_initial_mismatches_are_one_line_errors(base, variants, tmp_path):
    folder, other = variants("pissa"), variants("olora")
    cases = [
        (folder / "init", "trained"),  # the right INIT: accepted (control)
        (other / "init", "OLoRA"),  # another variant
        (variants("pissa_unit") / "init", "rank_pattern"),  # other ranks
    ]
    for init, expected in cases:
        result = cli_run(
            "merge", base, folder / "trained", tmp_path / "out", "--initial", init, "--dry-run", code=None
        )
        if expected == "trained":
            assert result.exit_code == 0, result.output
            continue
        assert result.exit_code != 0
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and expected in errors[0], result.output
    # --initial on plain LoRA, and both flags at once
    plain = tmp_path / "plain"
    from peft_oracle import make_adapter

    make_adapter(base, plain, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    result = cli_run("merge", base, plain, tmp_path / "out", "--initial", folder / "init", code=None)
    assert result.exit_code != 0 and "it is plain LoRA" in result.output
    result = cli_run(
        "merge",
        base,
        folder / "trained",
        tmp_path / "out",
        "--initial",
        folder / "init",
        "--base-is-residual",
        code=None,
    )
    assert result.exit_code != 0 and "exclude each other" in result.output


def test_init_folder_rewritten_by_peft_conversion_is_still_accepted(base, variants, tmp_path):
    """PEFT's conversion rewrites INIT's config to init_lora_weights=true; that INIT is still this adapter's start."""
    folder = variants("olora")
    peft_conversion(folder, tmp_path)
    init = tmp_path / "peft-conversion" / "init"
    assert json.loads((init / "adapter_config.json").read_text())["init_lora_weights"] is True
    cli_run("merge", base, folder / "trained", tmp_path / "out", "--initial", init)
    assert_same_tensors(read_folder(tmp_path / "out"), read_folder(_merged(base, folder, tmp_path)))


def test_loftq_stays_refused(base, variants, tmp_path):
    folder = variants("pissa")
    loftq = tmp_path / "loftq"
    shutil.copytree(folder / "trained", loftq)
    config = json.loads((loftq / "adapter_config.json").read_text())
    (loftq / "adapter_config.json").write_text(json.dumps(dict(config, init_lora_weights="loftq")))
    result = cli_run("merge", base, loftq, tmp_path / "out", code=None)
    assert result.exit_code != 0 and "LoftQ" in result.output and "--base-is-residual" in result.output


# ---- EVA: plain LoRA once trained, with a data-driven rank_pattern ----


def build_eva(base: Path, folder: Path, use_rslora: bool) -> Path:
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

    model = load_causal_lm(base)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=use_rslora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        init_lora_weights="eva",
        eva_config=EvaConfig(rho=2.0, tau=0.99),
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    initialize_lora_eva_weights(peft_model, dataloader=batches)
    perturb_trainable(peft_model, seed=4, std=0.02)
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("use_rslora", [False, True], ids=["classic", "rslora"])
def test_eva_adapters_merge_and_convert_exactly(use_rslora, base, tmp_path):
    eva = build_eva(base, tmp_path / "eva", use_rslora)
    config = json.loads((eva / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    ranks = set(config["rank_pattern"].values())
    assert len(ranks) > 1, config["rank_pattern"]  # EVA redistributed the ranks: the patterns are what is tested
    out = tmp_path / "merged"
    cli_run("merge", base, eva, out)
    assert_same_tensors(read_folder(out), peft_merged_state_dict(base, eva))
    assert "--initial" not in cli_run("inspect", eva).output
    for to in ("--to-rslora", "--to-classic"):
        converted = tmp_path / to.strip("-")
        cli_run("convert", eva, converted, to)
        assert_same_tensors(peft_merged_state_dict(base, converted), peft_merged_state_dict(base, eva))


def test_init_target_modules_in_another_order_is_the_same_init(base, variants, tmp_path):
    """PEFT saves target_modules from a set: its order changes between processes, its content does not."""
    folder = variants("pissa")
    init = tmp_path / "init"
    shutil.copytree(folder / "init", init)
    config = json.loads((init / "adapter_config.json").read_text())
    config["target_modules"] = list(reversed(config["target_modules"]))
    (init / "adapter_config.json").write_text(json.dumps(config))
    cli_run("merge", base, folder / "trained", tmp_path / "out", "--initial", init)
    assert_same_tensors(read_folder(tmp_path / "out"), read_folder(_merged(base, folder, tmp_path)))


def test_pissa_with_dora_merges_with_initial(base, tmp_path):
    """DoRA on a PiSSA adapter: the magnitude divides by the norm of W_res + s*B@A = W + s*(B'@A'), so the routes
    agree to float32 rounding passed through m/||W'||: within 16 ulps of the weight's largest entry (measured: 2)."""
    folder = make_init_variant(
        base,
        tmp_path / "dora",
        LoraConfig(
            r=8, lora_alpha=16, use_rslora=True, use_dora=True, target_modules=TARGETS, init_lora_weights="pissa"
        ),
    )
    out = tmp_path / "merged"
    cli_run("merge", base, folder / "trained", out, "--initial", folder / "init")
    expected, scales = residual_route(folder)
    merged = read_folder(out)
    for key in scales:
        limit = 16 * 2.0**-23 * expected[key].abs().max().item()
        assert (merged[key].double() - expected[key].double()).abs().max().item() <= limit, key
    assert_same_tensors(merged, expected, skip=set(scales))
