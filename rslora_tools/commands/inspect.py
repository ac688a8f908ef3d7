"""`inspect`, what an adapter is, the scale each runtime would apply, and what is wrong with it.

Reads only the config and safetensors headers (and, with a base, the base's headers), so it is
fast for any adapter size. Findings ("lints") have a level: error (PEFT would fail or merge
something else than intended), warning (likely a mistake), info (worth knowing).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..adapter.adapter import Adapter, LoraModule
from ..adapter.config import MUTATING_INITS
from ..adapter.load import load_adapter
from ..adapter.module_scales import (
    ModuleEntry,
    module_entries,
    pattern_warnings,
    rank_mismatch,
)
from ..adapter.relative import variant_name
from ..adapter.runtimes import (
    FEATURE_NAMES,
    HISTORY,
    RUNTIMES,
    Runtime,
    adapter_features,
    format_mismatch,
    missing_features,
    release,
    runtime,
    runtime_scale,
)
from ..adapter.scaling import unstable_patterns
from ..errors import RsloraError
from ..plan.gguf import tied_embedding_problem
from ..plan.merge import plan_merge
from ..reporting import Report
from .common import AdapterSpec, adapter_input, base_input, check_order, lora_only, with_fields
from .options import InspectOptions

if TYPE_CHECKING:
    from ..hub.resolve import Source

_TIED_NAMES = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_out|output)$")


LintLevel = Literal["error", "warning", "info"]
RuntimeStatus = Literal["exact", "wrong scale", "cannot serve"]


@dataclass
class Lint:
    """One finding: error (PEFT would fail or merge something else), warning (likely a mistake), info."""

    level: LintLevel
    code: str
    message: str


@dataclass
class InspectReport(Report):
    """What `inspect` found; `to_dict()` is what `--json` prints."""

    adapter: str
    convention: str
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    features: list[str]
    modules: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    runtimes: dict[str, dict[str, Any]]
    lints: list[Lint] = field(default_factory=list)
    base: str | None = None
    init_variant: str | None = None  # "PiSSA", "OLoRA", "CorDA", "LoRA-GA", "LoftQ": trained on a residual base
    merge_needs_initial: bool = False  # merge/convert need --initial INIT (or --base-is-residual)
    applies_to: dict[str, list[str]] = field(
        default_factory=dict
    )  # with a base: adapter module -> the tensors it changes
    base_format: str | None = None  # with a quantized base: its format ("fp8 (blocks 128x128)", "nf4 (...)")
    quantized_targets: list[str] = field(
        default_factory=list
    )  # base tensors the adapter changes that are stored quantized
    adapter_format: str = "peft"  # "mlx-lm": an mlx-lm adapter, shown as the PEFT adapter it equals (adapter/mlx.py)

    @property
    def errors(self) -> int:
        return sum(lint.level == "error" for lint in self.lints)

    @property
    def warnings(self) -> int:
        return sum(lint.level == "warning" for lint in self.lints)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"], d["warnings"] = self.errors, self.warnings
        return d


def inspect_adapter(adapter: AdapterSpec, *, options: InspectOptions | None = None, **fields: Any) -> InspectReport:
    """Inspect an adapter from its config and tensor headers.

    Args:
        adapter: the adapter: a folder, a Hub repo or a loaded `Adapter`.
        options: an `InspectOptions`; keyword arguments are taken as its fields (`base=...`, `runtimes=["vllm"]`).
            The runtimes you name: their problems are warnings; other runtimes' problems (current releases) are
            info, and so are those of older releases of the runtimes you name, where they behave differently.

    Returns:
        An `InspectReport`: per-module ranks, alphas and scales, each runtime's scale, and lints.
    """
    options = with_fields(options, InspectOptions, fields)
    if options.base is not None:
        check_order(
            "inspect",
            "ADAPTER, base=BASE",
            [("ADAPTER", adapter, ("adapter",)), ("[[base]]", options.base, ("model", "merged"))],
        )
    path, _ = adapter_input(adapter, revision=options.revision, token=options.token, allow_pickle=options.allow_pickle)
    base_source = base_input(options.base, token=options.token) if options.base is not None else None
    base = base_source.path if base_source is not None else None
    runtimes = list(options.runtimes)
    allow_pickle = options.allow_pickle
    loaded = path if isinstance(path, Adapter) else load_adapter(path, allow_pickle=allow_pickle)
    lora_only([loaded], "inspect")
    cfg = loaded.config
    entries = module_entries(loaded, check_ranks=False, names=_base_names(loaded, base))
    fields = cfg.normalized()
    selected = {spec: runtime(spec) for spec in runtimes or []}
    columns = {**RUNTIMES, **{spec: rt for spec, rt in selected.items() if "@" in spec}}
    lints: list[Lint] = []
    summaries = {spec: _summary(rt, loaded, fields, entries) for spec, rt in columns.items()}
    serving = {spec: rt for spec, rt in columns.items() if summaries[spec]["status"] != "cannot serve"}
    modules = [_module_row(fields, e, columns, serving) for e in entries]
    report = InspectReport(
        adapter=str(loaded.path),
        convention=cfg.convention,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        rank_pattern=cfg.rank_pattern,
        alpha_pattern=cfg.alpha_pattern,
        features=[FEATURE_NAMES[f] for f in adapter_features(loaded)],
        modules=modules,
        groups=_groups(modules),
        runtimes=summaries,
        lints=lints,
        base=str(base) if base is not None else None,
        init_variant=variant_name(loaded),
        merge_needs_initial=loaded.config.init_variant in MUTATING_INITS,
        adapter_format=loaded.source_format,
    )
    _lint_initialisation(report, lints)
    _lint_ranks(entries, lints)
    _lint_patterns(loaded, fields, entries, lints)
    _lint_features(loaded, entries, lints)
    _lint_runtimes(report, set(selected), lints)
    _lint_older_releases(report, loaded, fields, entries, selected, lints)
    if base_source is not None:
        _lint_base(loaded, base_source, report, set(selected), lints)
    _lint_runtime_layouts(entries, selected, base, lints)
    return report


def _module_row(
    fields: dict[str, Any], e: ModuleEntry, columns: dict[str, Runtime], serving: dict[str, Runtime]
) -> dict[str, Any]:
    """One module's rank, alpha and PEFT scale, and each runtime's scale (None where it cannot serve the adapter)."""
    peft = e.scale.scale
    scales = {}
    for spec, rt in columns.items():
        s = runtime_scale(rt, fields, e) if spec in serving else None
        scales[spec] = {"scale": s, "ratio": s / peft if s is not None and peft else None}
    return {
        "name": e.module.name,
        "pattern_name": e.name,
        "kind": e.wrapping,
        "rank": e.shape_rank,
        "config_rank": e.scale.r,
        "alpha": e.scale.alpha,
        "scale": peft,
        "rank_key": e.scale.rank_key,
        "alpha_key": e.scale.alpha_key,
        "runtimes": scales,
    }


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.*.mlp.up_proj`: the name shared across layers."""
    return re.sub(r"\.(\d+)(?=\.|$)", ".*", name)


