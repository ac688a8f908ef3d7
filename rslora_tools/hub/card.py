"""The model card of a merged model or converted adapter.

Written from the provenance file (`rslora_tools.json`) that `merge` and `convert` put into
their output: the Hub metadata (`base_model`, `base_model_relation`, `library_name`, tags) and a
short text that says what was merged or converted, the convention and scales, and how to load it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapter.config import CONFIG_NAME, read_config_file
from ..adapter.scaling import convention_label
from ..errors import RsloraError
from ..formats.provenance import read_provenance
from .refs import parse_ref


def model_card(folder: Path, repo_id: str) -> str:
    """A model card for a merged model or a converted adapter, from the provenance file rslora-tools wrote."""
    from huggingface_hub import ModelCardData

    prov = read_provenance(folder)
    is_adapter = (folder / CONFIG_NAME).is_file()
    base = _hub_id(prov.get("base")) or _hub_id(prov.get("base_model"))
    if is_adapter and base is None:
        try:
            recorded = read_config_file(folder).get("base_model_name_or_path")
        except RsloraError:
            recorded = None
        base = recorded if isinstance(recorded, str) and parse_ref(recorded) else None
    convention = prov.get("convention")
    mlx = is_adapter and convention == "mlx-lm"
    tags = [*(["mlx"] if mlx else []), "lora", *(["rslora"] if convention == "rslora" else []), "rslora-tools"]
    data: dict[str, Any] = {"library_name": ("mlx" if mlx else "peft") if is_adapter else "transformers"}
    if base:
        data["base_model"] = base
        data["base_model_relation"] = "adapter" if is_adapter else "merge"
        if is_adapter:
            tags.insert(0, f"base_model:adapter:{base}")
    if not is_adapter:
        tags.append("merge")
    card_data = ModelCardData(tags=tags, **data)
    tokenizer = any((folder / n).is_file() for n in TOKENIZER_FILES)
    body = _mlx_body(repo_id, prov, base) if mlx else _card_body(repo_id, prov, is_adapter, base, tokenizer)
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def project_url() -> str | None:
    """The project's own URL ([project.urls] in pyproject.toml: Homepage, else Repository), if it declares one."""
    from importlib import metadata

    try:
        urls = metadata.metadata("rslora-tools").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    found = dict(u.split(", ", 1) for u in urls if ", " in u)
    return found.get("Homepage") or found.get("Repository")


def _tool(version: str) -> str:
    """ "rslora-tools VERSION", linked to the project's own page when it declares one (never a page it does not
    own)."""
    url = project_url()
    return f"[rslora-tools]({url}) {version}" if url else f"rslora-tools {version}"


def _hub_id(source: Any) -> str | None:
    if isinstance(source, dict) and source.get("repo_id"):
        return source["repo_id"]
    if isinstance(source, str) and not Path(source).exists() and parse_ref(source):
        return source.partition("@")[0]
    return None


def _describe(source: Any) -> str:
    if isinstance(source, dict) and isinstance(source.get("combined"), list):
        return (
            f"a combination ({source.get('method', '?')}) of "
            f"{_describe_all(source['combined'], source.get('weights'))}"
        )
    if isinstance(source, dict):
        if source.get("repo_id"):
            rev = f" at revision `{source['revision']}`" if source.get("revision") else ""
            commit = f" (commit `{source['commit'][:12]}`)" if source.get("commit") else ""
            return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}){rev}{commit}"
        return f"local folder `{Path(str(source.get('spec', '?'))).name}`"
    return f"`{source}`" if source else "unknown"


def _describe_all(sources: list[Any], weights: Any = None) -> str:
    described = [_describe(x) for x in sources]
    if isinstance(weights, list) and len(weights) == len(described) and any(w != 1.0 for w in weights):
        described = [f"{d} (weight {w:g})" for d, w in zip(described, weights)]
    return ", ".join(described)


