"""Every bad input we know of gets one clear line, exit 1, no traceback, and nothing written.

The table in docs/reliability.md is generated from these cases; the test fails when the doc
drifts. Regenerate it with: RSLORA_TOOLS_WRITE_DOCS=1 pytest tests/safety/test_reliability.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from helpers import FIXTURES, ROOT
from safetensors.torch import load_file, save_file

from rslora_tools.cli import cli

DOC = ROOT / "docs" / "reliability.md"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def base_copy(tmp: Path) -> Path:
    dst = tmp / "base"
    if not dst.exists():
        shutil.copytree(FIXTURES / "tiny-llama", dst)
    return dst


def adapter_copy(tmp: Path) -> Path:
    dst = tmp / "adapter"
    if not dst.exists():
        shutil.copytree(FIXTURES / "tiny-llama-rslora", dst)
    return dst


def sharded_base(tmp: Path) -> Path:
    """The fixture base split into two shards with an index."""
    dst = tmp / "base"
    dst.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "tiny-llama" / name, dst / name)
    tensors = load_file(FIXTURES / "tiny-llama" / "model.safetensors")
    names = sorted(tensors)
    half = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, keys in half.items():
        save_file({k: tensors[k] for k in keys}, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return dst


def edit_index(tmp: Path, edit: Callable[[dict], None]) -> Path:
    base = sharded_base(tmp)
    path = base / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    return base


def edit_config(tmp: Path, edit: Callable[[dict], object]) -> Path:
    adapter = adapter_copy(tmp)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    result = edit(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg if result is None else result))
    return adapter


def edit_adapter_tensors(tmp: Path, edit: Callable[[dict], None]) -> Path:
    adapter = adapter_copy(tmp)
    tensors = load_file(adapter / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter


def raw_safetensors(path: Path, header: dict, data: bytes, n: int | None = None) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


def bad_base_file(tmp: Path, header: dict, data: bytes, n: int | None = None) -> Path:
    base = base_copy(tmp)
    raw_safetensors(base / "model.safetensors", header, data, n)
    return base


X = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def merge_args(base=None, adapter=None, *extra):
    def build(tmp: Path) -> list:
        return [
            "merge",
            base(tmp) if base else base_copy(tmp),
            adapter(tmp) if adapter else adapter_copy(tmp),
            tmp / "out",
            *extra,
        ]

    return build


def link_outside(tmp: Path) -> Path:
    base = sharded_base(tmp)
    outside = tmp / "elsewhere.safetensors"
    shard = base / "model-00002-of-00002.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return base


def duplicated_tensor(tmp: Path) -> Path:
    base = sharded_base(tmp)
    first = load_file(base / "model-00001-of-00002.safetensors")
    second = load_file(base / "model-00002-of-00002.safetensors")
    second[next(iter(first))] = next(iter(first.values()))
    save_file(second, base / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    return base


def mlx_adapter(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    """An mlx-lm adapter folder (rank 4 on one q_proj), its config edited."""

    def make(tmp: Path) -> Path:
        folder = tmp / "mlx-adapter"
        folder.mkdir()
        save_file(
            {
                "model.layers.0.self_attn.q_proj.lora_a": torch.zeros(32, 4),
                "model.layers.0.self_attn.q_proj.lora_b": torch.zeros(4, 32),
            },
            folder / "adapters.safetensors",
        )
        config = {
            "fine_tune_type": "lora",
            "num_layers": 2,
            "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0},
        }
        edit(config)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    return make


def pickle_only(tmp: Path) -> Path:
    adapter = adapter_copy(tmp)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    return adapter


def not_json_header(tmp: Path) -> Path:
    base = base_copy(tmp)
    (base / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    return base


def existing_out(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "mine.txt").write_text("keep me")
    return tmp / "out"


def linked_base(tmp: Path) -> list:
    """A single-file base whose model.safetensors is a link into folder S, merged into OUT = S."""
    store = tmp / "store"
    store.mkdir()
    shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", store / "weights.safetensors")
    base = tmp / "base"
    base.mkdir()
    shutil.copy(FIXTURES / "tiny-llama" / "config.json", base / "config.json")
    (base / "model.safetensors").symlink_to(store / "weights.safetensors")
    return ["merge", base, adapter_copy(tmp), store, "--overwrite"]


def hub_cache_blobs(tmp: Path) -> list:
    """BASE = snapshots/<rev> of a Hugging Face cache repo, OUT = that repo's blobs/."""
    import hashlib

    repo = tmp / "models--org--base"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (FIXTURES / "tiny-llama" / name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / sha)
    return ["merge", snapshot, adapter_copy(tmp), blobs, "--overwrite"]


