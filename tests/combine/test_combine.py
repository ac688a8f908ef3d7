"""combine: one adapter out of several, checked with PEFT.

The reference for cat and svd is the exact weighted sum of the deltas PEFT computes for each input
(`get_delta_weight`, scale included), in float64. PEFT's own add_weighted_adapter is shown to be
off by sqrt(new_rank) on rsLoRA inputs (a documented comparison, not the oracle); on classic-only
inputs it is the oracle for every method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig, PeftModel
from peft_oracle import load_causal_lm, make_adapter, make_llama

INPUTS = {
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "rslora-patterns": dict(
        r=16,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "up_proj"],
        rank_pattern={"up_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 40},
    ),
    "classic": dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
    "classic-b": dict(r=8, lora_alpha=24, target_modules=["q_proj", "down_proj", "v_proj"]),
}
U32 = 2.0**-24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    base = make_llama(root / "base")
    adapters = {
        name: make_adapter(base, root / name, LoraConfig(init_lora_weights=False, **kwargs), seed=i + 1)
        for i, (name, kwargs) in enumerate(INPUTS.items())
    }
    return base, adapters


def peft_deltas(base: Path, adapter: Path, name: str = "default", model=None) -> dict[str, torch.Tensor]:
    """Each LoRA layer's delta as PEFT computes it (scale included), in float64, by module name."""
    from peft.tuners.lora import LoraLayer

    if model is None:
        model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter), adapter_name=name)
    return {
        n.removeprefix("base_model.model."): m.get_delta_weight(name).detach().double()
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and name in m.scaling
    }


def weighted_sum(base: Path, adapters: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for adapter, w in zip(adapters, weights):
        for k, d in peft_deltas(base, adapter).items():
            total[k] = total.get(k, 0) + w * d
    return total


def peft_scales(base: Path, adapter: Path) -> set[float]:
    from peft.tuners.lora import LoraLayer

    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))
    return {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.scaling}


MIX = ["rslora", "rslora-patterns", "classic"]


def test_cat_is_the_exact_weighted_sum_of_peft_deltas(setup, tmp_path):
    """Mixed conventions, ranks, patterns and target modules; the bound per element is float32 rounding of the
    factors and of PEFT's own product: 4 * K * u * sum_i |w_i s_i| |B_i| |A_i| (K = the summed rank)."""
    base, adapters = setup
    paths, weights = [adapters[n] for n in MIX], [0.7, 0.4, -1.3]
    out = tmp_path / "cat"
    report = json.loads(cli_run("combine", *paths, out, "--weights", "0.7,0.4,-1.3", "--json").stdout)
    assert report["method"] == "cat" and report["convention"] == "classic"
    expected = weighted_sum(base, paths, weights)
    got = peft_deltas(base, out)
    assert set(got) == set(expected)
    assert peft_scales(base, out) == {1.0}  # every module at scale 1: the factors carry the scales
    for key, want in expected.items():
        k = sum(m["rank"] for m in report["modules"] if m["name"] == key)
        magnitude = sum(
            abs(w) * d.abs()
            for w, d in ((w, peft_deltas_abs(base, p).get(key)) for w, p in zip(weights, paths))
            if d is not None
        )
        assert bool(((got[key] - want).abs() <= 4 * k * U32 * magnitude + 1e-30).all()), key


_ABS_CACHE: dict[Path, dict[str, torch.Tensor]] = {}


