"""plan.placement, directly: which base tensor a LoRA module changes, with which kind of delta, from names and shapes.

Each case is a real checkpoint and a real adapter folder written here with just the shapes it needs (the merged
values are proven against PEFT in tests/merge/); these tests pin the decisions: name prefixes, the layer kind, the
Conv1D layout, expert orientation, and the one-line refusals.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rslora_tools.adapter.load import load_adapter
from rslora_tools.errors import MismatchError, UnsupportedAdapterError
from rslora_tools.formats.checkpoint import open_checkpoint
from rslora_tools.plan.names import NameResolver
from rslora_tools.plan.placement import check_shapes, place_module


def checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], model_type: str = "llama"):
    folder.mkdir()
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return open_checkpoint(folder)


def adapter(folder: Path, shapes: dict[str, tuple[int, ...]], **config):
    """An adapter whose saved keys are `base_model.model.<key>` for each key of `shapes`."""
    folder.mkdir()
    tensors = {f"base_model.model.{k}": torch.ones(s) for k, s in shapes.items()}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return load_adapter(folder)


def lora(path: str, r: int, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{path}.lora_A.weight": (r, fan_in), f"{path}.lora_B.weight": (fan_out, r)}


def place(tmp_path, base_shapes, adapter_shapes, model_type="llama", **config):
    ckpt = checkpoint(tmp_path / "base", base_shapes, model_type)
    lora_adapter = adapter(tmp_path / "adapter", adapter_shapes, **config)
    resolver = NameResolver(ckpt)
    (module,) = lora_adapter.lora_modules
    target, op = place_module(module, lora_adapter, lambda n: ckpt.info(n).shape, resolver, model_type)
    return target, op, lora_adapter


# --- names ----------------------------------------------------------------------------------------------------


def test_a_path_is_found_as_it_is_with_a_missing_prefix_or_with_an_extra_one(tmp_path):
    ckpt = checkpoint(tmp_path / "base", {"model.layers.0.proj.weight": (8, 8), "lm_head.weight": (8, 8)})
    resolver = NameResolver(ckpt)
    assert resolver.find("model.layers.0.proj.weight") == "model.layers.0.proj.weight"
    assert resolver.find("layers.0.proj.weight") == "model.layers.0.proj.weight"  # trained on LlamaModel
    assert resolver.find("transformer.lm_head.weight") == "lm_head.weight"  # trained on a wrapper
    assert resolver.find("layers.1.proj.weight") is None


def test_a_path_two_prefixes_could_complete_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path / "base", {"encoder.block.weight": (4, 4), "decoder.block.weight": (4, 4)})
    with pytest.raises(
        MismatchError, match="matches several base tensors.*decoder.block.weight, encoder.block.weight"
    ):
        NameResolver(ckpt).find("block.weight")


def test_a_module_that_matches_nothing_has_no_target(tmp_path):
    target, op, _ = place(tmp_path, {"model.other.weight": (8, 8)}, lora("model.proj", 4, 8, 8))
    assert target is None and op.kind == "linear"


# --- layer kinds ------------------------------------------------------------------------------------------------


def test_a_linear_weight_is_out_by_in(tmp_path):
    target, op, _ = place(tmp_path, {"model.proj.weight": (16, 8)}, lora("model.proj", 4, 8, 16))
    assert (target, op.kind, op.transpose, op.scale.r) == ("model.proj.weight", "linear", False, 4)


def test_a_conv1d_weight_is_in_by_out_and_read_from_the_shape(tmp_path):
    target, op, _ = place(tmp_path, {"h.proj.weight": (8, 16)}, lora("h.proj", 4, 8, 16), model_type="gpt2")
    assert (op.kind, op.transpose) == ("linear", True)


@pytest.mark.parametrize(
    ("model_type", "fan_in_fan_out", "transpose"),
    [("llama", False, False), ("gpt2", False, True), ("llama", True, True)],
)
def test_a_square_weight_takes_its_layout_from_the_architecture_or_the_config(
    tmp_path, model_type, fan_in_fan_out, transpose
):
    _, op, _ = place(
        tmp_path,
        {"h.proj.weight": (8, 8)},
        lora("h.proj", 4, 8, 8),
        model_type=model_type,
        fan_in_fan_out=fan_in_fan_out,
    )
    assert op.transpose is transpose


def test_lora_factors_that_fit_neither_layout_name_both_shapes(tmp_path):
    with pytest.raises(
        MismatchError,
        match=r"LoRA A\[4, 8\] and B\[12, 4\] give a \(12, 8\) delta, but the base "
        r"weight is \[16, 8\]",
    ):
        place(tmp_path, {"model.proj.weight": (16, 8)}, lora("model.proj", 4, 8, 12))


def test_an_embedding_lora(tmp_path):
    shapes = {"model.embed.lora_embedding_A": (4, 10), "model.embed.lora_embedding_B": (6, 4)}
    target, op, lora_adapter = place(tmp_path, {"model.embed.weight": (10, 6)}, shapes, target_modules=["embed"])
    assert (target, op.kind) == ("model.embed.weight", "embedding")
    check_shapes(op, lora_adapter, (10, 6), target)
    with pytest.raises(MismatchError, match="do not fit base tensor"):
        check_shapes(op, lora_adapter, (6, 10), target)


def test_a_convolution_lora(tmp_path):
    shapes = {"model.conv.lora_A.weight": (4, 3, 3, 3), "model.conv.lora_B.weight": (5, 4, 1, 1)}
    target, op, lora_adapter = place(tmp_path, {"model.conv.weight": (5, 3, 3, 3)}, shapes, target_modules=["conv"])
    assert op.kind == "conv"
    check_shapes(op, lora_adapter, (5, 3, 3, 3), target)


def test_a_grouped_convolution_is_refused_as_peft_refuses_it(tmp_path):
    shapes = {"model.conv.lora_A.weight": (4, 6, 3, 3), "model.conv.lora_B.weight": (6, 4, 1, 1)}
    target, op, lora_adapter = place(tmp_path, {"model.conv.weight": (6, 3, 3, 3)}, shapes, target_modules=["conv"])
    with pytest.raises(UnsupportedAdapterError, match="groups > 1"):
        check_shapes(op, lora_adapter, (6, 3, 3, 3), target)


def test_multihead_attention_in_projection(tmp_path):
    target, op, _ = place(
        tmp_path, {"model.attn.in_proj_weight": (24, 8)}, lora("model.attn", 4, 8, 24), target_modules=["attn"]
    )
    assert (target, op.kind) == ("model.attn.in_proj_weight", "mha")


# --- target parameters and experts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("expert_shape", "swapped"), [((2, 16, 8), False), ((2, 8, 16), True)])
def test_fused_experts_take_their_orientation_from_the_shape(tmp_path, expert_shape, swapped):
    """PEFT's ParamWrapper on a 3-D expert parameter: A is [experts * r, in], B [out, experts * r]."""
    shapes = {"model.experts.lora_A.weight": (8, 8), "model.experts.lora_B.weight": (16, 8)}
    target, op, _ = place(
        tmp_path,
        {"model.experts.gate_up_proj": expert_shape},
        shapes,
        target_modules=[],
        target_parameters=["experts.gate_up_proj"],
    )
    assert (target, op.kind, op.experts, op.transpose, op.scale.r) == (
        "model.experts.gate_up_proj",
        "experts",
        2,
        swapped,
        4,
    )


