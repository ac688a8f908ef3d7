"""`merge BASE ADAPTER... OUT.gguf`: straight into a llama.cpp file, byte for byte the two-step route's.

The two-step route is `rslora-tools merge BASE ADAPTER MERGED` then llama.cpp's own `convert_hf_to_gguf.py
MERGED --outtype T` (the llama.cpp vendored in llama-cpp-python 0.3.36, built by scripts/setup_llama_cpp.sh);
the direct GGUF must be the same file, and llama.cpp must serve it as PEFT serves the adapter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_run
from peft import LoraConfig
from peft_oracle import make_adapter, make_init_variant
from test_llama_cpp import (
    _MISSING,
    ADAPTERS,
    CONVERTER_DIR,
    LINEAR,
    TOLERANCE,
    llama_cpp_logits,
    make_model,
    peft_logits,
)

pytestmark = [pytest.mark.llama_cpp, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-merge-bases")
    specs = {
        "llama": ("llama", {}),
        "llama-mha": ("llama", {"kv_heads": 4}),
        "qwen2": ("qwen2", {}),
        "llama-tied": ("llama", {"tie": True}),
    }
    return {name: make_model(root / name, kind, **kwargs) for name, (kind, kwargs) in specs.items()}


def two_step(base: Path, adapters: list[Path], folder: Path, outtype: str, *flags: object) -> bytes:
    """merge into a folder named `merged`, then llama.cpp's converter on it."""
    cli_run("merge", base, *adapters, folder / "merged", *flags)
    done = subprocess.run(
        [
            sys.executable,
            str(CONVERTER_DIR / "convert_hf_to_gguf.py"),
            str(folder / "merged"),
            "--outtype",
            outtype,
            "--outfile",
            str(folder / "two-step.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return (folder / "two-step.gguf").read_bytes()


def direct(base: Path, adapters: list[Path], folder: Path, outtype: str, *flags: object) -> bytes:
    (folder / "direct").mkdir(parents=True)
    out = folder / "direct" / "merged.gguf"
    result = cli_run("merge", base, *adapters, out, "--outtype", outtype, *flags)
    assert "next: K-quants with an importance matrix" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged.gguf"]  # nothing else left behind
    return out.read_bytes()


def adapter(base: Path, folder: Path, name: str, **kwargs) -> Path:
    return make_adapter(base, folder, LoraConfig(init_lora_weights=False, **ADAPTERS[name]), **kwargs)


@pytest.mark.parametrize(
    ("base_name", "adapter_name", "outtype"),
    [
        ("llama", "rslora-patterns", "f16"),
        ("llama", "rslora-patterns", "bf16"),
        ("llama", "rslora-patterns", "f32"),
        ("llama", "rslora-patterns", "q8_0"),
        ("llama-mha", "rslora", "f16"),
        ("qwen2", "rslora-patterns", "f16"),
        ("qwen2", "embedding", "q8_0"),
        ("llama-tied", "lm_head", "f16"),
        ("llama-tied", "classic", "bf16"),
    ],
)
def test_the_direct_gguf_is_the_two_step_gguf_byte_for_byte(bases, tmp_path, base_name, adapter_name, outtype):
    base = bases[base_name]
    lora = adapter(base, tmp_path / "adapter", adapter_name)
    assert direct(base, [lora], tmp_path, outtype) == two_step(base, [lora], tmp_path, outtype)


def test_a_grown_vocabulary(bases, tmp_path):
    base = bases["llama"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        modules_to_save=["embed_tokens", "lm_head"],
    )
    lora = make_adapter(base, tmp_path / "adapter", config, prepare=lambda model: model.resize_token_embeddings(520))
    assert direct(base, [lora], tmp_path, "f16") == two_step(base, [lora], tmp_path, "f16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == 520


def test_several_adapters_qlora_as_trained_and_initial(bases, tmp_path):
    base = bases["llama"]
    first, second = adapter(base, tmp_path / "a1", "classic"), adapter(base, tmp_path / "a2", "rslora", seed=2)
    assert direct(base, [first, second], tmp_path / "stacked", "f16", "--weights", "0.7,0.4") == two_step(
        base, [first, second], tmp_path / "stacked", "f16", "--weights", "0.7,0.4"
    )
    assert direct(base, [first], tmp_path / "qlora", "f16", "--trained-on", "nf4") == two_step(
        base, [first], tmp_path / "qlora", "f16", "--trained-on", "nf4"
    )
    variant = make_init_variant(
        base,
        tmp_path / "variant",
        LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=LINEAR, init_lora_weights="pissa"),
        vocab=512,
        std=0.05,
    )
    init = ("--initial", variant / "init")
    assert direct(base, [variant / "trained"], tmp_path / "pissa", "f16", *init) == two_step(
        base, [variant / "trained"], tmp_path / "pissa", "f16", *init
    )


@pytest.mark.parametrize("adapter_name", ["rslora-patterns", "embedding", "lm_head"])
def test_llama_cpp_serves_the_direct_gguf_as_peft_serves_the_adapter(bases, tmp_path, adapter_name):
    base = bases["llama"]
    lora = adapter(base, tmp_path / "adapter", adapter_name)
    cli_run("merge", base, lora, tmp_path / "merged.gguf", "--outtype", "f32")
    want = peft_logits(base, lora)
    assert (want - peft_logits(base)).abs().max() > 0.1
    assert (llama_cpp_logits(tmp_path / "merged.gguf") - want).abs().max() < TOLERANCE


def test_a_dry_run_states_the_size_and_writes_nothing(bases, tmp_path):
    base = bases["llama"]
    lora = adapter(base, tmp_path / "adapter", "rslora")
    report = json.loads(cli_run("merge", base, lora, tmp_path / "m.gguf", "--dry-run", "--json").output)
    assert report["gguf"]["outtype"] == "f16" and report["free_bytes"] > 0
    assert not (tmp_path / "m.gguf").exists()
    cli_run("merge", base, lora, tmp_path / "m.gguf")
    assert abs(report["bytes_written"] - (tmp_path / "m.gguf").stat().st_size) < 64 * 1024  # tensors + metadata
    text = cli_run("merge", base, lora, tmp_path / "m2.gguf", "--dry-run").output
    assert "disk: writes" in text and "free" in text


def test_an_architecture_the_converter_lacks_names_the_two_step_route(bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(bases["llama"], base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (base / "config.json").write_text(json.dumps(config))
    lora = adapter(bases["llama"], tmp_path / "adapter", "classic")
    result = cli_run("merge", base, lora, tmp_path / "m.gguf", code=1)
    assert (
        "does not support NoSuchModelForCausalLM" in result.output and "convert_hf_to_gguf.py MERGED" in result.output
    )
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    "flags, says",
    [
        (("--verify",), "--verify does not go with a .gguf OUT"),
        (("--llama-cpp", "/nonexistent"), "no llama.cpp checkout here"),
        (("--outtype", "q4_k"), "q4_k"),
    ],
)
def test_gguf_options_are_checked(bases, tmp_path, flags, says):
    lora = adapter(bases["llama"], tmp_path / "adapter", "classic")
    result = cli_run("merge", bases["llama"], lora, tmp_path / "m.gguf", *flags, code=None)
    assert result.exit_code != 0 and says in result.output and not (tmp_path / "m.gguf").exists()


def test_without_a_gguf_out_the_outtype_is_refused(bases, tmp_path):
    lora = adapter(bases["llama"], tmp_path / "adapter", "classic")
    result = cli_run("merge", bases["llama"], lora, tmp_path / "folder", "--outtype", "f16", code=2)
    assert "--outtype" in result.output


def test_a_hub_base_gives_the_same_gguf(bases, tmp_path, fake_hub):
    base = bases["qwen2"]
    lora = adapter(base, tmp_path / "adapter", "rslora-patterns")
    fake_hub.upload_local_folder("org/base", base)
    cli_run("merge", "org/base", lora, tmp_path / "hub" / "merged.gguf")
    assert (tmp_path / "hub" / "merged.gguf").read_bytes() == direct(base, [lora], tmp_path / "local", "f16")


def test_a_streamed_hub_base_gives_the_same_gguf_and_leaves_no_shard_behind(bases, tmp_path, fake_hub, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rslora_tools.hub.transfer import ShardFetcher

    on_disk: list[int] = []
    fetch = ShardFetcher.fetch

    def counting_fetch(self, shard):
        fetched = fetch(self, shard)
        on_disk.append(len(list(self.scratch.rglob("*.safetensors"))))
        return fetched

    monkeypatch.setattr(ShardFetcher, "fetch", counting_fetch)

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(bases["llama"]).save_pretrained(base, max_shard_size="150KB")
    for side in bases["llama"].iterdir():
        if side.name.startswith("tokenizer") or side.name == "special_tokens_map.json":
            shutil.copyfile(side, base / side.name)
    assert len(list(base.glob("*.safetensors"))) > 2
    lora = adapter(base, tmp_path / "adapter", "rslora-patterns")
    fake_hub.upload_local_folder("org/sharded", base)
    scratch = tmp_path / "scratch"
    dry = cli_run(
        "merge", "org/sharded", lora, tmp_path / "hub" / "merged.gguf", "--stream", "--scratch", scratch, "--dry-run"
    ).output
    assert "streamed: base shards fetched as needed" in dry and not scratch.exists()
    cli_run("merge", "org/sharded", lora, tmp_path / "hub" / "merged.gguf", "--stream", "--scratch", scratch)
    assert not scratch.exists()  # every fetched shard deleted, the scratch folder removed
    assert len(on_disk) == len(list(base.glob("*.safetensors"))) and max(on_disk) <= 2  # one or two shards at a time
    assert (tmp_path / "hub" / "merged.gguf").read_bytes() == direct(base, [lora], tmp_path / "local", "f16")


def test_the_readme_row_runs_on_the_shipped_fixtures_and_a_base_without_a_tokenizer_is_one_true_line(tmp_path):
    """`merge BASE ADAPTER OUT.gguf` on fixtures/tiny-llama said "install sentencepiece" (it was installed): the
    fixture
    had no tokenizer. It ships one now; a base without one is named as such (issue 36)."""
    from helpers import ADAPTER, BASE

    cli_run("merge", BASE, ADAPTER, tmp_path / "merged.gguf")
    assert (tmp_path / "merged.gguf").stat().st_size > 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(BASE / name, bare / name)
    line = cli_run("merge", bare, ADAPTER, tmp_path / "bare.gguf", code=1).output
    assert "llama.cpp's converter cannot read BASE's tokenizer (it has no tokenizer files" in line
    assert "BASE needs the model's tokenizer files" in line and not (tmp_path / "bare.gguf").exists()
