"""plan.stacking, directly: how the plans of several adapters fold into the one plan of a stacked merge.

The merged values are proven against PEFT's stacked merge in tests/merge/test_stacked_merge.py; these tests pin the
fold itself: which adapter starts a tensor, what is stacked on it and in which order, the weighted scales, the
namespaced keys, and the refusals.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ADAPTER, BASE
from safetensors.torch import load_file, save_file

from rslora_tools.adapter.load import load_adapter
from rslora_tools.adapter.stacked import stack_adapters
from rslora_tools.errors import InputError, UnsupportedAdapterError
from rslora_tools.plan.merge import plan_merge

Q = "model.layers.0.self_attn.q_proj.weight"
O = "model.layers.0.self_attn.o_proj.weight"  # noqa: E741
DOWN = "model.layers.0.mlp.down_proj.weight"


def variant(tmp_path: Path, name: str, keep=lambda key: True, **config) -> Path:
    """The fixture adapter with only the tensors `keep` accepts and config fields changed."""
    folder = tmp_path / name
    shutil.copytree(ADAPTER, folder)
    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if keep(k)}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def stacked_plan(*folders: Path, weights=None):
    stacked = stack_adapters([load_adapter(f) for f in folders], weights)
    return plan_merge(BASE, stacked)[2]


def tensor(plan, name):
    return next(t for t in plan.tensors if t.name == name)


def test_the_first_adapter_starts_a_tensor_and_later_ones_are_stacked_in_order(tmp_path):
    plan = stacked_plan(ADAPTER, ADAPTER, ADAPTER)
    q = tensor(plan, Q)
    assert q.lora.module.a_key.startswith("0/") and [s.lora.module.a_key[:2] for s in q.stacked] == ["1/", "2/"]
    assert [op.module.name for op in q.all_lora] == [q.lora.module.name] * 3
    assert not tensor(plan, "model.norm.weight").stacked  # no adapter changes it: as in the base


def test_an_adapter_alone_on_a_tensor_is_that_tensors_plan(tmp_path):
    only_q = variant(tmp_path, "only-q", keep=lambda k: "q_proj" in k)
    only_down = variant(tmp_path, "only-down", keep=lambda k: "down_proj" in k)
    plan = stacked_plan(only_q, only_down)
    q, down = tensor(plan, Q), tensor(plan, DOWN)
    assert q.lora.module.a_key.startswith("0/") and not q.stacked
    assert down.lora.module.a_key.startswith("1/") and not down.stacked
    assert tensor(plan, O).lora is None


def test_weights_scale_each_adapter_in_peft_set_scale_order(tmp_path):
    plan = stacked_plan(ADAPTER, ADAPTER, weights=[0.5, -2.0])
    first, second = tensor(plan, O).all_lora  # rank_pattern o_proj: 4; lora_alpha 16; rsLoRA
    assert first.scale.scale == 0.5 * 16 / math.sqrt(4) and second.scale.scale == -2.0 * 16 / math.sqrt(4)
    first, second = tensor(plan, DOWN).all_lora  # alpha_pattern down_proj: 8.5; r 8
    assert second.scale.scale == -2.0 * 8.5 / math.sqrt(8)
    unweighted = tensor(stacked_plan(ADAPTER, ADAPTER), O).all_lora[0]
    assert unweighted.scale.scale == 16 / math.sqrt(4)


def test_each_adapter_keeps_its_own_scaling_convention(tmp_path):
    classic = variant(tmp_path, "classic", use_rslora=False)
    first, second = tensor(stacked_plan(ADAPTER, classic), Q).all_lora
    assert (first.scale.use_rslora, first.scale.scale) == (True, 16 / math.sqrt(8))
    assert (second.scale.use_rslora, second.scale.scale) == (False, 16 / 8)


def test_two_adapters_that_replace_the_same_tensor_are_refused(tmp_path):
    def with_saved_head(name):
        folder = variant(tmp_path, name, modules_to_save=["lm_head"])
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        return folder

    with pytest.raises(UnsupportedAdapterError, match="'lm_head.weight' is replaced by this adapter"):
        stacked_plan(with_saved_head("a"), with_saved_head("b"))


def test_a_tensor_only_a_later_adapter_replaces_is_kept_with_a_note(tmp_path):
    later = variant(tmp_path, "later", keep=lambda k: "q_proj" in k, modules_to_save=["lm_head"])
    tensors = load_file(later / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.ones(64, 32, dtype=torch.bfloat16)
    save_file(tensors, later / "adapter_model.safetensors", metadata={"format": "pt"})
    plan = stacked_plan(ADAPTER, later)
    assert tensor(plan, "lm_head.weight").replacement.startswith("1/")
    assert any("saved whole by a later adapter" in note and "lm_head.weight" in note for note in plan.notes)


def test_adapters_that_change_the_output_tensors_differently_are_refused(tmp_path):
    """An embedding LoRA on a tied head unties it: the folded plan would have to both write and drop lm_head."""
    assert {t.name for t in stacked_plan(ADAPTER, ADAPTER).tensors} == {
        t.name for t in plan_merge(BASE, ADAPTER)[2].tensors
    }
    tied = tmp_path / "tied-base"
    shutil.copytree(BASE, tied)
    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    embedding = variant(tmp_path, "embedding", keep=lambda k: "q_proj" in k, target_modules=["q_proj", "embed_tokens"])
    tensors = load_file(embedding / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(8, 64)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.ones(32, 8)
    save_file(tensors, embedding / "adapter_model.safetensors", metadata={"format": "pt"})
    plain = variant(tmp_path, "plain", keep=lambda k: "q_proj" in k)
    with pytest.raises(UnsupportedAdapterError, match="changes which tensors the merged model has"):
        plan_merge(tied, stack_adapters([load_adapter(plain), load_adapter(embedding)]))


@pytest.mark.parametrize(("weights", "message"), [([1.0], "has 1 value for 2 adapters"), ([1.0, math.inf], "finite")])
def test_weights_must_be_one_finite_number_per_adapter(weights, message):
    with pytest.raises(InputError, match=message):
        stack_adapters([load_adapter(ADAPTER), load_adapter(ADAPTER)], weights)


def test_no_adapter_is_not_a_stack_and_one_with_a_weight_is_a_stack_of_one():
    """One adapter with a weight (`merge BASE A OUT --weights 0.5`, issue 36) is a stack of one; none is refused."""
    with pytest.raises(InputError, match="at least one adapter"):
        stack_adapters([])
    one = stack_adapters([load_adapter(ADAPTER)], [0.5])
    assert one.stacked and one.weights == [0.5] and len(one.parts) == 1
