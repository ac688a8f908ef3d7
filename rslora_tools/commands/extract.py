"""`extract`, a full fine-tune (TUNED) as a LoRA adapter on BASE (docs/extraction.md).

Streams both checkpoints tensor by tensor (plan/extract.py gives each tensor its role):
unchanged tensors are skipped; a changed 2-D weight's float32 delta is factorised
(compute/factorize.py) at a fixed rank, an energy or an error; changed biases of those modules go
with them (lora_bias when every LoRA module has a bias, else bias="lora_only" with the tuned
vectors); any other changed tensor puts its module in modules_to_save. Nothing changed is
dropped: every changed tensor is in the adapter, and the report lists how.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter.adapter import PEFT_PREFIX
from ..adapter.config_rewrite import scale_one_config
from ..adapter.scaling import scale_in
from ..adapter.writer import AdapterWriter
from ..errors import InputError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint, CheckpointFiles, open_checkpoint
from ..formats.output import check_output_location, writing
from ..formats.provenance import write_provenance
from ..formats.quant import checkpoint_scheme
from ..plan.extract import ExtractionPlan, plan_extraction
from ..plan.ties import tied_embedding
from ..reporting import ProgressCallback, Report, counted, worst_error
from .common import base_input, check_push, publish, with_fields
from .options import ExtractOptions

HEAD = "lm_head"  # the output head a tied input embedding is shared with (PEFT's ensure_weight_tying)

if TYPE_CHECKING:
    import torch


@dataclass
class ExtractReport(Report):
    """What `extract` did (or would do); `to_dict()` is what `--json` prints."""

    base: str
    tuned: str
    out: str
    convention: str
    modules: list[dict[str, Any]]  # per LoRA module: name, kind, rank, energy, relative_error, method
    modules_to_save: list[str]
    biases: str  # "none", "lora_bias" or "lora_only"
    bias_modules: list[str]
    unchanged: int  # tensors equal in both models (skipped)
    bytes: int
    dry_run: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    push: dict[str, Any] | None = None  # the push of OUT when one was asked

    @property
    def worst_error(self) -> float | None:
        return worst_error(self.modules)


@dataclass
class _Found:
    """What the pass over the models found."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)  # module -> (B, A, role)
    rows: list[dict[str, Any]] = field(default_factory=list)
    bias_delta: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> tuned - base
    bias_tuned: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: dict[str, list[str]] = field(default_factory=dict)  # modules_to_save module -> its tensor names
    unchanged: int = 0


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    options: ExtractOptions | None = None,
    progress: ProgressCallback | None = None,
    **fields: Any,
) -> ExtractReport:
    """Extract TUNED - BASE as a PEFT LoRA adapter into OUT.

    Args:
        base, tuned: the models (folders or Hub repos), with the same tensor names and shapes.
        out: the adapter folder (written atomically).
        options: an `ExtractOptions`; keyword arguments are taken as its fields (`rank=8`, `energy=0.95`).
        progress: called as `progress(bytes_read_now, total_bytes)` as TUNED is read.
    """
    started = time.monotonic()
    options = with_fields(options, ExtractOptions, fields)
    base_source, tuned_source = base_input(base, token=options.token), base_input(tuned, token=options.token)
    sources = {"base": base_source.to_dict(), "tuned": tuned_source.to_dict()}
    check_push(options, sources)
    base_ckpt, tuned_ckpt = open_checkpoint(base_source.path), open_checkpoint(tuned_source.path)
    for name, ckpt in (("BASE", base_ckpt), ("TUNED", tuned_ckpt)):
        scheme = checkpoint_scheme(ckpt.config, str(ckpt.folder))
        if scheme is not None:
            raise UnsupportedAdapterError(
                f"{ckpt.folder}: {name} is quantized ({scheme.label}); extract compares unquantized weights: pass the "
                "unquantized model it was made from"
            )
    plan = plan_extraction(base_ckpt, tuned_ckpt, list(options.target_modules) if options.target_modules else None)
    out = Path(out)
    written = check_output_location(out, [base_ckpt.folder, tuned_ckpt.folder], options.overwrite, writes_adapter=True)
    convention = "rslora" if options.rslora else "classic"
    if options.dry_run:
        return _dry_report(plan, base_ckpt, tuned_ckpt, out, convention, options.rank)
    found = _scan(
        plan,
        base_ckpt,
        tuned_ckpt,
        _torch_device(options.device),
        progress,
        dict(rank=options.rank, energy=options.energy, max_error=options.max_error, exact=options.exact),
    )
    tensors, config, report = _assemble(
        found, plan, base_ckpt, tuned_ckpt, out, options.rslora, options.alpha, sources
    )
    with writing(out, written, overwrite=options.overwrite, what="writing the adapter", warnings=report.notes) as tmp:
        entries = [(k, _st_dtype(v), tuple(v.shape)) for k, v in tensors.items()]
        with AdapterWriter(tmp, config, entries, {"format": "pt"}, allowed_by_flag=False) as writer:
            for key, value in tensors.items():
                writer.write(key, value)
        write_provenance(
            tmp,
            {
                "operation": "extract",
                "base": sources["base"],
                "tuned": sources["tuned"],
                "convention": convention,
                "base_model": config.get("base_model_name_or_path"),
            },
        )
    pushed = publish(out, options)
    report.push = pushed.to_dict() if pushed is not None else None
    report.seconds = time.monotonic() - started
    return report