def _groups(modules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Modules that agree on everything but their layer number share a row."""
    groups: dict[tuple, dict[str, Any]] = {}
    for m in modules:
        generic = layer_pattern(m["name"])
        layers = [int(x) for x in re.findall(r"\.(\d+)(?=\.|$)", m["name"])[:1]]
        key = (generic, m["rank"], m["alpha"], m["scale"], tuple(v["scale"] for v in m["runtimes"].values()))
        g = groups.setdefault(
            key,
            {
                "modules": generic,
                "count": 0,
                "layers": [],
                "rank": m["rank"],
                "alpha": m["alpha"],
                "scale": m["scale"],
                "ratios": {k: v["ratio"] for k, v in m["runtimes"].items()},
            },
        )
        g["count"] += 1
        g["layers"] += layers
    for g in groups.values():
        g["layers"] = _ranges(sorted(set(g["layers"])))
    return list(groups.values())


def _ranges(numbers: list[int]) -> str:
    parts, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def _summary(rt: Runtime, adapter: Adapter, fields: dict[str, Any], entries: list[ModuleEntry]) -> dict[str, Any]:
    """One runtime at one range of releases: exact, wrong scale (and how wrong) or cannot serve (and why)."""
    lacks = missing_features(rt, adapter)
    other_format = format_mismatch(rt, adapter)
    if other_format is not None:
        lacks.insert(0, other_format)
    scales = [(e, runtime_scale(rt, fields, e)) for e in entries]
    if any(s is None for _, s in scales):
        lacks.append("it refuses rsLoRA adapters (use_rslora: true)")
    off = [(e, s) for e, s in scales if s is not None and s != e.scale.scale]
    ratios = [s / e.scale.scale for e, s in off if e.scale.scale]
    status: RuntimeStatus = "cannot serve" if lacks else ("wrong scale" if off else "exact")
    return {
        "label": rt.label,
        "version": rt.versions,
        "evidence": rt.evidence,
        "status": status,
        "reasons": lacks,
        "modules_off": len(off),
        "ratio_min": min(ratios) if ratios else 1.0,
        "ratio_max": max(ratios) if ratios else 1.0,
    }


def _lint_ranks(entries: list[ModuleEntry], lints: list[Lint]) -> None:
    for e in entries:
        if e.shape_rank != e.scale.r:
            lints.append(Lint("error", "rank-mismatch", rank_mismatch(e)))


def _lint_patterns(adapter: Adapter, fields: dict[str, Any], entries: list[ModuleEntry], lints: list[Lint]) -> None:
    names = [e.name for e in entries]
    for warning in pattern_warnings(adapter.config, names):
        lints.append(Lint("warning", warning.code, warning.message))
    for reason in unstable_patterns(fields, names):
        if "regular expression" in reason:
            lints.append(Lint("info", "pattern-syntax", f"{reason}: PEFT < 0.15 matches it differently"))


def _lint_features(adapter: Adapter, entries: list[ModuleEntry], lints: list[Lint]) -> None:
    for feature in adapter_features(adapter):
        lints.append(Lint("info", "feature", f"uses {FEATURE_NAMES[feature]}"))
    for e in entries:
        if _TIED_NAMES.search(e.module.name):
            lints.append(
                Lint(
                    "info",
                    "tied-embedding",
                    f"{e.module.name}: LoRA on an embedding or output head; if the base ties them, merging "
                    "unties them (check with --base)",
                )
            )


def _lint_initialisation(report: InspectReport, lints: list[Lint]) -> None:
    if report.init_variant is None:
        return
    if report.merge_needs_initial:
        how = (
            "merge and convert need --initial INIT (the adapter saved right after initialisation), or "
            "--base-is-residual with that residual base"
        )
    else:
        how = "LoftQ is refused; with its own base saved, merge with --base-is-residual"
    lints.append(
        Lint(
            "warning",
            "init-variant",
            f"{report.init_variant} adapter: trained on a residual base (W - s * B0 @ A0), not on the "
            f"original model; runtimes that apply it to the original base serve something else; {how}",
        )
    )


def _lint_runtimes(report: InspectReport, selected: set[str], lints: list[Lint]) -> None:
    for spec, summary in report.runtimes.items():
        level: LintLevel = "warning" if spec in selected else "info"
        who = (
            summary["label"] if summary["version"] == "all releases" else f"{summary['label']} ({summary['version']})"
        )
        lint = _runtime_lint(
            level, who, summary, len(report.modules), f"rslora-tools convert {report.adapter} OUT --target {spec}"
        )
        if lint is not None:
            lints.append(lint)


def _runtime_lint(level: LintLevel, who: str, summary: dict[str, Any], modules: int, fix: str) -> Lint | None:
    if summary["status"] == "cannot serve":
        return Lint(level, "runtime-unsupported", f"{who} cannot serve this adapter: {'; '.join(summary['reasons'])}")
    if summary["status"] == "wrong scale":
        lo, hi = summary["ratio_min"], summary["ratio_max"]
        ratio = f"{lo:.4g}x" if lo == hi else f"{lo:.4g}x to {hi:.4g}x"
        return Lint(
            level,
            "runtime-scale",
            f"{who} would apply {ratio} PEFT's scale to {summary['modules_off']} of {modules} modules; fix: {fix}",
        )
    return None


def _base_names(adapter: Adapter, base: Path | None) -> Callable[[LoraModule], str] | None:
    """With a base, each module's pattern name as the base decides it (the parameter a target_parameters wrapper
    holds: the module's own parameters, their order and shapes), as merge decides it."""
    if base is None:
        return None
    from ..formats.checkpoint import open_checkpoint
    from ..plan.experts import fused_parameter
    from ..plan.names import NameResolver
    from ..plan.quantization import plan_quantization

    try:
        checkpoint = open_checkpoint(base)
        resolver = NameResolver(checkpoint, extra=plan_quantization(checkpoint, None).names())
    except RsloraError:
        return None  # reported by the base checks
    return lambda module: fused_parameter(module, adapter, resolver, resolver.shape)


def _lint_runtime_layouts(
    entries: list[ModuleEntry], selected: dict[str, Runtime], base: Path | None, lints: list[Lint]
) -> None:
    """For each runtime you name: the expert and vision-tower modules it would leave out (error) or needs a flag
    for."""
    from ..adapter.runtime_layouts import ignored_by
    from ..formats.checkpoint import read_json_file

    config = read_json_file(base / "config.json") if base is not None and (base / "config.json").is_file() else None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    for spec, rt in selected.items():
        for found in ignored_by(rt, release(spec), entries, model_type if isinstance(model_type, str) else None):
            lints.append(Lint(found.level, "runtime-ignores", f"{found.message} ({found.evidence})"))


def _lint_older_releases(
    report: InspectReport,
    adapter: Adapter,
    fields: dict[str, Any],
    entries: list[ModuleEntry],
    selected: dict[str, Runtime],
    lints: list[Lint],
) -> None:
    """For each runtime you name: its other releases where this adapter fares differently (info)."""
    for spec, chosen in selected.items():
        for rt in HISTORY[chosen.name]:
            if rt == chosen:
                continue
            summary = _summary(rt, adapter, fields, entries)
            if (summary["status"], summary["reasons"], summary["ratio_min"], summary["ratio_max"]) == tuple(
                report.runtimes[spec][k] for k in ("status", "reasons", "ratio_min", "ratio_max")
            ):
                continue
            pin = f"{rt.name}@{rt.since}" if rt.since else f"{rt.name}@{rt.versions.removeprefix('up to ')}"
            lint = _runtime_lint(
                "info",
                rt.title,
                summary,
                len(report.modules),
                f"rslora-tools convert {report.adapter} OUT --target {pin}",
            )
            if lint is not None:
                lints.append(lint)
            elif summary["status"] == "exact":
                lints.append(Lint("info", "runtime-exact", f"{rt.title} applies PEFT's scale to every module"))


def _recorded_base_lints(adapter: Adapter, checkpoint: Any, source: Source) -> list[Lint]:
    """The base the adapter records (name, revision, class, architecture) against BASE: another model is an error."""
    from ..hub.resolve import base_mismatch, locate_recorded_base

    recorded = adapter.config.base_model_name_or_path
    if not recorded:
        return []
    lints = []
    other_repo = base_mismatch(source, adapter.config.json_dict)
    if other_repo is not None:
        lints.append(Lint("error", "base-differs", other_repo))
    recorded_revision = adapter.config.revision
    if (
        source.repo_id is not None
        and recorded_revision
        and recorded_revision not in ("main", source.revision)
        and not (source.commit or "").startswith(recorded_revision)
    ):
        lints.append(
            Lint(
                "error",
                "base-differs",
                f"the adapter was trained on revision {recorded_revision!r} of its "
                f"base, BASE is at {source.revision or source.commit!r}",
            )
        )
    lints += _base_class_lints(adapter, checkpoint)
    found, _ = locate_recorded_base(recorded, adapter.path)
    recorded_folder = Path(found).expanduser()
    if (recorded_folder / "config.json").is_file() and recorded_folder.resolve() != Path(checkpoint.folder).resolve():
        lints += _recorded_config_lints(recorded, recorded_folder, checkpoint.config or {})
    return lints


def _base_class_lints(adapter: Adapter, checkpoint: Any) -> list[Lint]:
    """The model class the adapter was trained on (PEFT's auto_mapping) against BASE's architectures."""
    config = checkpoint.config or {}
    trained = adapter.config.json_dict.get("auto_mapping") or {}
    trained_class = trained.get("base_model_class") if isinstance(trained, dict) else None
    architectures = config.get("architectures") or []
    if isinstance(trained_class, str) and architectures and trained_class not in architectures:
        return [
            Lint(
                "error",
                "base-class",
                f"the adapter was trained on a {trained_class}, BASE is a "
                f"{', '.join(map(str, architectures))}: names may match while "
                "runtimes load the two differently",
            )
        ]
    return []


def _recorded_config_lints(recorded: str, recorded_folder: Path, config: dict[str, Any]) -> list[Lint]:
    """The recorded base's config.json (a local copy of it) against BASE's: the shape-giving fields must agree."""
    from ..formats.checkpoint import read_json_file

    theirs = read_json_file(recorded_folder / "config.json")
    fields = (
        "model_type",
        "architectures",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "num_local_experts",
        "num_experts",
    )
    differ = [k for k in fields if isinstance(theirs, dict) and theirs.get(k) != config.get(k)]
    if differ:
        return [
            Lint(
                "error",
                "base-differs",
                f"the adapter records its base as {recorded!r} ({recorded_folder.resolve()}), "
                f"whose config.json differs from BASE's in {', '.join(differ)}",
            )
        ]
    return []


def _lint_base(adapter: Adapter, source: Source, report: InspectReport, selected: set[str], lints: list[Lint]) -> None:
    try:
        checkpoint, _, plan = plan_merge(source.path, adapter, collect_unmatched=True)
    except RsloraError as e:
        lints.append(Lint("error", "base", str(e)))
        return
    tied = tied_embedding_problem(adapter, checkpoint)
    if tied:  # llama.cpp cannot take it on this base: say so instead of recommending a conversion
        for spec, summary in report.runtimes.items():
            if spec.partition("@")[0] == "llama.cpp" and summary["status"] != "cannot serve":
                summary.update(status="cannot serve", reasons=[f"embedding LoRA {tied}"])
                for row in [*report.modules, *report.groups]:
                    if "runtimes" in row:
                        row["runtimes"][spec] = {"scale": None, "ratio": None}
                    else:
                        row["ratios"][spec] = None
                lints[:] = [
                    lint
                    for lint in lints
                    if not (lint.code == "runtime-scale" and "--target llama.cpp" in lint.message)
                ]
                lints.append(
                    Lint(
                        "warning" if spec in selected else "info",
                        "runtime-unsupported",
                        f"llama.cpp cannot serve this adapter on this base: embedding LoRA {tied}; merge it instead",
                    )
                )
    for key in plan.unmatched:
        lints.append(Lint("error", "base", f"adapter tensor {key!r} matches no tensor in the base"))
    for t in plan.tensors:
        for op in t.all_lora:
            module = op.module.a_key.removeprefix("base_model.model.").rpartition(".lora_")[0] or op.module.name
            report.applies_to.setdefault(module, []).append(t.name)
    if plan.prequantized and plan.quantization is not None:
        report.base_format = plan.quantization.label
        report.quantized_targets = [t.name for t in plan.tensors if t.quant is not None and t.all_lora]
    if adapter.lora_modules and not report.applies_to:
        lints.append(
            Lint(
                "error",
                "applies-to-nothing",
                "the adapter changes no tensor of the base: served on it, it would change nothing",
            )
        )
    lints.extend(_recorded_base_lints(adapter, checkpoint, source))
    for warning in plan.warnings:
        lints.append(Lint("warning", "base", warning))
    for note in plan.notes:
        lints.append(Lint("info", "base", note))
