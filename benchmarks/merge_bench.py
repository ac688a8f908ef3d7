"""Merge benchmark: plain copy vs rslora-tools vs the PEFT path, side by side, in one run.

    pip install torch==2.13.0 -e '.[test]' && python benchmarks/merge_bench.py

Builds (once, cached in benchmarks/.cache) a TinyLlama-shaped random bf16 checkpoint (1.1B
parameters, ~2.2 GB in ~500 MB shards) and an r=16 rsLoRA adapter on all linear layers (made
by PEFT), then measures wall time and peak RSS (/usr/bin/time -v) of:
  copy          cp -r of the base folder (the I/O floor)
  rslora-tools  rslora-tools merge
  as trained (nf4)               rslora-tools merge --trained-on nf4 (QLoRA, BitsAndBytesConfig's defaults)
  as trained (nf4, double quant) the same with --double-quant
  peft          transformers load + PeftModel + merge_and_unload + save_pretrained
checks that rslora-tools' output equals PEFT's tensor for tensor (and the as-trained output
equals the torch path's, which the tests prove equal to bitsandbytes), repeats with twice the
layers, and writes the table to docs/benchmarks.md.

Several adapters (at the first size): a second adapter (r=16, classic) is built, and
  stacked merge        rslora-tools merge BASE A B OUT
  peft stacked merge   PEFT: load_adapter for each, merge_and_unload(adapter_names=[a, b]), save
  combine cat / svd    rslora-tools combine A B OUT [--method svd --rank 16]
  peft combine cat / svd   PEFT: add_weighted_adapter on the loaded model, save that adapter
are timed the same way; the stacked merge is checked against PEFT's tensor for tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"

TINYLLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_attention_heads=32,
    num_key_value_heads=4,
    num_hidden_layers=22,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="500MB")
"""


PEFT_STACKED_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, first, second, out = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, first, adapter_name="a")
model.load_adapter(second, adapter_name="b")
model.merge_and_unload(adapter_names=["a", "b"]).save_pretrained(out, max_shard_size="500MB")
"""

PEFT_COMBINE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, first, second, out, method = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, first, adapter_name="a")
model.load_adapter(second, adapter_name="b")
extra = {"svd_rank": 16} if method == "svd" else {}
model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "c", combination_type=method, **extra)
model.save_pretrained(out, selected_adapters=["c"])
"""


