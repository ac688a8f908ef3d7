"""llama.cpp itself: the tool's GGUF LoRA files, and merged models, give PEFT's logits in the real runtime.

llama.cpp is the copy vendored in the llama-cpp-python sdist, built once by
`scripts/setup_llama_cpp.sh` (CI runs it; the build is cached). Base models are converted with
llama.cpp's own `convert_hf_to_gguf.py` (f32) and evaluated with an f32 KV cache; PEFT in fp32 on
the same token ids is the reference. Without the build the tests skip, unless
RSLORA_TOOLS_REQUIRE_LLAMA_CPP=1 (as in CI), where they fail instead.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_run
from peft import LoraConfig, PeftModel
from peft_oracle import make_adapter

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
CONVERTER_DIR = Path(
    os.environ.get("RSLORA_TOOLS_LLAMA_CPP_DIR")
    or Path(os.environ.get("RSLORA_TOOLS_CACHE", Path.home() / ".cache" / "rslora-tools"))
    / f"llama-cpp-python-{VERSION}"
    / "llama.cpp"
)
TOKENS = [1, 17, 42, 99, 300, 7, 256, 511, 3, 64, 128, 200, 5, 480]
TOLERANCE = 1e-4  # max |logit difference|; measured: at most 3e-6 (f32 weights, f32 KV cache)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _available() -> str | None:
    try:
        import llama_cpp  # noqa: F401
        import sentencepiece  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python or sentencepiece is not installed ({e}); run scripts/setup_llama_cpp.sh"
    if not (CONVERTER_DIR / "convert_hf_to_gguf.py").is_file():
        return f"{CONVERTER_DIR}/convert_hf_to_gguf.py is missing; run scripts/setup_llama_cpp.sh"
    return None


_MISSING = _available()
if _MISSING and os.environ.get("RSLORA_TOOLS_REQUIRE_LLAMA_CPP") == "1":
    raise RuntimeError(f"RSLORA_TOOLS_REQUIRE_LLAMA_CPP=1 but {_MISSING}")
pytestmark = [pytest.mark.llama_cpp, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]


def sentencepiece_tokenizer(folder: Path) -> None:
    """A tiny sentencepiece tokenizer (vocab 512), which convert_hf_to_gguf.py reads without a known BPE hash."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=512,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer(vocab_file=str(folder / "tokenizer.model")).save_pretrained(folder)