def dangling_out(tmp: Path) -> list:
    (tmp / "out").symlink_to(tmp / "missing")
    return merge_args()(tmp)


def fifo_shard(tmp: Path) -> Path:
    """A base whose shard is a FIFO: opening it for reading would wait for a writer forever."""
    base = sharded_base(tmp)
    shard = base / "model-00002-of-00002.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    return base


def both_single_and_index(tmp: Path) -> Path:
    base = sharded_base(tmp)
    shutil.copy(FIXTURES / "tiny-llama" / "model.safetensors", base / "model.safetensors")
    return base


def index_naming_a_side_file(name: str):
    def build(tmp: Path) -> Path:
        base = sharded_base(tmp)
        shard = base / "model-00002-of-00002.safetensors"
        shard.rename(base / name)
        edit = json.loads((base / "model.safetensors.index.json").read_text())
        edit["weight_map"] = {k: (name if v == shard.name else v) for k, v in edit["weight_map"].items()}
        (base / "model.safetensors.index.json").write_text(json.dumps(edit))
        return base

    return build


def integer_base_weight(tmp: Path) -> Path:
    """The weight a LoRA module targets is stored as int64."""
    base = base_copy(tmp)
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


def deeply_nested_config(tmp: Path) -> Path:
    base = base_copy(tmp)
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return base


def pissa_init(edit: Callable[[dict], None]):
    """merge args for a PiSSA adapter with --initial: a copy of it as INIT, its config edited by `edit`."""

    def build(tmp: Path) -> list:
        adapter = edit_config(tmp, lambda c: c.update(init_lora_weights="pissa"))
        init = tmp / "init"
        shutil.copytree(adapter, init)
        cfg = json.loads((init / "adapter_config.json").read_text())
        edit(cfg)
        (init / "adapter_config.json").write_text(json.dumps(cfg))
        return ["merge", base_copy(tmp), adapter, tmp / "out", "--initial", init]

    return build


def two_adapters_saving_lm_head(tmp: Path) -> list:
    first = edit_adapter_tensors(tmp, lambda x: x.update({"base_model.model.lm_head.weight": torch.zeros(64, 32)}))
    second = tmp / "second"
    shutil.copytree(first, second)
    return ["merge", base_copy(tmp), first, second, tmp / "out"]


def side_file_link(where: str, name: str):
    """A side file (tokenizer, chat template) of BASE or ADAPTER that is a symbolic link to a file outside it."""

    def build(tmp: Path) -> Path:
        folder = base_copy(tmp) if where == "base" else adapter_copy(tmp)
        secret = tmp / "secret.txt"
        secret.write_text("a private file")
        (folder / name).unlink(missing_ok=True)  # the fixture's own tokenizer.json, replaced by the link
        (folder / name).symlink_to(secret)
        return folder

    return build


def hidden_shard(tmp: Path) -> Path:
    """A sharded base whose second shard is named like a hidden file (a push would skip it)."""
    return index_naming_a_side_file(".model-00002-of-00002.safetensors")(tmp)


def out_holding(kind: str):
    """An OUT that rslora-tools did not write: a PEFT adapter (a forgotten OUT) or a model."""

    def build(tmp: Path) -> Path:
        out = tmp / "out"
        shutil.copytree(FIXTURES / ("tiny-llama-rslora" if kind == "adapter" else "tiny-llama"), out)
        return out

    return build


def converted_adapter(tmp: Path) -> Path:
    """An adapter rslora-tools wrote (a `convert` output), where a merge's OUT was forgotten."""
    out = tmp / "out"
    CliRunner().invoke(cli, ["convert", str(FIXTURES / "tiny-llama-rslora"), str(out), "--to-classic"])
    assert (out / "rslora_tools.json").exists()
    return out


