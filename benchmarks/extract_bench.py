"""Extraction benchmark: `rslora-tools extract` vs `mergekit-extract-lora`, side by side, in one run.

    pip install torch==2.13.0 -e '.[test]'
    python -m venv .mk && .mk/bin/pip install torch==2.13.0 mergekit   # mergekit: benchmark-only
    python benchmarks/extract_bench.py --mergekit .mk/bin/mergekit-extract-lora

Uses merge_bench.py's cached 1.1B TinyLlama-shaped bf16 base and r=16 rsLoRA adapter (built on
first use). TUNED = BASE with that adapter merged (rslora-tools merge) plus Gaussian noise (std
1e-3 of each weight's std) on every Linear weight: an r=16 delta plus noise, in bf16. Then times
(wall, peak RSS by /usr/bin/time -v)
  rslora-tools   extract BASE TUNED OUT --rank 16
  mergekit       mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 16
and measures each adapter's reconstruction error over all factorised modules: the relative
Frobenius error ||delta - scale * B @ A|| / ||delta||, delta = TUNED - BASE in float32, summed over
modules (and the worst module). Writes docs/extract_benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import merge_bench  # noqa: E402

CACHE = merge_bench.CACHE


def build_tuned(base: Path, adapter: Path, tuned: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tmp = tuned.with_name(tuned.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter), str(tmp), "-q"], check=True
    )
    gen = torch.Generator().manual_seed(3)
    for shard in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, value in tensors.items():
            if value.dim() == 2 and "embed" not in name and "lm_head" not in name:
                noise = torch.randn(value.shape, generator=gen) * (1e-3 * value.float().std())
                tensors[name] = (value.float() + noise).to(value.dtype)
        save_file(tensors, str(shard), metadata={"format": "pt"})
    tmp.rename(tuned)


def reconstruction_error(base: Path, tuned: Path, adapter: Path) -> tuple[float, float, int]:
    """(relative error over all factorised modules, worst module's, modules) of an adapter against TUNED - BASE."""

    from rslora_tools.adapter.load import load_adapter
    from rslora_tools.adapter.module_scales import module_entries
    from rslora_tools.formats.checkpoint import CheckpointFiles, open_checkpoint

    loaded = load_adapter(adapter)
    b_ckpt, t_ckpt = open_checkpoint(base), open_checkpoint(tuned)
    b_files, t_files = CheckpointFiles(b_ckpt), CheckpointFiles(t_ckpt)
    err2 = tot2 = 0.0
    worst = 0.0
    n = 0
    try:
        for entry in module_entries(loaded):
            m = entry.module
            key = m.name + ".weight"
            if key not in t_ckpt.weight_map:
                continue
            delta = t_files.read(key).float() - b_files.read(key).float()
            approx = entry.scale.scale * (loaded.tensor(m.b_key).float() @ loaded.tensor(m.a_key).float())
            if m.embedding:
                approx = approx.T
            e2, t2 = float((delta - approx).double().pow(2).sum()), float(delta.double().pow(2).sum())
            err2, tot2, n = err2 + e2, tot2 + t2, n + 1
            worst = max(worst, math.sqrt(e2 / t2) if t2 else 0.0)
    finally:
        b_files.close()
        t_files.close()
    return math.sqrt(err2 / tot2), worst, n


def run_size(layers: int, mergekit: str | None) -> tuple[float, dict[str, tuple]]:
    base = CACHE / f"tinyllama-{layers}l-bf16"
    adapter = CACHE / f"tinyllama-{layers}l-rslora-r16"
    if not (base / "model.safetensors.index.json").exists():
        merge_bench.build_base(base, layers)
    if not (adapter / "adapter_model.safetensors").exists():
        merge_bench.build_adapter(base, adapter)
    tuned = CACHE / f"tinyllama-{layers}l-tuned-r16-noise"
    if not tuned.exists():
        print(f"building TUNED in {tuned} ...", flush=True)
        build_tuned(base, adapter, tuned)
    for folder in (base, tuned):  # mergekit finds the architecture in config.json's "architectures"
        config = json.loads((folder / "config.json").read_text())
        if not config.get("architectures"):
            (folder / "config.json").write_text(
                json.dumps({**config, "architectures": ["LlamaForCausalLM"]}, indent=2)
            )
    work = CACHE / "extract-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    def ours(name: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "rslora_tools",
            "extract",
            str(base),
            str(tuned),
            str(work / name.replace(" ", "")),
            "--rank",
            "16",
            "-q",
            *extra,
        ]

    runs = {"rslora-tools": ours("rslora-tools")}
    if mergekit:  # the first size: also the exact SVD, to see how far the randomized one is from the optimum
        runs["rslora-tools --exact"] = ours("rslora-tools --exact", "--exact")
        runs["mergekit"] = [
            mergekit,
            "--model",
            str(tuned),
            "--base-model",
            str(base),
            "--out-path",
            str(work / "mergekit"),
            "--max-rank",
            "16",
            "--quiet",
        ]
    rows = {}
    for name, cmd in runs.items():
        print(f"  {name} ({layers} layers) ...", flush=True)
        os.sync()
        merge_bench.warm(base)
        merge_bench.warm(tuned)
        wall, rss = merge_bench.timed(cmd, env)
        out = work / name.replace(" ", "")
        total, worst, modules = reconstruction_error(base, tuned, out)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows[name] = (wall, rss, total, worst, modules, size)
    shutil.rmtree(work, ignore_errors=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    return params, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mergekit",
        default=shutil.which("mergekit-extract-lora"),
        help="the mergekit-extract-lora executable (default: on PATH); run at the first size only",
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[22, 44])
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "extract_benchmark.md")
    args = parser.parse_args()
    results = [run_size(layers, args.mergekit if i == 0 else None) for i, layers in enumerate(args.layers)]
    lines = [
        "# Extraction benchmark",
        "",
        f"Machine: {merge_bench.machine()}.",
        f"Run: `python benchmarks/extract_bench.py` on {time.strftime('%Y-%m-%d')}. BASE: random bf16 "
        "TinyLlama-shaped checkpoints; TUNED: BASE with an r=16 rsLoRA adapter on every Linear layer merged, plus "
        "Gaussian noise (1e-3 of each weight's std). Both tools extract at rank 16 on the CPU (mergekit at the "
        "first size only). Error: relative Frobenius error of scale * B @ A against TUNED - BASE (float32), over "
        "all modules and the worst module.",
        "",
        "| model | tool | wall (s) | peak RSS (MB) | relative error (all) | worst module | modules | adapter (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for params, rows in results:
        for name, (wall, rss, total, worst, modules, size) in rows.items():
            lines.append(
                f"| {params / 1e9:.2f}B | {name} | {wall:.1f} | {rss:.0f} | {total:.4g} | {worst:.4g} | "
                f"{modules} | {size / 1e6:.1f} |"
            )
    params, rows = results[0]
    if "mergekit" in rows:
        ours, theirs = rows["rslora-tools"], rows["mergekit"]
        lines += [
            "",
            f"At {params / 1e9:.2f}B rslora-tools is {theirs[0] / ours[0]:.1f}x faster than mergekit, at "
            f"{ours[1] / theirs[1]:.2f}x its memory, with relative error {ours[2]:.4g} against {theirs[2]:.4g} "
            "(mergekit writes its factors in the model's bf16). Goal (issue 16): at least 5x faster with equal "
            "or lower error, memory flat in model size.",
        ]
        if "rslora-tools --exact" in rows:
            exact = rows["rslora-tools --exact"]
            lines.append(
                f"The randomized SVD's error is {ours[2] / exact[2]:.6f}x the exact SVD's (the optimum at rank "
                f"16), in {ours[0] / exact[0]:.2f}x its time."
            )
    if len(results) > 1:
        small, big = results[0][1]["rslora-tools"], results[-1][1]["rslora-tools"]
        lines.append(
            f"rslora-tools' peak RSS when the model doubles: {100 * (big[1] / small[1] - 1):+.0f}% (the "
            "adapter's own factors are held until written: 50 MB per 1.1B at rank 16)."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.write.write_text(text)


if __name__ == "__main__":
    main()
