"""What vLLM's CPU build does with PEFT adapters, release by release, against PEFT; and whether rslora-tools predicts
it.

    bash scripts/check_vllm.sh                      # venvs built once (cached), then this script
    python scripts/check_vllm.py --vllm 0.32.0=VENV/bin/python [--vllm 0.31.0=...] [--write docs/runtimes.md]

For a tiny Llama (fp32, head_dim 64) and adapters built by PEFT (classic, rsLoRA, rsLoRA with
rank/alpha patterns, DoRA, lora_bias, trained biases, modules_to_save), plus the rsLoRA-with-patterns
adapter converted by `rslora-tools convert --target vllm@VERSION`, each release serves each
adapter in its own process (token-id prompts, no tokenizer); the log-probs of the next token after
every prefix are compared with PEFT's. A case is "PEFT's" when they agree within 1e-3, "refused"
when vLLM refuses the adapter, and otherwise compared with the model rslora-tools predicts that
release serves (the adapter at the scales `inspect` reports for it). The prediction agrees when
"exact" meets PEFT's model, "wrong scale" meets the model at the predicted scales, and "cannot
serve" meets a refusal or a silently different model. The table goes to stdout and,
with --write, between the markers in docs/runtimes.md. Needs the test extra (peft, transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TOKENS = [1, 17, 42, 99, 130, 7, 56, 211, 3, 64, 128, 200]
SAME = 1e-3  # max |log p difference| for "PEFT's" (measured: a few 1e-6 in fp32)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "classic": dict(r=8, lora_alpha=16),
    "rsLoRA": dict(r=16, lora_alpha=16, use_rslora=True),
    "rsLoRA + patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"o_proj": 4, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 8.5, "v_proj": 3},
    ),
    "DoRA": dict(r=8, lora_alpha=16, use_dora=True),
    "lora_bias": dict(r=8, lora_alpha=16, lora_bias=True),
    'bias="all"': dict(r=8, lora_alpha=16, bias="all"),
    "modules_to_save": dict(r=8, lora_alpha=16, modules_to_save=["lm_head"]),
}
START, END = "<!-- check_vllm:start -->", "<!-- check_vllm:end -->"


def build(work: Path) -> tuple[Path, dict[str, Path]]:
    from peft import LoraConfig
    from peft_oracle import make_adapter
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    base = work / "base"
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(base)
    adapters = {
        name: make_adapter(
            base, work / f"adapter-{i}", LoraConfig(init_lora_weights=False, target_modules=LINEAR, **kwargs)
        )
        for i, (name, kwargs) in enumerate(CASES.items())
    }
    return base, adapters


def peft_logprobs(base: Path, adapter: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([TOKENS])).logits[0].float(), dim=-1)


def predicted(adapter: Path, version: str) -> tuple[str, dict[str, float]]:
    """What rslora-tools says this release does: "cannot serve", "exact" or "wrong scale", and the factor per
    module."""
    from rslora_tools.adapter.load import load_adapter
    from rslora_tools.adapter.module_scales import module_entries
    from rslora_tools.adapter.runtimes import missing_features, runtime, runtime_scale

    loaded = load_adapter(adapter)
    rt = runtime(f"vllm@{version}")
    fields = loaded.config.normalized()
    factors = {}
    for e in module_entries(loaded):
        served = runtime_scale(rt, fields, e)
        if served is None:
            return "cannot serve", {}
        factors[e.module.name] = served / e.scale.scale
    if missing_features(rt, loaded):
        return "cannot serve", {}
    return ("exact" if all(f == 1.0 for f in factors.values()) else "wrong scale"), factors


def as_served(adapter: Path, factors: dict[str, float], out: Path) -> Path:
    """The adapter with each module's B multiplied by the factor the runtime applies: PEFT then serves that model."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in tensors:
        name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        if key.endswith("lora_B.weight"):
            tensors[key] = tensors[key] * factors[name]
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    return out


