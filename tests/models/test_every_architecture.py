"""Every model type the installed transformers builds on CPU, merged with the ordinary adapter, bit for bit as PEFT.

One row per model type (text, MoE fused or per expert on disk, hybrid SSM, vision-language, encoder-decoder and
encoder models; tests/tiny_models.py builds each from its own config class): the checkpoint from its own
`save_pretrained`, the adapter from PEFT (`all-linear`, rsLoRA, a rank and an alpha pattern, `target_parameters` on
fused expert tensors), the truth PEFT's `merge_and_unload()` of those files (tests/architecture_case.py). Each row
also checks that `inspect --base` says what the merge changes, and, for MoE and vision-language rows, that `convert
--expert-layout` / `--key-layout` round-trip and the converted adapter merges the same. A representative row per
layout family runs by default; the rest are marked slow (CI runs them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from architecture_case import Case, build_case
from helpers import cli_run
from peft_oracle import assert_same_tensors, read_folder
from safetensors.torch import load_file
from tiny_models import Row, rows

# one row per layout family: plain, experts stacked on loading (renamed or not), fused on disk, kept in float32,
# hybrid SSM, multimodal renames, a fused q/k/v cut on loading, a transposed weight, encoder-decoder, encoder
REPRESENTATIVE = {"llama", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "nemotron_h", "jamba",
                  "qwen2_vl", "llava", "mllama", "qwen3_5_moe", "hrm_text", "sarvam_moe", "ergo", "xlnet", "t5",
                  "bert", "bart"}
ROWS = rows()
# model types whose ordinary adapter is refused, by name (nothing written): what transformers does on loading there
# is not merged across (yet); docs/layouts.md lists them
REFUSED = {
    "kimi_k25": "by Chunk + PermuteForRope of the checkpoint's wqkv",  # the vision tower's fused, RoPE-permuted qkv
    "step3p7": "by Chunk + PermuteForRope of the checkpoint's",
    "inkling_mm_model": "by Interleave + Chunk of the checkpoint's",  # shared experts stored interleaved, fused
    "blip": "its weight is tied to text_decoder.bert.embeddings.word_embeddings.weight",  # a tied decoder, not lm_head
    "luke": "its weight is tied to luke.entity_embeddings.entity_embeddings.weight",
}


def _params():
    return [pytest.param(r, id=r.id, marks=() if r.model_type in REPRESENTATIVE else pytest.mark.slow) for r in ROWS]


def test_the_representative_rows_exist():
    assert REPRESENTATIVE <= {r.model_type for r in ROWS}


@pytest.mark.parametrize("row", _params())
def test_the_ordinary_adapter_merges_bit_for_bit_as_peft(row: Row, tmp_path):
    case = build_case(row, tmp_path)
    if row.model_type in REFUSED:
        refused = cli_run("merge", case.base, case.adapter, tmp_path / "out", code=1).output
        assert REFUSED[row.model_type] in refused and "merge this adapter with PEFT" in refused, refused
        assert not (tmp_path / "out").exists()
        return
    result = cli_run("merge", case.base, case.adapter, tmp_path / "out", "--json")
    truth = case.truth()
    assert_same_tensors(read_folder(tmp_path / "out"), truth)
    report = json.loads(result.stdout)
    _applies_to_is_what_changes(case, truth)
    if any(re.search(r"\.experts\.(base_layer\.)*lora_A", k) for k in load_file(case.adapter / "adapter_model.safetensors")):
        _expert_layouts_round_trip(case, truth, tmp_path)
    if any("other naming" in note for note in report["notes"]):
        _key_layouts_round_trip(case, truth, tmp_path)


def test_a_sharded_moe_checkpoint_with_experts_split_across_shards(tmp_path):
    row = next(r for r in ROWS if r.model_type == "qwen3_moe")
    case = build_case(row, tmp_path, max_shard_size="4KB")
    index = json.loads((case.base / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {index[k] for k in index if ".mlp.experts." in k and k.startswith("model.layers.0.")}
    assert len(set(index.values())) > 2 and len(experts) > 1  # layer 0's experts lie in several shards
    cli_run("merge", case.base, case.adapter, tmp_path / "out")
    assert_same_tensors(read_folder(tmp_path / "out"), case.truth())
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def _changed(case: Case, truth: dict[str, torch.Tensor]) -> set[str]:
    base = read_folder(case.base)
    return {k for k, v in truth.items() if k in base and not torch.equal(base[k].float(), v.float())}


def _applies_to_is_what_changes(case: Case, truth: dict[str, torch.Tensor]) -> None:
    report = json.loads(cli_run("inspect", case.adapter, "--base", case.base, "--json", code=None).stdout)
    applied = {t for targets in report["applies_to"].values() for t in targets}
    assert applied == _changed(case, truth), report["lints"]
    assert not [lint for lint in report["lints"] if lint["code"] == "applies-to-nothing"]


def _same_adapter_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    assert [k for k in x if not torch.equal(x[k], y[k])] == []


def _expert_layouts_round_trip(case: Case, truth: dict[str, torch.Tensor], tmp_path: Path) -> None:
    per, back = tmp_path / "per-expert", tmp_path / "fused-again"
    result = cli_run("convert", case.adapter, per, "--expert-layout", "per-expert", "--base", case.base, code=None)
    if result.exit_code == 1 and "no per-expert naming of them exists" in result.output:
        return  # the family stores its experts fused (GraniteMoE): refused by name
    assert result.exit_code == 0, result.output
    cli_run("merge", case.base, per, tmp_path / "out-per-expert")
    assert_same_tensors(read_folder(tmp_path / "out-per-expert"), truth)
    cli_run("convert", per, back, "--expert-layout", "fused", "--base", case.base)
    _same_adapter_tensors(case.adapter, back)
    cli_run("merge", case.base, back, tmp_path / "out-fused-again")
    assert_same_tensors(read_folder(tmp_path / "out-fused-again"), truth)


def _key_layouts_round_trip(case: Case, truth: dict[str, torch.Tensor], tmp_path: Path) -> None:
    stored, back = tmp_path / "stored-names", tmp_path / "memory-names"
    cli_run("convert", case.adapter, stored, "--key-layout", "base", "--base", case.base)
    cli_run("merge", case.base, stored, tmp_path / "out-stored-names")
    assert_same_tensors(read_folder(tmp_path / "out-stored-names"), truth)
    cli_run("convert", stored, back, "--key-layout", "transformers-5", "--base", case.base)
    _same_adapter_tensors(case.adapter, back)
    cli_run("merge", case.base, back, tmp_path / "out-memory-names")
    assert_same_tensors(read_folder(tmp_path / "out-memory-names"), truth)