def make_model(folder: Path, kind: str, *, tie: bool = False, kv_heads: int = 2) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    folder.mkdir(parents=True)
    sentencepiece_tokenizer(folder)
    torch.manual_seed(0)
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        num_hidden_layers=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    if kind == "qwen2":  # random q/k/v biases, so that a wrong bias layout shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def to_gguf(model: Path, out: Path) -> Path:
    """llama.cpp's own converter, f32."""
    done = subprocess.run(
        [
            sys.executable,
            str(CONVERTER_DIR / "convert_hf_to_gguf.py"),
            str(model),
            "--outtype",
            "f32",
            "--outfile",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def llama_cpp_logits(model: Path, lora: Path | None = None) -> torch.Tensor:
    from llama_cpp import Llama

    kwargs = dict(model_path=str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    if lora is not None:
        kwargs["lora_path"] = str(lora)
    llm = Llama(**kwargs)
    llm.eval(TOKENS)
    logits = torch.tensor(llm.scores[: len(TOKENS)])
    llm.close()
    return logits


def peft_logits(base: Path, adapter: Path | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (HF folder, its f32 GGUF): Llama with GQA and with MHA, Qwen2 (q/k/v biases), a tied Llama."""
    root = tmp_path_factory.mktemp("llama-cpp-bases")
    specs = {
        "llama": ("llama", {}),
        "llama-mha": ("llama", {"kv_heads": 4}),
        "qwen2": ("qwen2", {}),
        "llama-tied": ("llama", {"tie": True}),
    }
    out = {}
    for name, (kind, kwargs) in specs.items():
        folder = make_model(root / name, kind, **kwargs)
        out[name] = (folder, to_gguf(folder, root / f"{name}.gguf"))
    return out


ADAPTERS = {
    "classic": dict(r=8, lora_alpha=16, target_modules=LINEAR),
    "rslora": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=LINEAR),
    "rslora-patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=LINEAR,
        rank_pattern={"o_proj": 4, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 8.5, "v_proj": 3},
    ),
    "embedding": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["embed_tokens", "q_proj"]),
    "lm_head": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["lm_head", "v_proj"]),
}
CASES = [("llama", name) for name in ADAPTERS] + [
    ("llama-mha", "rslora-patterns"),
    ("qwen2", "classic"),
    ("qwen2", "rslora-patterns"),
    ("qwen2", "embedding"),
]


@pytest.mark.parametrize(("base_name", "adapter_name"), CASES)
def test_gguf_lora_gives_peft_logits_in_llama_cpp(bases, tmp_path, base_name, adapter_name):
    base, base_gguf = bases[base_name]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(init_lora_weights=False, **ADAPTERS[adapter_name]))
    cli_run("convert", adapter, tmp_path / "lora.gguf", "--target", "llama.cpp", "--base", base)
    want = peft_logits(base, adapter)
    got = llama_cpp_logits(base_gguf, tmp_path / "lora.gguf")
    assert (want - peft_logits(base)).abs().max() > 0.1  # the adapter changes the model a lot
    assert (got - want).abs().max() < TOLERANCE


@pytest.mark.parametrize("adapter_name", ["rslora-patterns", "embedding", "lm_head"])
def test_a_merged_model_converted_to_gguf_gives_peft_logits(bases, tmp_path, adapter_name):
    base, _ = bases["llama"]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(init_lora_weights=False, **ADAPTERS[adapter_name]))
    cli_run("merge", base, adapter, tmp_path / "merged")
    got = llama_cpp_logits(to_gguf(tmp_path / "merged", tmp_path / "merged.gguf"))
    assert (got - peft_logits(base, adapter)).abs().max() < TOLERANCE


@pytest.mark.parametrize("adapter_name", ["rslora", "rslora-patterns"])
def test_llama_cpps_own_converter_applies_what_inspect_predicts(bases, tmp_path, adapter_name):
    """llama.cpp's convert_lora_to_gguf.py keeps alpha and the weights: llama.cpp then applies lora_alpha / rank
    (rank from each tensor), ignoring use_rslora and alpha_pattern, which is what `inspect` reports."""
    import json

    base, base_gguf = bases["llama"]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(init_lora_weights=False, **ADAPTERS[adapter_name]))
    done = subprocess.run(
        [
            sys.executable,
            str(CONVERTER_DIR / "convert_lora_to_gguf.py"),
            str(adapter),
            "--base",
            str(base),
            "--outtype",
            "f32",
            "--outfile",
            str(tmp_path / "theirs.gguf"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = llama_cpp_logits(base_gguf, tmp_path / "theirs.gguf")
    # The same adapter as PEFT would read a config of llama.cpp's rule: classic, alpha / r per module.
    served = tmp_path / "served"
    served.mkdir()
    (served / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(use_rslora=False, alpha_pattern={})
    (served / "adapter_config.json").write_text(json.dumps(config))
    assert (got - peft_logits(base, served)).abs().max() < TOLERANCE
    assert (got - peft_logits(base, adapter)).abs().max() > 0.1  # not PEFT's model
    report = json.loads(cli_run("inspect", adapter, "--json").stdout)
    peft_scale = {m["name"]: m["scale"] for m in report["modules"]}
    for m in report["modules"]:
        r = m["rank"]
        assert m["runtimes"]["llama.cpp"]["scale"] == 16 / r  # lora_alpha / rank from the shape
        assert m["runtimes"]["llama.cpp"]["ratio"] == (16 / r) / peft_scale[m["name"]]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_adapter_converted_with_initial_is_served_by_llama_cpp_on_the_original_base(bases, tmp_path, init):
    """PiSSA/OLoRA trained on a residual base: `convert --initial INIT --target llama.cpp` serves, on the original
    base's GGUF, PEFT's trained model (the trained adapter on the residual base it was trained on)."""
    from peft_oracle import make_init_variant

    base, base_gguf = bases["llama"]
    folder = make_init_variant(
        base,
        tmp_path / "variant",
        LoraConfig(
            r=8,
            lora_alpha=16,
            use_rslora=True,
            target_modules=LINEAR,
            init_lora_weights=init,
            rank_pattern={"o_proj": 4},
            alpha_pattern={"down_proj": 8.5},
        ),
        vocab=512,
        std=0.05,
    )
    cli_run(
        "convert",
        folder / "trained",
        tmp_path / "lora.gguf",
        "--initial",
        folder / "init",
        "--target",
        "llama.cpp",
        "--base",
        base,
    )
    config = LoraConfig.from_pretrained(folder / "trained")
    config.init_lora_weights = True  # the residual base is already residual
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder / "residual", dtype=torch.float32),
        str(folder / "trained"),
        config=config,
    )
    with torch.no_grad():
        want = model(torch.tensor([TOKENS])).logits[0].float()
    got = llama_cpp_logits(base_gguf, tmp_path / "lora.gguf")
    assert (want - peft_logits(base)).abs().max() > 0.1  # training moved the model
    assert (got - want).abs().max() < TOLERANCE


def test_embedding_lora_on_tied_embeddings_is_refused_because_llama_cpp_cannot_apply_it(bases, tmp_path):
    from rslora_tools.adapter.load import load_adapter
    from rslora_tools.adapter.module_scales import module_entries
    from rslora_tools.execute.gguf import GgufPlan, write_gguf
    from rslora_tools.formats.checkpoint import open_checkpoint

    base, base_gguf = bases["llama-tied"]
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(init_lora_weights=False, **ADAPTERS["embedding"]))
    result = cli_run("convert", adapter, tmp_path / "lora.gguf", "--target", "llama.cpp", "--base", base, code=1)
    assert "tied embeddings" in result.output and "merge" in result.output
    report = __import__("json").loads(cli_run("inspect", adapter, "--base", base, "--json", code=None).stdout)
    assert report["runtimes"]["llama.cpp"]["status"] == "cannot serve"
    # Written anyway (the plan without the refusal): llama.cpp refuses to load it.
    loaded = load_adapter(adapter)
    entries = module_entries(loaded)
    checkpoint = open_checkpoint(base)
    names = {
        "model.embed_tokens": "token_embd.weight",
        **{f"model.layers.{i}.self_attn.q_proj": f"blk.{i}.attn_q.weight" for i in range(2)},
    }
    plan = GgufPlan(
        "llama",
        0.0,
        {e.module.name: e.scale.scale for e in entries},
        config=checkpoint.config or {},
        permute_qk=True,
        name="x",
    )
    plan.tensors = [(e, names[e.module.name], checkpoint.info(e.module.name + ".weight").shape) for e in entries]
    write_gguf(plan, loaded, tmp_path / "forced.gguf")
    code = (
        "import sys; from llama_cpp import Llama\n"
        "Llama(model_path=sys.argv[1], lora_path=sys.argv[2], verbose=False, n_ctx=32).eval([1, 2, 3])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(base_gguf), str(tmp_path / "forced.gguf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0


def test_gguf_metadata_names_the_adapter_and_its_base(bases, tmp_path):
    import gguf

    base, _ = bases["llama"]
    adapter = make_adapter(base, tmp_path / "my-adapter", LoraConfig(init_lora_weights=False, **ADAPTERS["rslora"]))
    cli_run("convert", adapter, tmp_path / "lora.gguf", "--target", "llama.cpp", "--base", base)
    fields = gguf.GGUFReader(tmp_path / "lora.gguf").fields

    def text(key: str) -> str:
        return bytes(fields[key].parts[-1]).decode()

    assert text("general.name") == "my-adapter" and text("general.type") == "adapter"
    assert text("general.base_model.0.name") == str(base)
    assert int(fields["general.base_model.count"].parts[-1][0]) == 1
    tags = [bytes(fields["general.tags"].parts[i]).decode() for i in fields["general.tags"].data]
    assert tags == ["lora", "rslora"]