def test_square_experts_without_an_architecture_are_refused_as_ambiguous(tmp_path):
    shapes = {"model.experts.lora_A.weight": (8, 8), "model.experts.lora_B.weight": (8, 8)}
    with pytest.raises(
        UnsupportedAdapterError, match="is square .* no config.json model_type, so the orientation .* ambiguous"
    ):
        place(
            tmp_path,
            {"model.experts.down_proj": (2, 8, 8)},
            shapes,
            model_type=None,
            target_modules=[],
            target_parameters=["experts.down_proj"],
        )


@pytest.mark.parametrize(("model_type", "swapped"), [("gpt_oss", True), ("qwen3_moe", False), ("mixtral", False)])
def test_square_experts_take_their_orientation_from_the_architecture(tmp_path, model_type, swapped):
    """gpt-oss's down_proj is (experts, 2880, 2880): PEFT orients it by the experts' is_transposed."""
    shapes = {"model.experts.lora_A.weight": (8, 8), "model.experts.lora_B.weight": (8, 8)}
    _, op, _ = place(
        tmp_path,
        {"model.experts.down_proj": (2, 8, 8)},
        shapes,
        model_type=model_type,
        target_modules=[],
        target_parameters=["experts.down_proj"],
    )
    assert (op.kind, op.transpose) == ("experts", swapped)


def test_transposed_experts_are_the_installed_transformers_ones():
    """TRANSPOSED_EXPERTS is read from transformers 5.25.0; an upgrade that changes it must change the table."""
    import pkgutil
    import re

    import transformers.models as models

    from rslora_tools.plan.placement import TRANSPOSED_EXPERTS

    found = set()
    for info in pkgutil.iter_modules(models.__path__):
        folder = Path(models.__path__[0]) / info.name
        modeling = list(folder.glob("modeling_*.py"))
        if not any(re.search(r"use_experts_implementation\([^)]*is_transposed=True", f.read_text()) for f in modeling):
            continue
        for config_file in folder.glob("configuration_*.py"):
            found.update(re.findall(r'^\s+model_type = "([^"]+)"', config_file.read_text(), re.M))
    assert found == TRANSPOSED_EXPERTS


# --- ranks and DoRA -----------------------------------------------------------------------------------------------


def test_a_saved_rank_other_than_the_configs_is_refused(tmp_path):
    with pytest.raises(MismatchError, match="rank"):
        place(tmp_path, {"model.proj.weight": (16, 8)}, lora("model.proj", 2, 8, 16))  # config r=4


def test_rank_pattern_gives_the_rank_a_module_must_have(tmp_path):
    _, op, _ = place(tmp_path, {"model.proj.weight": (16, 8)}, lora("model.proj", 2, 8, 16), rank_pattern={"proj": 2})
    assert op.scale.r == 2 and op.scale.scale == 8 / 2


def test_a_dora_magnitude_of_the_wrong_size_is_refused(tmp_path):
    shapes = {**lora("model.proj", 4, 8, 16), "model.proj.lora_magnitude_vector": (12,)}
    target, op, lora_adapter = place(tmp_path, {"model.proj.weight": (16, 8)}, shapes, use_dora=True)
    assert op.dora
    with pytest.raises(MismatchError, match="DoRA magnitude vector has shape \\[12\\], expected 16 values"):
        check_shapes(op, lora_adapter, (16, 8), target)