def _torch_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("[[device]] cuda: CUDA is not available")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _scan(
    plan: ExtractionPlan,
    base: Checkpoint,
    tuned: Checkpoint,
    device: str,
    progress: ProgressCallback | None,
    how: dict[str, Any],
) -> _Found:
    """Read both models tensor by tensor and factorise what changed."""
    import torch

    from ..compute.factorize import factorize

    found = _Found()
    base_files, tuned_files = CheckpointFiles(base), CheckpointFiles(tuned)
    total = sum(tuned.info(r.name).nbytes for r in plan.roles)
    try:
        for r in plan.roles:
            before, after = base_files.read(r.name), tuned_files.read(r.name)
            if progress is not None:
                progress(tuned.info(r.name).nbytes, total)
            if torch.equal(before.view(torch.uint8), after.view(torch.uint8)):
                found.unchanged += 1
                continue
            if r.role in ("linear", "conv1d", "embedding") and plan.targeted(r.module):
                delta = after.to(device, torch.float32) - before.to(device, torch.float32)
                if r.role != "linear":  # Conv1D (in, out) and embeddings (vocab, dim): B @ A is the transpose
                    delta = delta.T.contiguous()
                _check_delta_finite(r.name, before, after, delta)
                try:
                    f = factorize(delta, **how)
                except torch.linalg.LinAlgError as e:
                    raise InputError(
                        f"{r.name}: the SVD of its delta did not converge ({e}); nothing was written"
                    ) from e
                found.factors[r.module] = (f.b.cpu(), f.a.cpu(), r.role)
                found.rows.append(
                    {
                        "name": r.module,
                        "kind": r.role,
                        "shape": list(r.shape),
                        "rank": f.rank,
                        "energy": f.energy,
                        "relative_error": f.relative_error,
                        "method": f.method,
                    }
                )
            elif r.role == "bias":
                found.bias_delta[r.module] = after.float() - before.float()
                found.bias_tuned[r.module] = after
            else:
                found.saved.setdefault(r.module, []).append(r.name)
    finally:
        base_files.close()
        tuned_files.close()
    return found