def converted_merge(tmp: Path) -> Path:
    """A merged folder rslora-tools wrote (it records its base)."""
    out = tmp / "merged"
    CliRunner().invoke(cli, ["merge", str(FIXTURES / "tiny-llama"), str(FIXTURES / "tiny-llama-rslora"), str(out)])
    assert (out / "rslora_tools.json").exists()
    return out


def gguf_args(edit: Callable[[dict], None]) -> Callable[[Path], list]:
    """convert --target llama.cpp into a .gguf file, with BASE's config.json edited."""

    def build(tmp: Path) -> list:
        base = base_copy(tmp)
        cfg = json.loads((base / "config.json").read_text())
        edit(cfg)
        (base / "config.json").write_text(json.dumps(cfg))
        return ["convert", adapter_copy(tmp), tmp / "out.gguf", "--target", "llama.cpp", "--base", base]

    return build


def foreign_gguf(tmp: Path) -> list:
    (tmp / "model-q4.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    return [
        "convert",
        adapter_copy(tmp),
        tmp / "model-q4.gguf",
        "--target",
        "llama.cpp",
        "--base",
        base_copy(tmp),
        "--overwrite",
    ]


def gptq(edit: Callable[[dict, dict], None]) -> Callable[[Path], list]:
    """A GPTQ base (one layer, known codes) and a LoRA for it, with its tensors or config edited."""

    def build(tmp: Path) -> list:
        from quant_builders import _gptq_checkpoint, _lora_for_proj

        base, _ = _gptq_checkpoint(tmp / "base", 4, "gptq", False)
        tensors = load_file(base / "model.safetensors")
        cfg = json.loads((base / "config.json").read_text())
        edit(tensors, cfg)
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        (base / "config.json").write_text(json.dumps(cfg))
        return ["merge", base, _lora_for_proj(tmp / "adapter", 24, 64), tmp / "out"]

    return build


_BNB: dict[str, Path] = {}


def bnb(kind: str, edit: Callable[[dict], None]) -> Callable[[Path], list]:
    """A bitsandbytes base (nf4 or int8, saved by transformers from the fixture) with one of its tensors edited."""

    def build(tmp: Path) -> list:
        if kind not in _BNB:
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig

            config = (
                BitsAndBytesConfig(load_in_8bit=True)
                if kind == "int8"
                else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            )
            _BNB[kind] = Path(tempfile.mkdtemp(prefix=f"rslora-tools-{kind}-"))
            AutoModelForCausalLM.from_pretrained(
                FIXTURES / "tiny-llama", dtype=torch.bfloat16, quantization_config=config
            ).save_pretrained(_BNB[kind])
        base = tmp / "base"
        shutil.copytree(_BNB[kind], base)
        tensors = load_file(base / "model.safetensors")
        edit(tensors)
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
        return ["merge", base, adapter_copy(tmp), tmp / "out"]

    return build


def huge_weights_combine(tmp: Path) -> list:
    return ["combine", adapter_copy(tmp), adapter_copy(tmp), tmp / "out", "--weights", "3e38,3e38"]


