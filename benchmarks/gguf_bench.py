"""Straight-to-GGUF benchmark: `merge BASE ADAPTER OUT.gguf` vs merge into a folder, then convert_hf_to_gguf.py.

    pip install torch==2.13.0 -e '.[test]' && bash scripts/setup_llama_cpp.sh
    python benchmarks/gguf_bench.py [--outtype f16]

On the random TinyLlama-shaped bf16 checkpoints of merge_bench.py (1.1B parameters, 22 layers, 2.2 GB in
~500 MB shards; and its 11-layer half, for the memory curve) with a small sentencepiece tokenizer and an
r=16 rsLoRA adapter on every linear layer, in one run: wall time and peak RSS of each process (/usr/bin/time
-v), the peak extra disk under the work folder (bytes allocated, sampled every 20 ms), the two GGUFs
compared byte for byte; then each route with its output on a tmpfs only a little larger than the GGUF.
llama.cpp is the copy scripts/setup_llama_cpp.sh unpacks. Writes docs/gguf_benchmark.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
WORK = CACHE / "work" / "gguf"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "convert"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_bench import build_adapter, build_base, timed  # noqa: E402
from stream_bench import DiskPeak  # noqa: E402


def prepared(layers: int) -> tuple[Path, Path]:
    from test_llama_cpp import sentencepiece_tokenizer

    base, adapter = CACHE / f"tinyllama-{layers}l-bf16", CACHE / f"tinyllama-{layers}l-rslora-r16"
    if not (base / "config.json").is_file():
        build_base(base, layers)
    if not (base / "tokenizer.model").is_file():
        sentencepiece_tokenizer(base)
        config = json.loads((base / "config.json").read_text())
        config["architectures"] = ["LlamaForCausalLM"]  # what llama.cpp's converter reads the architecture from
        (base / "config.json").write_text(json.dumps(config, indent=2))
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(base, adapter)
    return base, adapter


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "rslora_tools", *map(str, args)]


def converter(*args: object) -> list[str]:
    from test_llama_cpp import CONVERTER_DIR

    return [sys.executable, str(CONVERTER_DIR / "convert_hf_to_gguf.py"), *map(str, args)]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_size(layers: int, outtype: str) -> dict:
    base, adapter = prepared(layers)
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "direct").mkdir(parents=True)
    with DiskPeak(WORK) as disk:
        direct_s, direct_rss = timed(
            cli("merge", base, adapter, WORK / "direct" / "merged.gguf", "--outtype", outtype, "-q")
        )
    direct_disk = disk.peak
    with DiskPeak(WORK) as disk:
        merge_s, merge_rss = timed(cli("merge", base, adapter, WORK / "merged", "-q"))
        convert_s, convert_rss = timed(
            converter(WORK / "merged", "--outtype", outtype, "--outfile", WORK / "two.gguf")
        )
    two_disk = disk.peak  # counted from the start (the direct GGUF was there already)
    same = digest(WORK / "direct" / "merged.gguf") == digest(WORK / "two.gguf")
    result = {
        "layers": layers,
        "gguf": (WORK / "two.gguf").stat().st_size,
        "base": sum(p.stat().st_size for p in base.glob("*.safetensors")),
        "direct_s": direct_s,
        "direct_rss": direct_rss,
        "direct_disk": direct_disk,
        "merge_s": merge_s,
        "merge_rss": merge_rss,
        "convert_s": convert_s,
        "convert_rss": convert_rss,
        "two_disk": two_disk,
        "same": same,
    }
    print(result, flush=True)
    return result


def on_small_tmpfs(layers: int, outtype: str, gguf_bytes: int) -> dict:
    """Each route with its output folder on a tmpfs of the GGUF's size + 64 MB (root only)."""
    base, adapter = prepared(layers)
    mount = WORK / "tmpfs"
    mount.mkdir(parents=True, exist_ok=True)
    size = gguf_bytes + (64 << 20)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode != 0:
        return {"size": size, "direct": "not measured (mounting a tmpfs needs root)", "two_step": ""}
    try:
        direct = subprocess.run(
            cli("merge", base, adapter, mount / "merged.gguf", "--outtype", outtype, "-q"),
            capture_output=True,
            text=True,
        )
        shutil.rmtree(mount / "merged.gguf", ignore_errors=True)
        (mount / "merged.gguf").unlink(missing_ok=True)
        two = subprocess.run(cli("merge", base, adapter, mount / "merged", "-q"), capture_output=True, text=True)
        if two.returncode == 0:
            two = subprocess.run(
                converter(mount / "merged", "--outtype", outtype, "--outfile", mount / "two.gguf"),
                capture_output=True,
                text=True,
            )
    finally:
        subprocess.run(["umount", str(mount)])
    return {
        "size": size,
        "direct": "written" if direct.returncode == 0 else f"failed: {direct.stderr.strip()[-200:]}",
        "two_step": "fails, the merged folder and the GGUF do not both fit (" + _error_line(two.stderr) + ")"
        if two.returncode != 0
        else "fits (unexpected)",
    }


def _error_line(stderr: str) -> str:
    """The line that says why (not the converter's progress bar)."""
    found = [line.strip() for line in stderr.splitlines() if "Error" in line or "No space" in line]
    return (found[-1] if found else stderr.strip().splitlines()[-1])[:160]


def render(results: list[dict], tmpfs: dict, outtype: str) -> str:
    gb = 1e9
    lines = [
        "# Straight to GGUF: benchmark",
        "",
        f"`python benchmarks/gguf_bench.py --outtype {outtype}` on {platform.processor() or platform.machine()}, "
        f"{sys.platform}, Python {platform.python_version()}; llama.cpp's converter from llama-cpp-python 0.3.36 "
        "(llama.cpp 0c1e5709). Random TinyLlama-shaped bf16 checkpoints (merge_bench.py), r=16 rsLoRA on every "
        "linear layer. Direct: `rslora-tools merge BASE ADAPTER OUT.gguf`; two-step: `rslora-tools merge BASE "
        "ADAPTER MERGED` then `convert_hf_to_gguf.py MERGED`. Peak disk: bytes allocated under the work folder, "
        "inputs not counted.",
        "",
        "| layers | base | GGUF | direct: time | direct: peak RSS | direct: peak disk | two-step: time (merge + "
        "convert) | two-step: peak RSS | two-step: peak disk | same bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['layers']} | {r['base'] / gb:.2f} GB | {r['gguf'] / gb:.2f} GB | {r['direct_s']:.1f} s | "
            f"{r['direct_rss']:.0f} MB | {r['direct_disk'] / gb:.2f} GB | {r['merge_s'] + r['convert_s']:.1f} s "
            f"({r['merge_s']:.1f} + {r['convert_s']:.1f}) | {max(r['merge_rss'], r['convert_rss']):.0f} MB | "
            f"{r['two_disk'] / gb:.2f} GB | {'yes' if r['same'] else 'NO'} |"
        )
    lines += [
        "",
        f"On a tmpfs of {tmpfs['size'] / gb:.2f} GB (the 22-layer GGUF + 64 MB) as the output filesystem: "
        f"direct: {tmpfs['direct']}; two-step: {tmpfs['two_step']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"])
    args = parser.parse_args()
    results = [run_size(layers, args.outtype) for layers in (11, 22)]
    tmpfs = on_small_tmpfs(22, args.outtype, results[-1]["gguf"])
    print(tmpfs, flush=True)
    shutil.rmtree(WORK, ignore_errors=True)
    (ROOT / "docs" / "gguf_benchmark.md").write_text(render(results, tmpfs, args.outtype))


if __name__ == "__main__":
    main()