def peft_deltas_abs(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """|s| * |B| @ |A| per module (embedding: transposed, as its delta), in float64: the magnitude of a delta's
    terms."""
    if adapter not in _ABS_CACHE:
        from peft.tuners.lora import LoraLayer

        model = PeftModel.from_pretrained(load_causal_lm(base), str(adapter))
        out = {}
        for n, m in model.named_modules():
            if isinstance(m, LoraLayer) and "default" in m.scaling:
                if "default" in m.lora_A:
                    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                    out[n.removeprefix("base_model.model.")] = abs(m.scaling["default"]) * (
                        b.abs().double() @ a.abs().double()
                    )
                else:
                    a, b = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
                    out[n.removeprefix("base_model.model.")] = (
                        abs(m.scaling["default"]) * (b.abs().double() @ a.abs().double())
                    ).T
        _ABS_CACHE[adapter] = out
    return _ABS_CACHE[adapter]


def test_peft_add_weighted_adapter_is_off_by_sqrt_new_rank_on_rslora_inputs(setup):
    """The comparison the issue measured: rsLoRA r=8 + r=16, weights 0.7/0.4: PEFT's cat result is sqrt(24) times
    the weighted sum on q_proj (its config copies use_rslora with lora_alpha = r = 24); ours is the sum."""
    base, adapters = setup
    a, b = adapters["rslora"], adapters["rslora-patterns"]
    model = PeftModel.from_pretrained(load_causal_lm(base), str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "cat", combination_type="cat")
    theirs = peft_deltas(base, a, "cat", model=model)
    key = "model.layers.0.self_attn.q_proj"
    want = weighted_sum(base, [a, b], [0.7, 0.4])[key]
    ratio = (theirs[key].norm() / want.norm()).item()
    assert math.isclose(ratio, math.sqrt(24), rel_tol=1e-5), ratio


def test_svd_is_at_least_as_accurate_as_peft_svd_and_reports_its_error(setup, tmp_path):
    base, adapters = setup
    a, b = adapters["rslora"], adapters["rslora-patterns"]
    out = tmp_path / "svd"
    report = json.loads(
        cli_run("combine", a, b, out, "--weights", "0.7,0.4", "--method", "svd", "--rank", "8", "--json").stdout
    )
    expected = weighted_sum(base, [a, b], [0.7, 0.4])
    ours = peft_deltas(base, out)
    # PEFT's svd on the same inputs, with the rsLoRA fix applied: its factors at scale 1
    model = PeftModel.from_pretrained(load_causal_lm(base), str(a), adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.4], "svd", combination_type="svd", svd_rank=8)
    theirs = {k: d / _scaling(model, k, "svd") for k, d in peft_deltas(base, a, "svd", model=model).items()}
    reported = {m["name"]: m for m in report["modules"]}
    truncated = 0
    for key, want in expected.items():
        mine = ((ours[key] - want).norm() / want.norm()).item()
        peft = ((theirs[key] - want).norm() / want.norm()).item()
        assert mine <= peft * (1 + 1e-4) + 1e-6, (key, mine, peft)
        assert math.isclose(reported[key]["relative_error"], mine, rel_tol=1e-3, abs_tol=1e-6), key
        assert math.isclose(reported[key]["energy"], 1 - mine**2, rel_tol=1e-4, abs_tol=1e-6), key
        truncated += mine > 1e-3
    assert truncated > 0  # q_proj (rank 8 + 16 > 8) really is truncated


def _scaling(model, key: str, name: str) -> float:
    return dict(model.named_modules())["base_model.model." + key].scaling[name]


CLASSIC = ["classic", "classic-b"]


@pytest.mark.parametrize("method", ["cat", "linear", "ties", "magnitude_prune", "svd", "dare_linear", "dare_ties"])
def test_classic_inputs_give_peft_results(setup, tmp_path, method):
    """On classic inputs PEFT's add_weighted_adapter is right; ours gives the same deltas (dare_*: with density 1, the
    masks keep everything; their randomness is checked below)."""
    base, adapters = setup
    paths = [adapters[n] for n in CLASSIC]
    extra = {
        "ties": ["--density", "0.5"],
        "magnitude_prune": ["--density", "0.5"],
        "svd": ["--rank", "8"],
        "dare_linear": ["--density", "1"],
        "dare_ties": ["--density", "1"],
    }.get(method, [])
    out = tmp_path / method
    cli_run("combine", *paths, out, "--weights", "0.6,1.5", "--method", method, *extra)
    model = PeftModel.from_pretrained(load_causal_lm(base), str(paths[0]), adapter_name="a")
    model.load_adapter(str(paths[1]), adapter_name="b")
    kwargs = {"density": float(extra[1])} if "--density" in extra else {}
    if method == "svd":
        kwargs["svd_rank"] = 8
    model.add_weighted_adapter(["a", "b"], [0.6, 1.5], "c", combination_type=method, **kwargs)
    theirs, ours = peft_deltas(base, paths[0], "c", model=model), peft_deltas(base, out)
    assert set(theirs) == set(ours)
    for key in theirs:
        if method == "svd":  # the same best approximation, computed two ways
            assert torch.allclose(ours[key], theirs[key], rtol=0, atol=1e-5 * theirs[key].abs().max().item()), key
        else:
            assert torch.equal(ours[key], theirs[key]), key


def test_dare_is_reproducible_per_seed_and_keeps_the_expected_fraction(setup, tmp_path):
    base, adapters = setup
    paths = [adapters[n] for n in CLASSIC]
    outs = {}
    for name, seed in (("s1", "1"), ("s1-again", "1"), ("s2", "2")):
        outs[name] = tmp_path / name
        cli_run("combine", *paths, outs[name], "--method", "dare_linear", "--density", "0.5", "--seed", seed)
    one, again, two = (peft_deltas(base, outs[n]) for n in ("s1", "s1-again", "s2"))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], two[k]) for k in one)
    # one input: each value kept with probability 0.5, and a kept value is sqrt(s) * value / 0.5 (PEFT's DARE)
    from safetensors.torch import load_file

    single = tmp_path / "single"
    cli_run("combine", paths[0], single, "--method", "dare_linear", "--density", "0.5", "--seed", "3")
    factors, original = (load_file(str(p / "adapter_model.safetensors")) for p in (single, paths[0]))
    root_scale = math.sqrt(INPUTS["classic"]["lora_alpha"] / INPUTS["classic"]["r"])
    kept = total = 0
    for key, value in factors.items():
        mask = value != 0
        kept, total = kept + int(mask.sum()), total + value.numel()
        assert torch.allclose(value[mask], (original[key].float() / 0.5 * root_scale)[mask], rtol=1e-6, atol=0), key
    assert 0.45 < kept / total < 0.55, kept / total