def _check_delta_finite(name: str, before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> None:
    """A delta with NaN or Inf (TUNED diverged, or a value overflowed) cannot be factorised into an adapter."""
    import torch

    if bool(torch.isfinite(delta).all()):
        return
    tuned_bad = int(after.numel() - torch.isfinite(after).sum())
    base_bad = int(before.numel() - torch.isfinite(before).sum())
    where = f"TUNED's tensor holds {counted(tuned_bad, 'NaN or Inf value')}" if tuned_bad else "TUNED - BASE overflows"
    if base_bad:
        where += f" (BASE's holds {base_bad})"
    raise InputError(
        f"{name}: {where}; a delta with NaN or Inf cannot be an adapter (a diverged fine-tune?), so "
        "nothing was written"
    )


def _assemble(
    found: _Found,
    plan: ExtractionPlan,
    base: Checkpoint,
    tuned: Checkpoint,
    out: Path,
    rslora: bool,
    alpha: float | None,
    sources: dict[str, Any] | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], ExtractReport]:
    """The adapter's tensors (PEFT's key names), its config and the report."""
    import torch

    for module in list(found.bias_delta):  # a changed bias whose weight is not factorised: save the module whole
        if module not in found.factors:
            found.saved.setdefault(module, []).append(f"{module}.bias")
            del found.bias_delta[module], found.bias_tuned[module]
    clash = sorted(set(found.saved) & set(found.factors))
    if clash:
        raise UnsupportedAdapterError(
            f"module {clash[0]!r} has a factorisable weight and another changed tensor; "
            "PEFT cannot both wrap it with LoRA and save it whole"
        )
    if not found.factors and not found.saved:
        raise InputError("BASE and TUNED are identical: there is nothing to extract")
    tied = tied_embedding(tuned)
    tied_module = tied.rpartition(".")[0] if tied else None
    config = _config(found, plan, tuned, rslora, alpha, sources, tied_module if tied_module in found.factors else None)
    _tie_the_head(config, found, tied_module)
    with_bias = {m for m, _ in found.factors.items() if f"{m}.bias" in tuned.weight_map}
    biases = "none"
    if found.bias_delta:
        biases = "lora_bias" if with_bias == set(found.factors) else "lora_only"
    config["lora_bias"] = biases == "lora_bias"
    config["bias"] = "lora_only" if biases == "lora_only" else "none"
    tensors: dict[str, torch.Tensor] = {}
    for module, (b, a, role) in found.factors.items():
        s = scale_in(config, module).scale
        root = (1.0 / s) ** 0.5 if s != 1.0 else 1.0
        b, a = (b * root, a * root) if root != 1.0 else (b, a)
        if role == "embedding":
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = b.contiguous()
        else:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        if biases == "lora_bias":
            delta = found.bias_delta.get(module)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.bias"] = (
                delta / s if delta is not None else torch.zeros(b.shape[0])
            ).contiguous()
    if tied_module in found.factors:  # the head's copy of the embedding LoRA, transposed, as PEFT saves it
        emb = f"{PEFT_PREFIX}{tied_module}"
        tensors[f"{PEFT_PREFIX}{HEAD}.lora_A.weight"] = tensors[f"{emb}.lora_embedding_B"].T.contiguous()
        tensors[f"{PEFT_PREFIX}{HEAD}.lora_B.weight"] = tensors[f"{emb}.lora_embedding_A"].T.contiguous()
    _add_saved(tensors, found, tuned, config, tied)
    report = ExtractReport(
        str(base.folder),
        str(tuned.folder),
        str(out),
        "rslora" if rslora else "classic",
        found.rows,
        sorted(found.saved),
        biases,
        sorted(found.bias_delta),
        found.unchanged,
        sum(v.numel() * v.element_size() for v in tensors.values()),
    )
    return tensors, config, report


def _tie_the_head(config: dict[str, Any], found: _Found, tied_module: str | None) -> None:
    """A tied lm_head must change with the embedding when PEFT serves the adapter
    (docs/extraction.md, "Tied embeddings"): PEFT's ensure_weight_tying does it for modules named embed_tokens only
    (peft 0.21.2, utils/constants.py EMBEDDING_LAYER_NAMES); elsewhere (GPT-2's wte) the head is an adapter module of
    its own."""
    if tied_module is None or (tied_module not in found.factors and tied_module not in found.saved):
        return
    if tied_module.rpartition(".")[2] == "embed_tokens":
        config["ensure_weight_tying"] = True
    elif tied_module in found.factors:
        config["target_modules"] = sorted({*config["target_modules"], HEAD})
    else:
        config["modules_to_save"] = sorted({*(config["modules_to_save"] or []), HEAD})


