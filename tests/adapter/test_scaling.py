"""The scale rules equal PEFT's: get_pattern_key matching, rsLoRA vs classic, float alpha."""

from __future__ import annotations

import math

import pytest
from peft.utils.other import get_pattern_key

from rslora_tools.adapter.scaling import matching_keys, module_scale, pattern_key, scale
from rslora_tools.errors import AdapterConfigError

NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.mlp.down_proj",
    "model.layers.1.mlp.down_proj",
    "transformer.h.0.attn.c_attn",
    "q_proj",
]
PATTERNS = [
    {"q_proj": 4},
    {"^model.layers.0.self_attn.q_proj": 2, "q_proj": 4},
    {"q_proj": 4, "^model.layers.0.self_attn.q_proj": 2},
    {"layers.1.mlp.down_proj": 3, "down_proj": 5},
    {"model.layers.1.self_attn.q_proj": 7},
    {"layers\\.1\\d\\..*": 9},
    {"attn.c_attn": 6, ".*c_attn": 1},
    {"mlp": 8},
]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", NAMES)
def test_pattern_key_equals_peft(pattern, name):
    ours = pattern_key(pattern, name)
    theirs = get_pattern_key(pattern.keys(), name)
    # PEFT returns the module name itself when nothing matches (then .get() falls back to the default)
    assert (ours if ours is not None else name) == theirs


def test_scale_conventions():
    assert scale(16, 8, use_rslora=False) == 2.0
    assert scale(16, 8, use_rslora=True) == 16 / math.sqrt(8)
    assert scale(8.485281374238571, 16, use_rslora=True) == 8.485281374238571 / 4


def test_module_scale_patterns_and_float_alpha():
    s = module_scale(
        "model.layers.1.mlp.down_proj",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"down_proj": 4},
        alpha_pattern={"layers.1.mlp.down_proj": 3.5},
    )
    assert (s.r, s.alpha, s.scale) == (4, 3.5, 3.5 / 2)
    assert (s.rank_key, s.alpha_key) == ("down_proj", "layers.1.mlp.down_proj")


def test_matching_keys_reports_order_dependence():
    keys = {"q_proj": 16, "^model.layers.0.self_attn.q_proj": 4}
    assert matching_keys(keys, "model.layers.0.self_attn.q_proj") == list(keys)


def test_invalid_regex_is_a_config_error():
    with pytest.raises(AdapterConfigError, match="not a valid regular expression"):
        pattern_key(["q_proj("], "model.q_proj")


def test_rank_must_be_positive():
    with pytest.raises(AdapterConfigError):
        scale(8, 0, use_rslora=True)