def _mlx_body(repo_id: str, prov: dict[str, Any], base: str | None) -> str:
    """The card of an mlx-lm adapter (`convert --target mlx`): what it is, and how mlx-lm loads it."""
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"An mlx-lm LoRA adapter{f' for [{base}](https://huggingface.co/{base})' if base else ''}, converted from the "
        f"PEFT adapter {_describe(prov.get('adapter'))} with {_tool(prov.get('version', __version__))}: "
        f"{prov.get('message') or 'converted'}.",
        "mlx-lm serves it with the function PEFT gives the original adapter.",
        "",
        "## Use",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from mlx_lm import generate, load",
        "",
        f'model, tokenizer = load("{base or "BASE"}", adapter_path=snapshot_download("{repo_id}"))',
        'print(generate(model, tokenizer, prompt="Hello"))',
        "```",
    ]
    return "\n".join(lines + _how_it_was_made(prov)) + "\n"


def _how_it_was_made(prov: dict[str, Any]) -> list[str]:
    command = prov.get("command")
    return ["", "## How it was made", "", "```bash", command, "```"] if isinstance(command, str) else []


def _card_body(repo_id: str, prov: dict[str, Any], is_adapter: bool, base: str | None, tokenizer: bool) -> str:
    version = prov.get("version", __version__)
    lines = [f"# {repo_id.split('/')[-1]}", ""]
    if prov.get("operation") == "merge":
        lines += _merged_model_lines(repo_id, prov, version, tokenizer)
    elif is_adapter:
        lines += _adapter_lines(prov, version, base)
        lines += [
            "",
            "## Use",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
            "```",
        ]
    else:
        lines += ["Uploaded with rslora-tools."]
    return "\n".join(lines + _how_it_was_made(prov)) + "\n"


def _merged_model_lines(repo_id: str, prov: dict[str, Any], version: str, tokenizer: bool) -> list[str]:
    """What a merged model is made of, how it was checked, and how to load it."""
    stacked = isinstance(prov.get("adapters"), list)
    what = (
        f"the LoRA adapters {_describe_all(prov['adapters'], prov.get('weights'))}, merged one after another,"
        if stacked
        else f"the LoRA adapter {_describe(prov.get('adapter'))}"
    )
    lines = [
        f"This model is {what} merged into {_describe(prov.get('base'))} with {_tool(version)}.",
        "The merged weights equal PEFT's `merge_and_unload()` bit for bit.",
        "",
        f"- Adapter convention: {convention_label(str(prov.get('convention', 'unknown')), 'formula')}",
        f"- LoRA modules merged: {prov.get('modules', '?')}",
    ]
    if prov.get("scale_min") is not None:
        lo, hi = prov["scale_min"], prov["scale_max"]
        lines.append(f"- Per-module scale: {lo:.6g}" + ("" if lo == hi else f" to {hi:.6g} (rank/alpha patterns)"))
    verified = prov.get("verified")
    if isinstance(verified, dict):
        lines.append(
            f"- Verified after merging (`--verify`): {verified.get('verdict')}, "
            f"{verified.get('tensors_checked')} tensors recomputed and compared"
        )
    return lines + [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if tokenizer else ""),
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        *([f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'] if tokenizer else []),
        "```",
    ]


def _adapter_lines(prov: dict[str, Any], version: str, base: str | None) -> list[str]:
    """What an adapter is (extracted, combined or converted) and where it came from."""
    for_base = f" for [{base}](https://huggingface.co/{base})" if base else ""
    if prov.get("operation") == "extract":
        return [
            f"A PEFT LoRA adapter extracted from {_describe(prov.get('tuned'))} as its difference to "
            f"{_describe(prov.get('base'))}, with {_tool(version)}.",
            "Each module's rank, retained energy and relative error were reported when it was made.",
        ]
    if prov.get("operation") == "combine":
        return [
            f"A PEFT LoRA adapter{for_base} combining "
            f"{_describe_all(prov.get('adapters') or [], prov.get('weights'))} by `{prov.get('method', '?')}`, "
            f"made with {_tool(version)}.",
            "Its factors carry every input's scale and weight; its config gives every module scale 1.",
        ]
    what = prov.get("message") or "converted"
    return [
        f"A PEFT LoRA adapter{for_base}, converted with {_tool(version)}: {what}.",
        f"Every module keeps the scale PEFT applied to the original adapter {_describe(prov.get('adapter'))}.",
        "",
        f"- Convention now: {convention_label(str(prov.get('convention', 'unknown')), 'formula')}",
        f"- Conversion: {prov.get('method', '?')} (target: {prov.get('target', '?')})",
    ]
