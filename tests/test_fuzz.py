"""Fuzzing the parsers with hypothesis: any mutated header, index or config gives a clean error, never a crash.

"Clean" means an `RsloraError` (what the CLI prints as one `Error:` line) or success; any
other exception is a bug.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from rslora_tools.adapter import load_adapter
from rslora_tools.adapter_config import parse_config
from rslora_tools.checkpoint import open_checkpoint
from rslora_tools.module_scales import module_entries
from rslora_tools.errors import RsloraError
from rslora_tools.safetensors_file import read_header

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VALID = (FIXTURES / "tiny-llama-rslora" / "adapter_model.safetensors").read_bytes()
VALID_CONFIG = json.loads((FIXTURES / "tiny-llama-rslora" / "adapter_config.json").read_text())
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def clean(call) -> None:
    try:
        call()
    except RsloraError:
        pass


def header_and_data(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes(blob):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(blob)
        clean(lambda: read_header(path))


@SETTINGS
@given(st.data())
def test_mutated_valid_file(data):
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, min(len(raw) - 1, 2000)))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(bytes(raw))
        clean(lambda: read_header(path))


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "Q4", "", "F8_E4M3"]) | json_values,
    "shape": st.lists(st.integers(-2, 9), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-5, 300), min_size=0, max_size=3) | json_values,
})


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), st.integers(0, 400))
def test_random_header_json(header, data_len):
    raw = json.dumps(header, allow_nan=True).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
        clean(lambda: read_header(path))


@SETTINGS
@given(st.dictionaries(st.sampled_from(sorted(VALID_CONFIG) + ["use_dora", "trainable_token_indices",
                                                              "target_parameters", "layer_replication"]),
                       json_values, max_size=6))
def test_mutated_config(changes):
    config = {**VALID_CONFIG, **changes}
    clean(lambda: parse_config(config))


@SETTINGS
@given(json_values)
def test_config_of_any_shape(value):
    clean(lambda: parse_config(value))


@SETTINGS
@given(st.data())
def test_adapter_with_mutated_config_and_renamed_tensors(data):
    """Whole adapter folders: config changes plus tensor keys renamed or dropped, read and scaled."""
    tensors = load_file(FIXTURES / "tiny-llama-rslora" / "adapter_model.safetensors")
    keys = sorted(tensors)
    for key in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        value = tensors.pop(key)
        if data.draw(st.booleans()):
            tensors[key.replace(data.draw(st.sampled_from(["lora_A", "lora_B", "weight", "q_proj", "."])),
                                data.draw(st.sampled_from(["lora_B", "", "bias", "base_layer", "..", "lora_embedding_A"])))] = value
    config = {**VALID_CONFIG, **data.draw(st.dictionaries(
        st.sampled_from(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora",
                         "target_parameters", "modules_to_save"]), json_values, max_size=3))}
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        clean(lambda: module_entries(load_adapter(folder)))


@SETTINGS
@given(json_values | st.fixed_dictionaries({"metadata": json_values, "weight_map": st.dictionaries(
    st.sampled_from(["lm_head.weight", "model.norm.weight", "x", ""]),
    st.sampled_from(["model.safetensors", "../model.safetensors", "/abs", "", "missing.safetensors"]) | json_values,
    max_size=3)}))
def test_mutated_index(index):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", folder / "model.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        clean(lambda: open_checkpoint(folder))