def extract_from_inf(tmp: Path) -> list:
    tuned = tmp / "tuned"
    shutil.copytree(FIXTURES / "tiny-llama", tuned)
    tensors = load_file(tuned / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    return ["extract", base_copy(tmp), tuned, tmp / "out"]


Q_PROJ = "model.layers.0.self_attn.q_proj"


def nonfinite(value: float):
    def edit(t):
        t[Q_A][0, 0] = value

    return lambda tmp: edit_adapter_tensors(tmp, edit)


# (what, how the input is broken, the command to run)
CASES: list[tuple[str, Callable[[Path], list]]] = [
    ("base shard truncated", merge_args(lambda t: bad_base_file(t, {"x": X}, b"\0" * 4))),
    ("header length past the end of the file", merge_args(lambda t: bad_base_file(t, {"x": X}, b"\0" * 8, n=10**6))),
    ("huge header length", merge_args(lambda t: bad_base_file(t, {"x": X}, b"\0" * 8, n=10**9))),
    ("header is not JSON", merge_args(lambda t: not_json_header(t))),
    (
        "tensor offsets overlap",
        merge_args(lambda t: bad_base_file(t, {"x": X, "y": {**X, "data_offsets": [4, 12]}}, b"\0" * 12)),
    ),
    (
        "tensor offsets leave a hole",
        merge_args(lambda t: bad_base_file(t, {"x": {**X, "data_offsets": [4, 12]}}, b"\0" * 12)),
    ),
    (
        "dtype does not match the byte count",
        merge_args(lambda t: bad_base_file(t, {"x": {**X, "data_offsets": [0, 12]}}, b"\0" * 12)),
    ),
    ("unknown dtype", merge_args(lambda t: bad_base_file(t, {"x": {**X, "dtype": "Q4"}}, b"\0" * 8))),
    (
        "shard listed in the index is missing",
        merge_args(lambda t: (sharded_base(t) / "model-00002-of-00002.safetensors").unlink() or t / "base"),
    ),
    (
        "tensor in a shard but not in the index",
        merge_args(lambda t: edit_index(t, lambda i: i["weight_map"].pop(next(iter(i["weight_map"]))))),
    ),
    ("tensor duplicated across shards", merge_args(duplicated_tensor)),
    (
        "index maps a tensor to the wrong shard",
        merge_args(
            lambda t: edit_index(
                t, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "model-00002-of-00002.safetensors"})
            )
        ),
    ),
    (
        "index names a file with ../",
        merge_args(
            lambda t: edit_index(
                t, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../evil.safetensors"})
            )
        ),
    ),
    (
        "index names an absolute path",
        merge_args(
            lambda t: edit_index(t, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "/etc/passwd"}))
        ),
    ),
    ("shard is a symlink out of the folder", merge_args(link_outside)),
    ("index without weight_map", merge_args(lambda t: edit_index(t, lambda i: i.pop("weight_map")))),
    (
        "base exists only as a pickle",
        merge_args(
            lambda t: ((base_copy(t) / "model.safetensors").rename(t / "base" / "pytorch_model.bin"), t / "base")[1]
        ),
    ),
    (
        "config says GPTQ, weights are not quantized",
        merge_args(
            lambda t: (
                (base_copy(t) / "config.json").write_text(
                    json.dumps({"quantization_config": {"quant_method": "gptq"}})
                ),
                t / "base",
            )[1]
        ),
    ),
    (
        "base quantized with an unsupported method",
        merge_args(
            lambda t: (
                (base_copy(t) / "config.json").write_text(
                    json.dumps({"quantization_config": {"quant_method": "hqq"}})
                ),
                t / "base",
            )[1]
        ),
    ),
    (
        "adapter_config.json is not JSON",
        merge_args(
            adapter=lambda t: ((adapter_copy(t) / "adapter_config.json").write_text("{oops"), t / "adapter")[1]
        ),
    ),
    ("adapter_config.json is a list", merge_args(adapter=lambda t: edit_config(t, lambda c: [c]))),
    (
        "adapter_config.json without peft_type",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.pop("peft_type") and None)),
    ),
    ("unknown peft_type", merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(peft_type="BOFT")))),
    ("r is a string", merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(r="8")))),
    (
        "lora_alpha is not a number",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(lora_alpha=None) or c.update(lora_alpha=[16]))),
    ),
    (
        "rank_pattern value is not a positive integer",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(rank_pattern={"o_proj": 0}))),
    ),
    (
        "pattern key is not a valid regex",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(alpha_pattern={"o_proj(": 4}))),
    ),
    (
        "rank in config disagrees with the tensors",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(r=16))),
    ),
    (
        "layer_replication (cannot be merged)",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(layer_replication=[[0, 1]]))),
    ),
    (
        "PiSSA adapter not converted",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(init_lora_weights="pissa"))),
    ),
    ("--initial INIT with another lora_alpha than the adapter", pissa_init(lambda c: c.update(lora_alpha=7))),
    ("--initial INIT of another variant", pissa_init(lambda c: c.update(init_lora_weights="olora"))),
    (
        "--initial with a plain LoRA adapter",
        lambda t: ["merge", base_copy(t), adapter_copy(t), t / "out", "--initial", adapter_copy(t)],
    ),
    ("--initial and --base-is-residual together", lambda t: [*pissa_init(lambda c: None)(t), "--base-is-residual"]),
    ("two adapters save the same tensor (modules_to_save)", two_adapters_saving_lm_head),
    (
        "--weights with the wrong count",
        lambda t: ["merge", base_copy(t), adapter_copy(t), adapter_copy(t), t / "out", "--weights", "1,2,3"],
    ),
    (
        "combine --method ties without --density",
        lambda t: ["combine", adapter_copy(t), adapter_copy(t), t / "out", "--method", "ties"],
    ),
    ("combine --rank without --method svd", lambda t: ["combine", adapter_copy(t), t / "out", "--rank", "4"]),
    ("extract from two identical models", lambda t: ["extract", base_copy(t), base_copy(t), t / "out"]),
    (
        "extract with both --rank and --energy",
        lambda t: ["extract", base_copy(t), base_copy(t), t / "out", "--rank", "4", "--energy", "0.9"],
    ),
    ("NaN in adapter weights", merge_args(adapter=nonfinite(float("nan")))),
    ("Inf in adapter weights", merge_args(adapter=nonfinite(float("inf")))),
    (
        "adapter tensor with an impossible shape",
        merge_args(adapter=lambda t: edit_adapter_tensors(t, lambda x: x.update({Q_A: torch.zeros(8)}))),
    ),
    (
        "LoRA A without B",
        merge_args(adapter=lambda t: edit_adapter_tensors(t, lambda x: x.pop(Q_A.replace("lora_A", "lora_B")))),
    ),
    (
        "adapter module not in the base",
        merge_args(
            adapter=lambda t: edit_adapter_tensors(
                t,
                lambda x: [
                    x.update({k.replace("layers.0.", "layers.9."): x.pop(k)})
                    for k in list(x)
                    if "layers.0.self_attn.q_proj" in k
                ],
            )
        ),
    ),
    (
        "LoRA shapes do not fit the base weight",
        merge_args(
            adapter=lambda t: edit_adapter_tensors(
                t, lambda x: x.update({Q_A.replace("lora_A", "lora_B"): torch.zeros(40, 8)})
            )
        ),
    ),
    (
        "adapter safetensors header corrupt",
        merge_args(
            adapter=lambda t: (
                raw_safetensors(adapter_copy(t) / "adapter_model.safetensors", {"x": X}, b"\0" * 4),
                t / "adapter",
            )[1]
        ),
    ),
    ("adapter only as a pickle (adapter_model.bin)", merge_args(adapter=pickle_only)),
    ("adapter folder without adapter_config.json", merge_args(adapter=lambda t: (t / "empty").mkdir() or t / "empty")),
    ("mlx-lm full fine-tune as ADAPTER", merge_args(adapter=mlx_adapter(lambda c: c.update(fine_tune_type="full")))),
    (
        "mlx-lm adapter with alpha instead of scale",
        merge_args(
            adapter=mlx_adapter(lambda c: c["lora_parameters"].update(alpha=16) or c["lora_parameters"].pop("scale"))
        ),
    ),
    (
        "mlx-lm adapter whose factors have another rank",
        merge_args(adapter=mlx_adapter(lambda c: c["lora_parameters"].update(rank=8))),
    ),
    ("OUT inside an input", lambda t: ["merge", base_copy(t), adapter_copy(t), t / "base" / "out"]),
    ("OUT exists and is not empty", lambda t: [*merge_args()(t)[:3], existing_out(t)]),
    ("OUT holds the real file of a linked base shard (--overwrite)", linked_base),
    ("OUT is the Hugging Face cache blobs folder of BASE (--overwrite)", hub_cache_blobs),
    ("OUT is a link to a missing folder", dangling_out),
    ("base shard is a FIFO (would block forever)", merge_args(fifo_shard)),
    ("base holds model.safetensors and an index", merge_args(both_single_and_index)),
    ("index names a shard tokenizer.json", merge_args(index_naming_a_side_file("tokenizer.json"))),
    ("index names a shard rslora_tools.json", merge_args(index_naming_a_side_file("rslora_tools.json"))),
    (
        "index names a shard with a NUL byte",
        merge_args(
            lambda t: edit_index(
                t, lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "model\0.safetensors"})
            )
        ),
    ),
    ("config.json nested too deeply", merge_args(deeply_nested_config)),
    ("LoRA on an int64 base weight", merge_args(integer_base_weight)),
    (
        "pattern key that backtracks exponentially",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(alpha_pattern={"(.*)*z": 4}))),
    ),
    (
        "lora_alpha 1e308 (merged weights overflow)",
        merge_args(adapter=lambda t: edit_config(t, lambda c: c.update(lora_alpha=1e308))),
    ),
    ("BASE neither a folder nor a repo id", lambda t: ["merge", "not a repo!", adapter_copy(t), t / "out"]),
    # Trust, round three (issue 23): what commands copy, overwrite and write
    (
        "adapter's chat template is a link out of its folder",
        merge_args(adapter=side_file_link("adapter", "chat_template.jinja")),
    ),
    ("base's tokenizer.json is a link out of its folder", merge_args(side_file_link("base", "tokenizer.json"))),
    (
        "convert: adapter's tokenizer.json is a link out of its folder",
        lambda t: ["convert", side_file_link("adapter", "tokenizer.json")(t), t / "out", "--target", "vllm"],
    ),
    ("base shard named like a hidden file", merge_args(hidden_shard)),
    (
        "--overwrite of a PEFT adapter rslora-tools did not write (OUT forgotten)",
        lambda t: ["merge", base_copy(t), adapter_copy(t), out_holding("adapter")(t), "--overwrite"],
    ),
    (
        "combine --overwrite of a PEFT adapter (OUT forgotten)",
        lambda t: ["combine", adapter_copy(t), out_holding("adapter")(t), "--overwrite"],
    ),
    (
        "merge --overwrite of an adapter rslora-tools wrote (OUT forgotten)",
        lambda t: ["merge", base_copy(t), adapter_copy(t), converted_adapter(t), "--overwrite"],
    ),
    ("OUT is the current directory", lambda t: ["merge", base_copy(t), adapter_copy(t), "."]),
    ("extract with an FP8 BASE", lambda t: ["extract", FIXTURES / "tiny-llama-fp8", base_copy(t), t / "out"]),
    ("merge ADAPTER BASE OUT (the order swapped)", lambda t: ["merge", adapter_copy(t), base_copy(t), t / "out"]),
    (
        "verify BASE MERGED ADAPTER (MERGED records its base)",
        lambda t: ["verify", base_copy(t), converted_merge(t), adapter_copy(t)],
    ),
    ("inspect BASE --base ADAPTER", lambda t: ["inspect", base_copy(t), "--base", adapter_copy(t)]),
    (
        "a mistyped adapter path next to a base (no base is suggested)",
        lambda t: ["merge", base_copy(t), t / "bse", t / "out"],
    ),
    (
        "--overwrite of a model rslora-tools did not write",
        lambda t: ["merge", base_copy(t), adapter_copy(t), out_holding("model")(t), "--overwrite"],
    ),
    ("--overwrite of a GGUF file rslora-tools did not write", foreign_gguf),
    ("combine --weights 3e38 (factors overflow)", huge_weights_combine),
    (
        "convert --target sglang with lora_alpha 1e308",
        lambda t: ["convert", edit_config(t, lambda c: c.update(lora_alpha=1e308)), t / "out", "--target", "sglang"],
    ),
    (
        "convert --to-classic with lora_alpha 1e308",
        lambda t: ["convert", edit_config(t, lambda c: c.update(lora_alpha=1e308)), t / "out", "--to-classic"],
    ),
    (
        "GGUF with lora_alpha 1e308",
        lambda t: [
            "convert",
            edit_config(t, lambda c: c.update(lora_alpha=1e308)),
            t / "out.gguf",
            "--target",
            "llama.cpp",
            "--base",
            base_copy(t),
        ],
    ),
    ("extract from a TUNED with an Inf weight", extract_from_inf),
    ("GGUF: config says 1e6 layers", gguf_args(lambda c: c.update(num_hidden_layers=1_000_000))),
    ("GGUF: num_attention_heads 0", gguf_args(lambda c: c.update(num_attention_heads=0))),
    ("GGUF: num_attention_heads 5 (does not divide the rows)", gguf_args(lambda c: c.update(num_attention_heads=5))),
    ('GGUF: num_attention_heads "x"', gguf_args(lambda c: c.update(num_attention_heads="x"))),
    (
        "nf4 base: absmax too short",
        bnb("nf4", lambda t: t.update({f"{Q_PROJ}.weight.absmax": t[f"{Q_PROJ}.weight.absmax"][:-1].clone()})),
    ),
    (
        "nf4 base: packed weight too short",
        bnb("nf4", lambda t: t.update({f"{Q_PROJ}.weight": t[f"{Q_PROJ}.weight"][:-2].clone()})),
    ),
    ("int8 base: SCB too short", bnb("int8", lambda t: t.update({f"{Q_PROJ}.SCB": t[f"{Q_PROJ}.SCB"][:-1].clone()}))),
    ("GPTQ: g_idx out of range", gptq(lambda t, c: t["model.proj.g_idx"].__setitem__(0, 99))),
    (
        "GPTQ: too few scale groups",
        gptq(lambda t, c: t.update({"model.proj.scales": t["model.proj.scales"][:2].clone()})),
    ),
    (
        "GPTQ: 1-D qweight",
        gptq(lambda t, c: t.update({"model.proj.qweight": t["model.proj.qweight"].reshape(-1).clone()})),
    ),
    ('GPTQ: bits "4" (a string)', gptq(lambda t, c: c["quantization_config"].update(bits="4"))),
]