def build_base(folder: Path, layers: int) -> None:
    """A random bf16 Llama checkpoint written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**TINYLLAMA, "num_hidden_layers": layers}, dtype="bfloat16")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = [(n, tuple(p.shape)) for n, p in model.state_dict().items()]
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > 500_000_000:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.randn(shape, generator=gen) * 0.02 if "norm" not in name else torch.ones(shape)
            tensors[name] = t.to(torch.bfloat16)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(folder)


def build_adapter(base: Path, folder: Path, *, use_rslora: bool = True, seed: int = 1) -> None:
    """An r=16 rsLoRA (or classic) adapter on all linear layers, created and saved by PEFT (weights random)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=16, lora_alpha=32, use_rslora=use_rslora, target_modules="all-linear")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed)
    for module in peft_model.modules():
        for attr in ("lora_A", "lora_B"):
            holder = getattr(module, attr, None)
            if isinstance(holder, torch.nn.ModuleDict) and "default" in holder:
                layer = holder["default"]
                layer.weight = torch.nn.Parameter(torch.randn(layer.weight.shape, generator=gen) * 0.02)
    peft_model.save_pretrained(folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a command, measured by /usr/bin/time -v."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb / 1024


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                out.update({k: f for k in st.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        print(f"  key sets differ: {sorted(set(ia) ^ set(ib))[:5]}")
        return False
    for k in ia:
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                print(f"  tensor differs: {k}")
                return False
    return True


def warm(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


TOOLS = ["copy", "rslora-tools", "as trained (nf4)", "as trained (nf4, double quant)", "peft"]


def trained_flags(name: str) -> list[str]:
    return ["--trained-on", "nf4"] + (["--double-quant"] if "double" in name else [])


def run_size(layers: int, work: Path, skip_peft: bool, repeat: int, check_trained: list[int]) -> dict:
    base = CACHE / f"tinyllama-{layers}l-bf16"
    adapter = CACHE / f"tinyllama-{layers}l-rslora-r16"
    if not (base / "model.safetensors.index.json").exists():
        print(f"building base ({layers} layers) in {base} ...", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        build_base(base, layers)
    if not (adapter / "adapter_model.safetensors").exists():
        print(f"building adapter in {adapter} ...", flush=True)
        build_adapter(base, adapter)
    size_gb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    commands = {}
    merge = [sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter)]
    for name in TOOLS:
        out = work / f"{TOOLS.index(name)}-{layers}"
        if name == "copy":
            commands[name] = ["cp", "-r", str(base), str(out)]
        elif name == "rslora-tools":
            commands[name] = [*merge, str(out), "-q"]
        elif name.startswith("as trained"):
            commands[name] = [*merge, str(out), "-q", *trained_flags(name)]
        elif not skip_peft:
            commands[name] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    outputs = {name: work / f"{TOOLS.index(name)}-{layers}" for name in commands}
    rows, walls = time_interleaved(commands, outputs, base, env, repeat, f"{layers} layers")
    equal: dict[str, bool | None] = {}
    ours = work / f"{TOOLS.index('rslora-tools')}-{layers}"
    if "peft" in rows:  # the last PEFT output is still there: merge once more (untimed) and compare
        subprocess.run(commands["rslora-tools"], env=env, check=True)
        equal["rslora-tools"] = same_tensors(ours, work / f"{TOOLS.index('peft')}-{layers}")
    if check_trained and layers == min(check_trained):  # the as-trained kernel path against the torch path (slow)
        for name in ("as trained (nf4)", "as trained (nf4, double quant)"):
            shutil.rmtree(ours, ignore_errors=True)
            subprocess.run(commands[name], env=env, check=True)
            torch_out = work / f"torch-{layers}"
            shutil.rmtree(torch_out, ignore_errors=True)
            subprocess.run(
                [*merge, str(torch_out), "-q", *trained_flags(name)],
                env={**env, "RSLORA_TOOLS_KERNEL": "0"},
                check=True,
            )
            equal[name] = same_tensors(work / f"{TOOLS.index(name)}-{layers}", torch_out)
            shutil.rmtree(torch_out, ignore_errors=True)
    for name in TOOLS:
        shutil.rmtree(work / f"{TOOLS.index(name)}-{layers}", ignore_errors=True)
    return {"layers": layers, "params": params, "size_gb": size_gb, "rows": rows, "walls": walls, "equal": equal}


def time_interleaved(
    commands: dict[str, list[str]], outputs: dict[str, Path], base: Path, env: dict, repeat: int, label: str
) -> tuple[dict[str, tuple[float, float]], dict[str, list[float]]]:
    """Each command's fastest wall time and largest peak RSS, and every run's wall time."""
    rows: dict[str, tuple[float, float]] = {}
    walls: dict[str, list[float]] = {name: [] for name in commands}  # every run, to show the spread
    for run in range(repeat):  # interleaved, so that slow spells of the machine hit every command alike
        for name, cmd in commands.items():
            print(f"  {name} ({label}, run {run + 1}/{repeat}) ...", flush=True)
            for out in outputs.values():  # every run starts alike: no earlier output filling the page cache,
                shutil.rmtree(out, ignore_errors=True)
            os.sync()  # no dirty pages left by the previous run,
            warm(base)  # and the base in the page cache
            wall, rss = timed(cmd, env)
            walls[name].append(wall)
            best_wall, peak_rss = rows.get(name, (wall, rss))
            rows[name] = (min(best_wall, wall), max(peak_rss, rss))
    return rows, walls


SEVERAL = [
    "stacked merge",
    "peft stacked merge",
    "combine cat",
    "combine svd r16",
    "peft combine cat",
    "peft combine svd r16",
]


def run_several(layers: int, work: Path, skip_peft: bool, repeat: int) -> dict:
    """Two r=16 adapters (rsLoRA, classic) on the same base: stacked merge and combine, ours and PEFT's."""
    base = CACHE / f"tinyllama-{layers}l-bf16"
    first = CACHE / f"tinyllama-{layers}l-rslora-r16"
    second = CACHE / f"tinyllama-{layers}l-classic-r16"
    if not (second / "adapter_model.safetensors").exists():
        print(f"building the second adapter in {second} ...", flush=True)
        build_adapter(base, second, use_rslora=False, seed=2)
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    tool = [sys.executable, "-m", "rslora_tools"]
    outputs = {name: work / f"several-{SEVERAL.index(name)}" for name in SEVERAL}
    commands = {
        "stacked merge": [*tool, "merge", str(base), str(first), str(second), str(outputs["stacked merge"]), "-q"],
        "combine cat": [*tool, "combine", str(first), str(second), str(outputs["combine cat"]), "-q"],
        "combine svd r16": [
            *tool,
            "combine",
            str(first),
            str(second),
            str(outputs["combine svd r16"]),
            "-q",
            "--method",
            "svd",
            "--rank",
            "16",
        ],
    }
    peft_svd = None
    if not skip_peft:

        def peft_combine(method: str, name: str) -> list[str]:
            return [
                sys.executable,
                "-c",
                PEFT_COMBINE_SCRIPT,
                str(base),
                str(first),
                str(second),
                str(outputs[name]),
                method,
            ]

        commands["peft combine cat"] = peft_combine("cat", "peft combine cat")
        commands["peft stacked merge"] = [
            sys.executable,
            "-c",
            PEFT_STACKED_SCRIPT,
            str(base),
            str(first),
            str(second),
            str(outputs["peft stacked merge"]),
        ]  # last: its output is compared
        peft_svd = peft_combine("svd", "peft combine svd r16")
    rows, walls = time_interleaved(commands, outputs, base, env, repeat, f"{layers} layers, two adapters")
    equal: dict[str, bool | None] = {}
    if "peft stacked merge" in rows:  # the last PEFT output is still there
        subprocess.run(commands["stacked merge"], env=env, check=True)
        equal["stacked merge"] = same_tensors(outputs["stacked merge"], outputs["peft stacked merge"])
    if peft_svd is not None:  # several minutes (a full SVD per module): timed once
        more_rows, more_walls = time_interleaved(
            {"peft combine svd r16": peft_svd}, outputs, base, env, 1, f"{layers} layers, two adapters"
        )
        rows.update(more_rows)
        walls.update(more_walls)
    for out in outputs.values():
        shutil.rmtree(out, ignore_errors=True)
    params = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    return {"layers": layers, "params": params, "rows": rows, "walls": walls, "equal": equal}


def render_several(r: dict) -> list[str]:
    lines = [
        "## Several adapters",
        "",
        f"{r['params'] / 1e9:.2f}B params, {r['layers']} layers: two r=16 adapters on all linear layers (one rsLoRA, "
        "one classic). PEFT's stacked merge and add_weighted_adapter need the model loaded (bf16); its `svd` "
        "is a full SVD of every module's delta (run once: it takes minutes), ours works on the factors "
        "(docs/combining.md). PEFT's combined adapters here are sqrt(new rank) times too strong (the first input is "
        "rsLoRA); they are timed, not used.",
        "",
        "| run | wall (s) | peak RSS (MB) | output check | every run (s) |",
        "|---|---:|---:|---|---|",
    ]
    for name, (wall, rss) in r["rows"].items():
        same = r["equal"].get(name)
        eq = "" if same is None else ("equals PEFT (torch.equal, every tensor)" if same else "NO")
        runs = ", ".join(f"{w:.1f}" for w in r["walls"][name])
        lines.append(f"| {name} | {wall:.1f} | {rss:.0f} | {eq} | {runs} |")
    lines.append("")
    return lines


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def render(results: list[dict], gpu_note: str, several: dict | None = None) -> str:
    lines = [
        "# Merge benchmark",
        "",
        f"Machine: {machine()}.",
        f"Run: `python benchmarks/merge_bench.py` on {time.strftime('%Y-%m-%d')}. Random bf16 TinyLlama-shaped "
        "checkpoints in ~500 MB shards, r=16 rsLoRA adapter on all linear layers (built by PEFT). Inputs are "
        "read once, earlier outputs are deleted and `sync` runs before each run, so every command starts from a warm "
        "base in the page cache and no dirty pages; "
        "the commands take turns, and the fastest of each one's runs is shown. Peak RSS from `/usr/bin/time -v` (the "
        "whole "
        "process), the largest of the runs.",
        "",
        "| model | tool | wall (s) | vs copy | peak RSS (MB) | output check | every run (s) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        label = f"{r['params'] / 1e9:.2f}B params, {r['layers']} layers, {r['size_gb']:.2f} GB"
        copy_s = r["rows"]["copy"][0]
        for name, (wall, rss) in r["rows"].items():
            same = r["equal"].get(name)
            eq = (
                ""
                if same is None
                else (
                    "NO"
                    if not same
                    else "equals PEFT (torch.equal, every tensor)"
                    if name == "rslora-tools"
                    else "yes (equals the torch path, every tensor)"
                )
            )
            runs = ", ".join(f"{w:.1f}" for w in r["walls"][name])
            lines.append(f"| {label} | {name} | {wall:.1f} | {wall / copy_s:.2f}x | {rss:.0f} | {eq} | {runs} |")
    lines += [
        "",
        "Targets (issue 4): merge <= 2.0x copy; >= 8x faster than the PEFT path; peak RSS <= 512 MB and "
        "within +10% when the model doubles; output bitwise equal to PEFT's. (issue 13): a merge as trained on "
        "NF4 within 1.5x the time of a plain merge, memory flat.",
        "",
    ]
    if len(results) == 2 and all("peft" in r["rows"] for r in results):
        small, big = results
        ours_s, ours_b = small["rows"]["rslora-tools"], big["rows"]["rslora-tools"]
        lines.append(
            f"Measured: merge/copy {ours_s[0] / small['rows']['copy'][0]:.2f}x and "
            f"{ours_b[0] / big['rows']['copy'][0]:.2f}x; "
            f"PEFT/merge {small['rows']['peft'][0] / ours_s[0]:.1f}x and {big['rows']['peft'][0] / ours_b[0]:.1f}x; "
            f"RSS growth when the model doubles {100 * (ours_b[1] / ours_s[1] - 1):+.1f}%."
        )
        lines.append("")
    for r in results:
        plain = r["rows"]["rslora-tools"][0]
        parts = [
            f"{name} {r['rows'][name][0] / plain:.2f}x"
            for name in TOOLS
            if name.startswith("as trained") and name in r["rows"]
        ]
        if parts:
            lines.append(f"As trained vs plain merge at {r['params'] / 1e9:.2f}B: " + ", ".join(parts) + ".")
    lines += [
        "",
        "Double quantization computes the mean of the absmax values with torch, exactly as bitsandbytes "
        "does, so that run imports torch (about 1.7 s here, whatever the model size).",
        "",
    ]
    if several is not None:
        lines += render_several(several)
    lines += ["## GPU", "", gpu_note, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[22, 44], help="model depths to run (default 22 44)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the fastest is reported (default 3)")
    parser.add_argument("--skip-peft", action="store_true", help="do not run the PEFT path")
    parser.add_argument(
        "--skip-trained-check",
        action="store_true",
        help="do not compare the as-trained output with the torch path (about a minute)",
    )
    parser.add_argument("--skip-several", action="store_true", help="do not run the several-adapters benchmark")
    parser.add_argument("--work", type=Path, default=CACHE / "work", help="scratch folder for outputs")
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md", help="where to write the table")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    check = [] if args.skip_trained_check else args.layers
    results = [run_size(layers, args.work, args.skip_peft, args.repeat, check) for layers in args.layers]
    several = None if args.skip_several else run_several(args.layers[0], args.work, args.skip_peft, args.repeat)
    gpu_note_file = ROOT / "benchmarks" / "gpu_note.md"
    gpu_note = gpu_note_file.read_text().strip() if gpu_note_file.exists() else "Not measured."
    text = render(results, gpu_note, several)
    print(text)
    args.write.parent.mkdir(parents=True, exist_ok=True)
    args.write.write_text(text)


if __name__ == "__main__":
    main()