def serve(python: str, base: Path, adapter: Path | None, work: Path) -> dict:
    """One case in its own process group: vLLM's engine processes outlive the case's process, so the whole
    group is killed when it is done (or after 900 s)."""
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    out = work / f"out-{abs(hash((python, str(adapter))))}.json"
    log = (work / f"{out.stem}.log").open("w")
    proc = subprocess.Popen(
        [python, str(ROOT / "scripts" / "vllm_serve_case.py"), str(base), str(adapter or "-"), str(tokens), str(out)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "no answer within 900 s"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    result = json.loads(out.read_text()) if out.is_file() else {"error": "the serving process died"}
    if "error" in result:  # the engine's own reason is in its log ("EngineDeadError" is all the caller sees)
        log_text = (work / f"{out.stem}.log").read_text()
        reasons = re.findall(r"(?:^|\] |\s)ValueError: (.+)$", log_text, flags=re.M)  # the adapter check's own message
        if reasons:
            result["error"] = reasons[0]
    return result


def check(version: str, python: str, base: Path, adapters: dict[str, Path], work: Path) -> list[dict]:
    from click.testing import CliRunner

    from rslora_tools.cli import cli

    converted = work / f"converted-{version}"
    result = CliRunner().invoke(
        cli, ["convert", str(adapters["rsLoRA + patterns"]), str(converted), "--target", f"vllm@{version}"]
    )
    assert result.exit_code == 0, result.output
    cases = {**adapters, f"rsLoRA + patterns, converted --target vllm@{version}": converted}
    rows = []
    base_served = serve(python, base, None, work)
    assert "logprobs" in base_served, base_served
    base_diff = (torch.tensor(base_served["logprobs"]) - peft_logprobs(base, None)).abs().max().item()
    for name, adapter in cases.items():
        prediction, factors = predicted(adapter, version)
        served = serve(python, base, adapter, work)
        row = {"vllm": version, "adapter": name, "predicted": prediction, "base_max_diff": base_diff}
        if "error" in served:
            row.update(measured="refused", detail=served["error"][:200])
        else:
            diff = (torch.tensor(served["logprobs"]) - peft_logprobs(base, adapter)).abs().max().item()
            row.update(measured="PEFT's" if diff < SAME else "differs", max_diff=diff)
            if diff >= SAME and factors:
                model = as_served(adapter, factors, work / f"served-{version}-{len(rows)}")
                row["diff_to_predicted"] = (
                    (torch.tensor(served["logprobs"]) - peft_logprobs(base, model)).abs().max().item()
                )
        # "cannot serve" is right when the release refuses the adapter or serves another model silently;
        # "wrong scale" when it serves the adapter at the predicted scales; "exact" when it serves PEFT's model.
        row["agrees"] = {
            "cannot serve": row["measured"] in ("refused", "differs"),
            "wrong scale": row.get("diff_to_predicted", 1.0) < SAME,
            "exact": row["measured"] == "PEFT's",
        }[prediction]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| vLLM (CPU build) | adapter | served | rslora-tools predicts | agrees |", "|---|---|---|---|---|"]
    for r in rows:
        if r["measured"] == "refused":
            served = f"refused: {r['detail']}"
        elif r["measured"] == "PEFT's":
            served = f"PEFT's (max abs Δ log p {r['max_diff']:.1e})"
        elif "diff_to_predicted" in r:
            served = (
                f"not PEFT's (max abs Δ log p {r['max_diff']:.2f}); the model at the predicted scales "
                f"(max abs Δ log p {r['diff_to_predicted']:.1e})"
            )
        else:
            served = f"not PEFT's, without an error (max abs Δ log p {r['max_diff']:.2f})"
        lines.append(
            f"| {r['vllm']} | {r['adapter']} | {served.replace('|', '/')} | {r['predicted']} | "
            f"{'yes' if r['agrees'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--vllm",
        action="append",
        required=True,
        metavar="VERSION=PYTHON",
        help="a vLLM release and the python of an environment where it is installed (repeatable)",
    )
    parser.add_argument("--write", type=Path, help="put the table into this file, between the check_vllm markers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        base, adapters = build(work)
        rows = []
        for spec in args.vllm:
            version, _, python = spec.partition("=")
            rows += check(version, python, base, adapters, work)
    text = table(rows)
    print(text)
    if args.write:
        doc = args.write.read_text()
        block = f"{START}\n{text}\n{END}"
        doc = (
            re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S)
            if START in doc
            else doc.rstrip("\n") + "\n\n" + block + "\n"
        )
        args.write.write_text(doc)
    if not all(r["agrees"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
