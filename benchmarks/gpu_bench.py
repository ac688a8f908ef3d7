"""CPU vs GPU merge on a ~7B-shaped checkpoint: GB/s and the ratio to a plain copy.

Run through benchmarks/gpu_bench.sh on a machine with an NVIDIA GPU (about 5 minutes, ~30 GB of
scratch disk). Builds a random bf16 Llama-2-7B-shaped checkpoint (32 layers, hidden 4096) in
~5 GB shards and an r=16 rsLoRA adapter with PEFT's key names, then times:
  copy   cp -r of the base folder (the I/O floor)
  cpu    rslora-tools merge --device cpu
  cuda   rslora-tools merge --device cuda   (skipped when CUDA is not available)
and checks the GPU output against the CPU one with `rslora-tools verify` semantics (each tensor
exact or within one ulp). LAYERS=4 makes a quick smaller run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = dict(vocab=32000, hidden=4096, inter=11008)


def build(base: Path, adapter: Path, layers: int) -> None:
    gen = torch.Generator().manual_seed(0)
    h, i, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["vocab"]
    per_layer = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h),
        "self_attn.v_proj": (h, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        tensors += [(f"model.layers.{n}.{k}.weight", s) for k, s in per_layer.items()]
        tensors += [
            (f"model.layers.{n}.input_layernorm.weight", (h,)),
            (f"model.layers.{n}.post_attention_layernorm.weight", (h,)),
        ]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    base.mkdir(parents=True)
    shard, size, shards, weight_map = {}, 0, 0, {}

    def flush() -> None:
        nonlocal shard, size, shards
        shards += 1
        name = f"model-{shards:05d}.safetensors"
        save_file(shard, base / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in tensors:
        shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= 5e9:
            flush()
    if shard:
        flush()
    total = sum(2 * torch.Size(s).numel() for _, s in tensors)
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (base / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": h,
                "intermediate_size": i,
                "num_hidden_layers": layers,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": v,
                "torch_dtype": "bfloat16",
                "tie_word_embeddings": False,
            }
        )
    )
    adapter.mkdir(parents=True)
    lora, r = {}, 16
    for n in range(layers):
        for k, (out_f, in_f) in per_layer.items():
            prefix = f"base_model.model.model.layers.{n}.{k}"
            lora[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.01
            lora[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": r,
                "lora_alpha": 32,
                "use_rslora": True,
                "target_modules": [k.split(".")[-1] for k in per_layer],
            }
        )
    )


def timed(cmd: list[str]) -> float:
    os.sync()
    start = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.monotonic() - start


def main() -> None:
    layers = int(os.environ.get("LAYERS", "32"))
    work = Path(os.environ.get("WORK", "/tmp/rslora-gpu-bench"))
    shutil.rmtree(work, ignore_errors=True)
    base, adapter = work / "base", work / "adapter"
    started = time.monotonic()
    build(base, adapter, layers)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    print(f"built {size / 1e9:.1f} GB ({layers} layers) in {time.monotonic() - started:.0f} s", flush=True)
    for p in base.glob("*.safetensors"):  # warm the page cache: every run reads from memory
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    merge = [sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter)]

    def report(name: str, seconds: float) -> float:
        print(f"{name}: {seconds:.1f} s, {size / 1e9 / seconds:.2f} GB/s", flush=True)
        return seconds

    results = {"copy": report("copy", timed(["cp", "-r", str(base), str(work / "copy")]))}
    shutil.rmtree(work / "copy")
    results["cpu"] = report("cpu", timed([*merge, str(work / "cpu"), "--device", "cpu", "-q"]))
    if torch.cuda.is_available():
        results["cuda"] = report("cuda", timed([*merge, str(work / "cuda"), "--device", "cuda", "-q"]))
        check = subprocess.run(
            [sys.executable, "-c", CHECK, str(work / "cpu"), str(work / "cuda")], capture_output=True, text=True
        )
        results["cuda vs cpu"] = check.stdout.strip() or check.stderr.strip()[-300:]
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CUDA not available)'}")
    print("| run | wall (s) | GB/s | vs copy |\n|---|---:|---:|---:|")
    for name, value in results.items():
        if isinstance(value, float):
            print(f"| {name} | {value:.1f} | {size / 1e9 / value:.2f} | {value / results['copy']:.2f}x |")
    if "cuda vs cpu" in results:
        print(f"cuda output vs cpu output: {results['cuda vs cpu']}")
    shutil.rmtree(work, ignore_errors=True)


CHECK = """
import sys, torch
from safetensors import safe_open
from pathlib import Path
from rslora_tools.execute.recompute import compare
a, b = Path(sys.argv[1]), Path(sys.argv[2])
counts = {}
for f in sorted(a.glob("*.safetensors")):
    with safe_open(f, "pt") as x, safe_open(b / f.name, "pt") as y:
        for k in x.keys():
            c = compare(k, y.get_tensor(k), x.get_tensor(k), changed=True)
            counts[c.status] = counts.get(c.status, 0) + 1
print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
"""

if __name__ == "__main__":
    main()