def normalize(text: str, tmp: Path) -> str:
    text = text.replace(str(tmp.resolve()), "<tmp>").replace(str(tmp), "<tmp>").replace(str(FIXTURES), "<fixtures>")
    text = re.sub(r"\(\[Errno \d+\] ", "(", text)
    return text.removeprefix("Error: ").strip()


class _Hung(Exception):
    pass


def _hung(signum, frame):
    raise _Hung("the command did not finish within 60 s")


def run_case(build, tmp: Path) -> tuple[int, str]:
    args = [str(a) for a in build(tmp)]
    before = {p for p in tmp.rglob("*")}
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(60)  # a hang fails the test instead of the whole run
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not isinstance(result.exception, _Hung), args
    after = {p for p in tmp.rglob("*")}
    assert after == before, f"something was written: {sorted(map(str, after - before))}"
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("Warning:")]
    assert result.exit_code in (1, 2), result.output
    if result.exit_code == 2:  # a usage error: click's usage line and hint, then the one error line
        assert lines[0].startswith(f"Usage: rslora-tools {args[0]} ") and lines[1].startswith("Try ") and not lines[2]
        lines = lines[3:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output and "unexpected" not in lines[0], result.output
    return result.exit_code, normalize(lines[0], tmp)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> list[tuple[str, int, str]]:
    rows = []
    for i, (what, build) in enumerate(CASES):
        tmp = tmp_path_factory.mktemp(f"case{i}")
        code, message = run_case(build, tmp)
        rows.append((what, code, message))
    return rows


BEGIN = "<!-- generated by tests/safety/test_reliability.py: do not edit below -->"
END = "<!-- end of the generated table -->"


def render(rows: list[tuple[str, int, str]]) -> str:
    """The generated part of docs/reliability.md: the table of bad inputs, their exit codes and exact messages."""
    lines = [
        BEGIN,
        "",
        "| bad input | exit | message |",
        "|---|---|---|",
    ]
    for what, code, message in rows:
        escaped = message.replace("|", "\\|")
        lines.append(f"| {what} | {code} | {escaped} |")
    return "\n".join(lines + ["", END])


def test_every_bad_input_gets_one_clear_line_and_the_doc_is_current(table):
    text = DOC.read_text()
    assert BEGIN in text and END in text, "docs/reliability.md lost its generated-table markers"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    current = before + render(table) + after
    if os.environ.get("RSLORA_TOOLS_WRITE_DOCS") == "1":
        DOC.write_text(current)
        text = current
    assert text == current, "docs/reliability.md is out of date; run with RSLORA_TOOLS_WRITE_DOCS=1"
