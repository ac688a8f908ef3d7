"""Quantized-base benchmark: FP8 and MXFP4 merges against a plain bf16 merge of the same model, in one run.

    pip install torch==2.13.0 -e '.[test]' && python benchmarks/quant_bench.py

Builds (once, cached in benchmarks/.cache) two families at about 1B parameters and at twice the depth:
  fp8     the TinyLlama-shaped bf16 checkpoint of merge_bench.py, and the same weights as block-scaled FP8
          (128x128 blocks, quantized by rslora-tools' Fp8Quantize-equivalent); an r=16 rsLoRA adapter on all
          linear layers (PEFT)
  mxfp4   a gpt-oss-shaped checkpoint (32 experts, hidden 1024; also 64 experts, to see the memory of a fused
          tensor twice the size) with MXFP4 experts, and its bf16 dequantized copy; an r=16 rsLoRA adapter on the
          attention and, through target_parameters, on both fused expert tensors
and measures wall time and peak RSS (/usr/bin/time -v) of
  copy               cp -r of the quantized base (the I/O floor)
  bf16 merge         rslora-tools merge of the bf16 checkpoint (the baseline)
  as trained         rslora-tools merge of the quantized checkpoint (dequantized, merged, written bf16)
  keep quantization  rslora-tools merge --keep-quantization of the quantized checkpoint
then checks the quantized merges with `rslora-tools verify --sample 12` and writes the table to
docs/benchmarks-quantized.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import CACHE, ROOT, build_adapter, build_base, machine, time_interleaved  # noqa: E402

GPT_OSS = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=1024,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    tie_word_embeddings=False,
)
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def fp8_copy(base: Path, folder: Path) -> None:
    """BASE's linear weights as block-scaled FP8 (128x128), shard by shard."""
    import torch
    from safetensors.torch import load_file, save_file

    from rslora_tools.compute.requantize import quantize_fp8_blocks

    folder.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    weight_map, total = {}, 0
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, w in load_file(base / shard).items():
            if name.endswith("proj.weight"):
                q, inv = quantize_fp8_blocks(w, (128, 128), torch.float8_e4m3fn, torch.float32)
                out[name], out[name + "_scale_inv"] = q, inv
            else:
                out[name] = w
        for name, t in out.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
        save_file(out, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def gpt_oss_pair(bf16: Path, mxfp4: Path, layers: int, experts: int) -> None:
    """A random gpt-oss checkpoint with MXFP4 experts, and its bf16 copy (the experts dequantized), shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    from rslora_tools.compute.quantization import dequantize_mxfp4
    from rslora_tools.compute.requantize import quantize_mxfp4

    config = GptOssConfig(
        **{**GPT_OSS, "num_local_experts": experts},
        num_hidden_layers=layers,
        layer_types=["full_attention"] * layers,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in AutoModelForCausalLM.from_config(config).state_dict().items()]
    gen = torch.Generator().manual_seed(0)
    maps: dict[Path, dict[str, str]] = {bf16: {}, mxfp4: {}}
    totals = {bf16: 0, mxfp4: 0}
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for name, shape in shapes:  # a shard per layer, and one for the rest
        if (
            groups[-1]
            and name.startswith("model.layers.")
            and not groups[-1][-1][0].startswith(".".join(name.split(".")[:3]) + ".")
        ):
            groups.append([])
        groups[-1].append((name, shape))
    for folder in maps:
        folder.mkdir(parents=True)
    for i, group in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        plain, packed = {}, {}
        for name, shape in group:
            t = (torch.randn(shape, generator=gen) * 0.02 if "norm" not in name else torch.ones(shape)).to(
                torch.bfloat16
            )
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = quantize_mxfp4(t)
                packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
                plain[name] = dequantize_mxfp4(blocks, scales, torch.bfloat16)
            else:
                plain[name] = packed[name] = t
        for folder, tensors in ((bf16, plain), (mxfp4, packed)):
            save_file(tensors, folder / shard, metadata={"format": "pt"})
            for name, t in tensors.items():
                maps[folder][name] = shard
                totals[folder] += t.numel() * t.element_size()
    for folder in maps:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": totals[folder]}, "weight_map": maps[folder]})
        )
        config.save_pretrained(folder)
    quantized = json.loads((mxfp4 / "config.json").read_text())
    quantized["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (mxfp4 / "config.json").write_text(json.dumps(quantized, indent=2))


def gpt_oss_adapter(base: Path, folder: Path) -> None:
    """r=16 rsLoRA on the attention and both fused expert tensors (target_parameters), made by PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(1)
    for name, param in list(peft_model.named_parameters()):
        if "lora_" in name:
            module = peft_model.get_submodule(name.rsplit(".", 1)[0])
            module.weight = torch.nn.Parameter(torch.randn(param.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(folder)


def prepare(family: str, layers: int, experts: int = 32) -> tuple[Path, Path, Path]:
    """(bf16 base, quantized base, adapter), built once."""
    if family == "fp8":
        bf16 = CACHE / f"tinyllama-{layers}l-bf16"
        quantized = CACHE / f"tinyllama-{layers}l-fp8"
        adapter = CACHE / f"tinyllama-{layers}l-rslora-r16"
        if not (bf16 / "model.safetensors.index.json").exists():
            shutil.rmtree(bf16, ignore_errors=True)
            build_base(bf16, layers)
        if not (adapter / "adapter_model.safetensors").exists():
            build_adapter(bf16, adapter)
        if not (quantized / "config.json").exists():
            shutil.rmtree(quantized, ignore_errors=True)
            fp8_copy(bf16, quantized)
        return bf16, quantized, adapter
    tag = f"gpt-oss-{layers}l-{experts}e"
    bf16, quantized, adapter = CACHE / f"{tag}-bf16", CACHE / f"{tag}-mxfp4", CACHE / f"{tag}-rslora-r16"
    if not (quantized / "config.json").exists():
        shutil.rmtree(bf16, ignore_errors=True)
        shutil.rmtree(quantized, ignore_errors=True)
        gpt_oss_pair(bf16, quantized, layers, experts)
    if not (adapter / "adapter_model.safetensors").exists():
        gpt_oss_adapter(bf16, adapter)
    return bf16, quantized, adapter


TOOLS = ["copy", "bf16 merge", "as trained", "keep quantization"]


def run(family: str, layers: int, work: Path, repeat: int, experts: int = 32) -> dict:
    print(f"{family}, {layers} layers: preparing ...", flush=True)
    bf16, quantized, adapter = prepare(family, layers, experts)
    merge = [sys.executable, "-m", "rslora_tools", "merge"]
    outputs = {name: work / f"{family}-{layers}-{i}" for i, name in enumerate(TOOLS)}
    commands = {
        "copy": ["cp", "-r", str(quantized), str(outputs["copy"])],
        "bf16 merge": [*merge, str(bf16), str(adapter), str(outputs["bf16 merge"]), "-q"],
        "as trained": [*merge, str(quantized), str(adapter), str(outputs["as trained"]), "-q"],
        "keep quantization": [
            *merge,
            str(quantized),
            str(adapter),
            str(outputs["keep quantization"]),
            "-q",
            "--keep-quantization",
        ],
    }
    rows, walls = time_interleaved(commands, outputs, quantized, ENV, repeat, f"{family} {layers} layers")
    checks = {}
    for name in ("as trained", "keep quantization"):  # made again (untimed), then checked
        shutil.rmtree(outputs[name], ignore_errors=True)
        subprocess.run(commands[name], env=ENV, check=True)
        proc = subprocess.run(
            [*merge[:-1], "verify", str(outputs[name]), str(quantized), str(adapter), "--sample", "12", "--json"],
            env=ENV,
            capture_output=True,
            text=True,
        )
        checks[name] = json.loads(proc.stdout)["verdict"] if proc.stdout else f"failed: {proc.stderr[-300:]}"
    params = json.loads((bf16 / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    size_gb = sum(f.stat().st_size for f in quantized.glob("*.safetensors")) / 1e9
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    return {
        "family": family,
        "layers": layers,
        "experts": experts if family == "mxfp4" else None,
        "params": params,
        "size_gb": size_gb,
        "rows": rows,
        "walls": walls,
        "checks": checks,
    }


def render(results: list[dict]) -> str:
    lines = [
        "# Quantized-base benchmark",
        "",
        f"Machine: {machine()}.",
        f"Run: `python benchmarks/quant_bench.py` on {time.strftime('%Y-%m-%d')}. Random checkpoints in ~500 MB "
        "shards (FP8: TinyLlama-shaped, 128x128 blocks; MXFP4: gpt-oss-shaped, 32 experts per layer), r=16 rsLoRA "
        "adapters made by PEFT (all linear layers; for gpt-oss the attention and both fused expert tensors). "
        "Same protocol as docs/benchmarks.md: warm inputs, no earlier outputs, commands interleaved, the fastest "
        "run shown, peak RSS from `/usr/bin/time -v`.",
        "",
        "| model | run | wall (s) | vs bf16 merge | peak RSS (MB) | verify --sample 12 | every run (s) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        experts = f", {r['experts']} experts" if r["experts"] else ""
        label = f"{r['family']}, {r['params'] / 1e9:.2f}B params, {r['layers']} layers{experts}, {r['size_gb']:.2f} GB"
        plain = r["rows"]["bf16 merge"][0]
        for name, (wall, rss) in r["rows"].items():
            runs = ", ".join(f"{w:.1f}" for w in r["walls"][name])
            lines.append(
                f"| {label} | {name} | {wall:.1f} | {wall / plain:.2f}x | {rss:.0f} | "
                f"{r['checks'].get(name, '')} | {runs} |"
            )
    lines += [
        "",
        "Targets (issue 26): as trained <= 1.5x the bf16 merge, --keep-quantization <= 2.0x, memory flat "
        "when the model doubles.",
        "",
    ]
    for family in ("fp8", "mxfp4"):
        runs = [r for r in results if r["family"] == family]
        for big in runs[1:]:
            small = runs[0]
            what = (
                "the experts per layer double"
                if big["experts"] and big["experts"] > small["experts"]
                else "the model doubles"
            )
            parts = [
                f"{name} {100 * (big['rows'][name][1] / small['rows'][name][1] - 1):+.1f}%"
                for name in ("bf16 merge", "as trained", "keep quantization")
            ]
            lines.append(f"{family}: peak RSS when {what}: " + ", ".join(parts) + ".")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp8-layers", type=int, nargs="*", default=[22, 44])
    parser.add_argument("--mxfp4", nargs="*", default=["9x32", "18x32", "9x64"], help="LAYERSxEXPERTS runs")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=CACHE / "work")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks-quantized.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [run("fp8", n, args.work, args.repeat) for n in args.fp8_layers]
    for spec in args.mxfp4:
        layers, experts = (int(x) for x in spec.split("x"))
        results.append(run("mxfp4", layers, args.work, args.repeat, experts))
    text = render(results)
    print(text)
    args.write.write_text(text)


if __name__ == "__main__":
    main()