def _add_saved(
    tensors: dict[str, torch.Tensor], found: _Found, tuned: Checkpoint, config: dict[str, Any], tied: str | None
) -> None:
    """lora_only biases and modules_to_save, whole, as PEFT saves them (a tied head saved whole as well)."""
    if config["bias"] == "lora_only":
        for module, value in found.bias_tuned.items():
            tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = value.contiguous()  # as PEFT saves lora_only
    reader = CheckpointFiles(tuned)
    try:
        for module, names in found.saved.items():
            params = [n for n in tuned.weight_map if n.rpartition(".")[0] == module]
            for name in params:  # the whole module, as PEFT saves modules_to_save
                tensors[f"{PEFT_PREFIX}{name}"] = reader.read(name).contiguous()
        if tied is not None and HEAD in (config.get("modules_to_save") or []):  # the tied head, saved whole too
            tensors[f"{PEFT_PREFIX}{HEAD}.weight"] = tensors[f"{PEFT_PREFIX}{tied}"]
    finally:
        reader.close()


def _config(
    found: _Found,
    plan: ExtractionPlan,
    tuned: Checkpoint,
    rslora: bool,
    alpha: float | None,
    sources: dict[str, Any] | None,
    tied_module: str | None = None,
) -> dict[str, Any]:
    model_config = tuned.config or {}
    architectures = model_config.get("architectures") or []
    base_source = (sources or {}).get("base") or {}
    fields: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None,
        "base_model_name_or_path": base_source.get("repo_id") or base_source.get("spec"),
        "revision": base_source.get("revision"),
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "fan_in_fan_out": plan.conv1d and any(role == "conv1d" for _, _, role in found.factors.values()),
        "target_modules": sorted(found.factors),
        "modules_to_save": sorted(found.saved) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
    }
    ranks = {m: b.shape[1] for m, (b, _, _) in found.factors.items()}
    if not ranks:
        raise UnsupportedAdapterError(
            f"TUNED differs from BASE only in tensors LoRA cannot express ({', '.join(sorted(found.saved)[:3])}"
            f"{', ...' if len(found.saved) > 3 else ''}); PEFT refuses an adapter without LoRA modules, so there is "
            f"no "
            "adapter to write: use TUNED itself"
        )
    if tied_module is not None:  # the tied head gets the embedding's rank (and so its scale) through the patterns
        ranks[HEAD] = ranks[tied_module]
    config = scale_one_config(fields, ranks, use_rslora=rslora)
    if alpha is not None:
        config = dict(config, lora_alpha=alpha, alpha_pattern={})
    return config


def _dry_report(
    plan: ExtractionPlan, base: Checkpoint, tuned: Checkpoint, out: Path, convention: str, rank: int | None
) -> ExtractReport:
    """The plan from headers only: which tensors could change, and the adapter's size at the fixed rank."""
    r = rank or 16  # with --energy or --max-error the ranks are only known from the data
    rows = []
    size = 0
    for role in plan.roles:
        if role.role in ("linear", "conv1d", "embedding") and plan.targeted(role.module):
            k = min(r, *role.shape)
            rows.append(
                {
                    "name": role.module,
                    "kind": role.role,
                    "shape": list(role.shape),
                    "rank": k,
                    "energy": None,
                    "relative_error": None,
                    "method": None,
                }
            )
            size += 4 * k * sum(role.shape)
    report = ExtractReport(
        str(base.folder), str(tuned.folder), str(out), convention, rows, [], "unknown", [], 0, size, dry_run=True
    )
    report.notes.append(
        "a dry run reads headers only: every factorisable weight is listed with the rank it would get "
        f"at --rank {r} (an upper bound of the size: unchanged weights are skipped when data is read)"
    )
    return report


def _st_dtype(t: torch.Tensor) -> str:
    from ..formats.safetensors_file import torch_to_safetensors_dtype

    return torch_to_safetensors_dtype(t.dtype)
