"""Stacked merges (`merge BASE ADAPTER1 ADAPTER2 ... OUT`) against PEFT's multi-adapter merge, bit for bit.

The oracle: PEFT loads the adapters one after another (`load_adapter`) and merges them all
(`merge_and_unload(adapter_names=[...])`); with --weights, each adapter's layers get
`set_scale(name, weight)` first. Mixes of classic and rsLoRA, rank/alpha patterns and DoRA (a DoRA
adapter after others takes its norm from the weight with those unmerged, as PEFT does), fp32 and bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig, PeftModel
from peft_oracle import (
    assert_same_tensors,
    load_causal_lm,
    make_adapter,
    make_llama,
    read_folder,
    unique_tensors,
)

ADAPTERS = {
    "rslora-patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 5},
    ),
    "classic-dora": dict(r=16, lora_alpha=8, target_modules=["q_proj", "up_proj", "down_proj"], use_dora=True),
    "rslora-dora": dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=["q_proj", "o_proj"],
        use_dora=True,
        alpha_pattern={"o_proj": 3},
    ),
    "classic-embedding": dict(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj", "lm_head"]),
}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"stacked-{str(request.param)[6:]}")
    base = make_llama(root / "base", request.param)
    adapters = {
        name: make_adapter(base, root / name, LoraConfig(init_lora_weights=False, **kwargs), seed=i + 1)
        for i, (name, kwargs) in enumerate(ADAPTERS.items())
    }
    return base, adapters


def peft_stacked(base: Path, adapters: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_causal_lm(base), str(adapters[0]), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(str(adapter), adapter_name=name)
    if weights is not None:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, weight in zip(names, weights):
                    if name in module.scaling:
                        module.set_scale(name, weight)
    return unique_tensors(model.merge_and_unload(adapter_names=names).state_dict())


ORDERS = [
    ["rslora-patterns", "classic-dora"],
    ["classic-dora", "rslora-patterns"],
    ["rslora-dora", "rslora-patterns", "classic-dora"],  # DoRA after DoRA after plain on q_proj
    ["classic-embedding", "rslora-patterns", "rslora-dora"],
    ["rslora-patterns", "classic-embedding"],  # plain LoRA twice on q_proj: the kernel, one rounding per adapter
]


@pytest.mark.parametrize("order", ORDERS, ids=["+".join(o) for o in ORDERS])
def test_stacked_merge_equals_peft_bit_for_bit(setup, order, tmp_path):
    base, adapters = setup
    paths = [adapters[name] for name in order]
    out = tmp_path / "merged"
    report = json.loads(cli_run("merge", base, *paths, out, "--json").stdout)
    assert report["adapters"] == [str(p) for p in paths] and report["weights"] == [1.0] * len(paths)
    assert_same_tensors(read_folder(out), peft_stacked(base, paths))
    provenance = json.loads((out / "rslora_tools.json").read_text())
    assert len(provenance["adapters"]) == len(paths) and provenance["weights"] == [1.0] * len(paths)


def test_weights_equal_peft_set_scale(setup, tmp_path):
    base, adapters = setup
    paths = [adapters["rslora-patterns"], adapters["classic-dora"]]
    out = tmp_path / "merged"
    cli_run("merge", base, *paths, out, "--weights", "0.7,-0.4")
    assert_same_tensors(read_folder(out), peft_stacked(base, paths, [0.7, -0.4]))


@pytest.mark.parametrize("name", ["rslora-patterns", "classic-dora"])
def test_one_adapter_with_a_weight_equals_peft_set_scale(setup, tmp_path, name):
    """`merge BASE A OUT --weights 0.5` (was refused: "--weights goes with several adapters"), as mergekit and PEFT
    users scale one adapter: PEFT's set_scale(0.5), then merge_and_unload; verify checks it the same way."""
    base, adapters = setup
    out = tmp_path / "merged"
    cli_run("merge", base, adapters[name], out, "--weights", "0.5")
    assert_same_tensors(read_folder(out), peft_stacked(base, [adapters[name]], [0.5]))
    assert json.loads((out / "rslora_tools.json").read_text())["weights"] == [0.5]
    assert "EXACT" in cli_run("verify", out, base, adapters[name]).output  # the weight is read from rslora_tools.json


