"""Fuzzing the parsers with hypothesis: any mutated header, index or config gives a clean error, never a crash.

"Clean" means an `RsloraError` (what the CLI prints as one `Error:` line) or success; any
other exception is a bug.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from helpers import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rslora_tools.adapter.config import parse_config
from rslora_tools.adapter.load import load_adapter
from rslora_tools.adapter.module_scales import module_entries
from rslora_tools.adapter.scaling import pattern_key
from rslora_tools.errors import RsloraError
from rslora_tools.formats.checkpoint import open_checkpoint
from rslora_tools.formats.safetensors_file import read_header
from rslora_tools.plan.merge import plan_merge

VALID = (FIXTURES / "tiny-llama-rslora" / "adapter_model.safetensors").read_bytes()
VALID_CONFIG = json.loads((FIXTURES / "tiny-llama-rslora" / "adapter_config.json").read_text())
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
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
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


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


entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "Q4", "", "F8_E4M3"]) | json_values,
        "shape": st.lists(st.integers(-2, 9), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 300), min_size=0, max_size=3) | json_values,
    }
)


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), entry | json_values, max_size=5), st.integers(0, 400))
def test_random_header_json(header, data_len):
    raw = json.dumps(header, allow_nan=True).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
        clean(lambda: read_header(path))


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(
            sorted(VALID_CONFIG) + ["use_dora", "trainable_token_indices", "target_parameters", "layer_replication"]
        ),
        json_values,
        max_size=6,
    )
)
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
            tensors[
                key.replace(
                    data.draw(st.sampled_from(["lora_A", "lora_B", "weight", "q_proj", "."])),
                    data.draw(st.sampled_from(["lora_B", "", "bias", "base_layer", "..", "lora_embedding_A"])),
                )
            ] = value
    config = {
        **VALID_CONFIG,
        **data.draw(
            st.dictionaries(
                st.sampled_from(
                    [
                        "r",
                        "lora_alpha",
                        "use_rslora",
                        "rank_pattern",
                        "alpha_pattern",
                        "use_dora",
                        "target_parameters",
                        "modules_to_save",
                    ]
                ),
                json_values,
                max_size=3,
            )
        ),
    }
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        clean(lambda: module_entries(load_adapter(folder)))


@SETTINGS
@given(
    json_values
    | st.fixed_dictionaries(
        {
            "metadata": json_values,
            "weight_map": st.dictionaries(
                st.sampled_from(["lm_head.weight", "model.norm.weight", "x", ""]),
                st.sampled_from(
                    [
                        "model-00001-of-00001.safetensors",
                        "../model.safetensors",
                        "/abs",
                        "",
                        "missing.safetensors",
                        "tokenizer.json",
                        "a\0b.safetensors",
                        "model.safetensors",
                    ]
                )
                | json_values,
                max_size=3,
            ),
        }
    )
)
def test_mutated_index(index):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        clean(lambda: open_checkpoint(folder))


class _Hung(Exception):
    pass


@contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the run) when the body takes longer than `seconds`."""

    def alarm(signum, frame):
        raise _Hung(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


SPECIAL = ["regular", "link-outside", "link-to-folder", "dangling-link", "link-loop", "fifo", "folder", "empty"]


def make_special(path: Path, kind: str, scratch: Path) -> None:
    """Turn the file at `path` into `kind` (a symbolic link, a FIFO, a folder, ...)."""
    if kind == "regular":
        return
    data = path.read_bytes()
    path.unlink()
    if kind == "link-outside":
        outside = scratch / f"outside-{path.name}"
        outside.write_bytes(data)
        path.symlink_to(outside)
    elif kind == "link-to-folder":
        path.symlink_to(scratch)
    elif kind == "dangling-link":
        path.symlink_to(scratch / "nothing-here")
    elif kind == "link-loop":
        path.symlink_to(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"")


@SETTINGS
@given(st.lists(st.sampled_from(SPECIAL), min_size=4, max_size=4), st.booleans())
def test_links_and_special_files_in_a_base(kinds, sharded):
    """Shards, index and config as links (out of the folder, to folders, dangling, looping), FIFOs, folders:
    opening and planning end in a clean error or success, and never hang."""
    with tempfile.TemporaryDirectory() as d:
        scratch, folder = Path(d) / "scratch", Path(d) / "base"
        scratch.mkdir()
        folder.mkdir()
        shutil.copy(FIXTURES / "tiny-llama" / "config.json", folder / "config.json")
        if sharded:
            tensors = load_file(FIXTURES / "tiny-llama" / "model.safetensors")
            names = sorted(tensors)
            shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
            for shard, keys in shards.items():
                save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
            weight_map = {k: shard for shard, keys in shards.items() for k in keys}
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map})
            )
            files = [*shards, "model.safetensors.index.json", "config.json"]
        else:
            shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", folder / "model.safetensors")
            files = ["model.safetensors", "config.json"]
        for name, kind in zip(files, kinds):
            make_special(folder / name, kind, scratch)
        with no_hang():
            clean(lambda: plan_merge(folder, FIXTURES / "tiny-llama-rslora"))


# Pattern keys from a small regular-expression grammar over the pieces of module names.
atoms = st.sampled_from(
    [
        "q_proj",
        "o_proj",
        "down_proj",
        "layers",
        "model",
        "mlp",
        "self_attn",
        "0",
        "1",
        ".",
        "\\.",
        "\\d",
        "[0-9]",
        "[a-z_]",
        "proj",
        "_",
        "x",
    ]
)


def _regex(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, children).map("".join),
        st.tuples(children, children).map(lambda ab: f"({ab[0]}|{ab[1]})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "{1,3}", "*?"])).map(lambda x: f"({x[0]}){x[1]}"),
        children.map(lambda x: f"^{x}"),
    )


regex_keys = st.recursive(atoms, _regex, max_leaves=6)
MODULE_NAMES = [
    f"model.layers.{i}.{m}"
    for i in (0, 1)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@SETTINGS
@given(st.lists(regex_keys, min_size=1, max_size=4, unique=True), st.lists(st.integers(1, 16), min_size=4, max_size=4))
def test_pattern_keys_from_a_regex_grammar(keys, values):
    """Any key is refused with a clean error (invalid, or backtracking exponentially) or resolved, quickly,
    exactly as PEFT resolves it: the first key in file order for which `(.*\\.)?(key)$` matches."""
    import re

    config = {**VALID_CONFIG, "rank_pattern": {}, "alpha_pattern": dict(zip(keys, values))}
    try:
        parsed = parse_config(config)
    except RsloraError:
        return
    with no_hang():
        for name in MODULE_NAMES:
            expected = next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)
            assert pattern_key(keys, name) == expected
            assert parsed.scale_for(name).alpha == (
                config["alpha_pattern"][expected] if expected else parsed.lora_alpha
            )