def test_identities(setup, tmp_path):
    base, adapters = setup
    a, b = adapters["rslora-patterns"], adapters["rslora"]
    cli_run("combine", a, tmp_path / "one", "--method", "cat")
    one, want = peft_deltas(base, tmp_path / "one"), peft_deltas(base, a)
    for key in want:
        assert torch.allclose(one[key], want[key], rtol=1e-5, atol=1e-7), key
    cli_run("combine", a, a, tmp_path / "zero", "--weights", "1,-1")
    zero = peft_deltas(base, tmp_path / "zero")
    for key in want:
        assert zero[key].abs().max() <= 1e-6 * want[key].abs().max(), key
    cli_run("combine", a, b, tmp_path / "ab", "--weights", "0.5,2")
    cli_run("combine", b, a, tmp_path / "ba", "--weights", "2,0.5")
    ab, ba = peft_deltas(base, tmp_path / "ab"), peft_deltas(base, tmp_path / "ba")
    for key in ab:
        assert torch.allclose(ab[key], ba[key], rtol=1e-5, atol=1e-7), key


def test_rslora_output_and_runtime_target(setup, tmp_path):
    base, adapters = setup
    paths = [adapters[n] for n in MIX]
    cli_run("combine", *paths, tmp_path / "classic")
    cli_run("combine", *paths, tmp_path / "rs", "--rslora")
    config = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and math.isclose(config["lora_alpha"], math.sqrt(config["r"]))
    assert peft_scales(base, tmp_path / "rs") == {1.0}
    classic, rs = peft_deltas(base, tmp_path / "classic"), peft_deltas(base, tmp_path / "rs")
    assert all(torch.equal(classic[k], rs[k]) for k in classic)
    report = json.loads(cli_run("combine", *paths, tmp_path / "vllm", "--target", "vllm@0.6.3", "--json").stdout)
    assert report["converted"]["target"] == "vllm@0.6.3"
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    # vLLM 0.6.3 applies the global lora_alpha / r to every module (docs/runtimes.md): under that rule, the sum
    from safetensors.torch import load_file

    factors = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))
    s = config["lora_alpha"] / config["r"]
    key = "model.layers.0.mlp.up_proj"
    prefix = "base_model.model." + key
    served = s * (factors[prefix + ".lora_B.weight"].double() @ factors[prefix + ".lora_A.weight"].double())
    assert torch.allclose(served, classic[key], rtol=0, atol=1e-6 * classic[key].abs().max().item())


def test_dry_run_json_and_refusals(setup, tmp_path):
    base, adapters = setup
    paths = [adapters[n] for n in MIX]
    dry = json.loads(cli_run("combine", *paths, tmp_path / "d", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["bytes"] > 0 and not (tmp_path / "d").exists()
    q = next(m for m in dry["modules"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert q["rank"] == 8 + 16 + 8 and q["inputs"] == [0, 1, 2]
    dora = make_adapter(
        base,
        tmp_path / "dora",
        LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["q_proj"], init_lora_weights=False),
    )
    saving = LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    saved = make_adapter(base, tmp_path / "saved", saving, seed=1)
    other = make_adapter(base, tmp_path / "saved-other", saving, seed=2)
    # one input's modules_to_save is copied as it is (not weighted): PEFT merges it as in that input
    cli_run("combine", paths[0], saved, tmp_path / "with-saved", "--weights", "0.5,0.5")
    from peft_oracle import peft_merged_state_dict

    merged = peft_merged_state_dict(base, tmp_path / "with-saved")
    assert torch.equal(merged["lm_head.weight"], peft_merged_state_dict(base, saved)["lm_head.weight"])
    cases = [
        ((*paths, "--method", "linear"), "needs one rank"),
        ((paths[0], dora), "DoRA"),
        ((saved, other), "with other values"),
        ((*paths, "--method", "ties"), "needs --density"),
        ((*paths, "--method", "dare_linear", "--density", "0"), "above 0"),
        ((*paths, "--rank", "4"), "--rank goes with --method svd"),
        ((*paths, "--weights", "1,2"), "2 weights for 3 adapters"),
    ]
    for args, expected in cases:
        inputs = [a for a in args if isinstance(a, Path)]
        options = [a for a in args if not isinstance(a, Path)]
        result = cli_run("combine", *inputs, tmp_path / "o", *options, code=None)
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code != 0 and len(errors) == 1 and expected in errors[0], result.output
        assert not (tmp_path / "o").exists()