def test_the_same_adapter_with_weights_one_and_minus_one_cancels(setup, tmp_path):
    base, adapters = setup
    adapter = adapters["rslora-patterns"]
    out = tmp_path / "merged"
    cli_run("merge", base, adapter, adapter, out, "--weights", "1,-1")
    merged, original = read_folder(out), read_folder(base)
    for key, value in original.items():  # W + d - d: at most one rounding of d away from W
        assert torch.allclose(
            merged[key].float(), value.float(), rtol=0, atol=2e-2 if value.dtype == torch.bfloat16 else 1e-6
        ), key


def test_verify_and_dry_run_of_a_stacked_merge(setup, tmp_path):
    base, adapters = setup
    paths = [adapters["rslora-dora"], adapters["rslora-patterns"]]
    out = tmp_path / "merged"
    dry = json.loads(cli_run("merge", base, *paths, out, "--dry-run", "--json").stdout)
    q = next(c for c in dry["changes"] if c["tensor"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["how"].count("at scale") == 2 and q["by"] == "torch"  # two adapters on it: torch, in PEFT's order
    v = next(c for c in dry["changes"] if c["tensor"] == "model.layers.0.self_attn.v_proj.weight")
    assert v["by"] == "kernel"  # one adapter only: the merge kernel as usual
    assert not out.exists()
    report = json.loads(cli_run("merge", base, *paths, out, "--verify", "--json").stdout)
    assert report["verify"]["verdict"] == "exact"
    plain = [adapters["rslora-patterns"], adapters["classic-embedding"]]
    dry = json.loads(cli_run("merge", base, *plain, tmp_path / "plain", "--dry-run", "--json").stdout)
    q = next(c for c in dry["changes"] if c["tensor"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["how"].count("at scale") == 2 and q["by"] == "kernel"  # plain ops chain in the kernel


def test_two_adapters_replacing_the_same_tensor_are_refused(tmp_path):
    base = make_llama(tmp_path / "base")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
    a = make_adapter(base, tmp_path / "a", LoraConfig(**config), seed=1)
    b = make_adapter(base, tmp_path / "b", LoraConfig(**config), seed=2)
    result = cli_run("merge", base, a, b, tmp_path / "out", code=None)
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code != 0 and len(errors) == 1 and "'lm_head.weight'" in errors[0], result.output
    assert "merge them one at a time" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_later_adapters_modules_to_save_are_kept_where_peft_drops_them(tmp_path):
    """PEFT's stacked merge keeps modules_to_save of the active (first loaded) adapter only: with that adapter
    first, PEFT and rslora-tools agree bit for bit; with it second, PEFT drops the saved lm_head, rslora-tools keeps
    it and says so."""
    base = make_llama(tmp_path / "base")
    a = make_adapter(
        base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), seed=1
    )
    b = make_adapter(
        base,
        tmp_path / "b",
        LoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["v_proj"],
            modules_to_save=["lm_head"],
            init_lora_weights=False,
        ),
        seed=2,
    )
    cli_run("merge", base, b, a, tmp_path / "ba")
    assert_same_tensors(read_folder(tmp_path / "ba"), peft_stacked(base, [b, a]))
    report = json.loads(cli_run("merge", base, a, b, tmp_path / "ab", "--json").stdout)
    assert any("modules_to_save of the active" in n for n in report["notes"])
    ours, theirs = read_folder(tmp_path / "ab"), peft_stacked(base, [a, b])
    assert torch.equal(theirs["lm_head.weight"], read_folder(base)["lm_head.weight"])  # PEFT dropped it
    assert torch.equal(ours["lm_head.weight"], read_folder(tmp_path / "ba")["lm_head.weight"])  # kept
    assert_same_tensors(ours, theirs, skip={"lm_head.weight"})


def test_bad_stacked_invocations_are_one_line_errors(setup, tmp_path):
    base, adapters = setup
    a, b = adapters["rslora-patterns"], adapters["classic-dora"]
    cases = [
        (("merge", base, a, b, tmp_path / "o", "--weights", "1"), "1 weight for 2 adapters"),
        (("merge", base, a, b, tmp_path / "o", "--weights", "1,x"), "not a comma-separated list"),
        (("merge", base, a, b, tmp_path / "o", "--initial", a), "--initial applies to one adapter"),
        (("merge", base, a), "missing argument OUT"),
    ]
    for args, expected in cases:
        result = cli_run(*args, code=None)
        assert result.exit_code != 0 and expected in result.output, result.output
        assert not (tmp_path / "o").exists()


def test_verify_command_with_several_adapters_and_weights(setup, tmp_path):
    base, adapters = setup
    paths = [adapters["classic-dora"], adapters["rslora-patterns"]]
    out = tmp_path / "merged"
    cli_run("merge", base, *paths, out, "--weights", "0.5,2")
    report = json.loads(cli_run("verify", out, base, *paths, "--weights", "0.5,2", "--json").stdout)
    assert report["verdict"] == "exact", report["problems"]
    wrong = cli_run(
        "verify", out, base, *paths, "--weights", "1,1", "--json", code=None
    )  # other weights: not this merge
    assert wrong.exit_code == 1 and json.loads(wrong.stdout)["verdict"] == "mismatch"
    recorded = json.loads(cli_run("verify", out, base, *paths, "--json").stdout)  # none given: the merge's own record
    assert recorded["verdict"] == "exact" and recorded["recipe"]["weights"] == [0.5, 2.0]
    assert recorded["recipe"]["from"] == "rslora_tools.json of MERGED"


def test_trainable_tokens_of_one_adapter_are_applied_where_peft_cannot_stack_them(tmp_path):
    """PEFT 0.21.2 cannot stack an adapter with trainable tokens and one without: load_adapter or merge_and_unload
    raises KeyError, in either order. rslora-tools merges them: each tensor as the adapter that changes it merges
    it."""
    base = make_llama(tmp_path / "base")
    a = make_adapter(
        base, tmp_path / "a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False), seed=1
    )
    b = make_adapter(
        base,
        tmp_path / "b",
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["v_proj"],
            trainable_token_indices={"embed_tokens": [1, 5]},
            init_lora_weights=False,
        ),
        seed=2,
    )
    for order in ([a, b], [b, a]):
        with pytest.raises(KeyError):
            peft_stacked(base, order)
    cli_run("merge", base, a, b, tmp_path / "ab")
    cli_run("merge", base, a, tmp_path / "a-only")
    cli_run("merge", base, b, tmp_path / "b-only")
    stacked, only_a, only_b = (read_folder(tmp_path / n) for n in ("ab", "a-only", "b-only"))
    for key, value in stacked.items():
        expected = only_a[key] if "q_proj" in key else only_b[key]
        assert torch.equal(value, expected), key


def test_two_adapters_that_train_tokens_merge_as_peft_merges_them(setup, tmp_path):
    """PEFT's own multi-adapter case "LoRA + trainable tokens" (disjoint indices): both adapters' rows are written
    in order; it was refused ("replaced by this adapter ... and changed by another one")."""
    base, _ = setup
    first = make_adapter(
        base,
        tmp_path / "t1",
        LoraConfig(init_lora_weights=False, target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),
        seed=5,
    )
    second = make_adapter(
        base,
        tmp_path / "t2",
        LoraConfig(init_lora_weights=False, target_modules=["v_proj"], trainable_token_indices=[2, 3]),
        seed=6,
    )
    out = tmp_path / "merged"
    cli_run("merge", base, first, second, out)
    assert_same_tensors(read_folder(out), peft_stacked(base, [first, second]))
    assert "EXACT" in cli_run("verify", out, base, first, second).output
    overlapping = make_adapter(
        base,
        tmp_path / "t3",
        LoraConfig(init_lora_weights=False, target_modules=["v_proj"], trainable_token_indices=[5, 9]),
        seed=7,
    )
    line = cli_run("merge", base, first, overlapping, tmp_path / "o", code=1).output
    assert "trainable tokens [5] of 'model.embed_tokens.weight' are trained by an earlier adapter too" in line
