"""Recompute what every tensor of a merged folder must be and compare (what `verify` and `merge --verify` run).

The folder is judged as a loader sees it: the checkpoint transformers would load (a folder
with both a single file and an index is a problem), every config.json key that changes the
model, and every tensor. A tensor the merge copies must be byte for byte the base's (compared
as bytes, a block at a time, whatever its dtype); a tensor the merge computes is recomputed
from the same plan (plan/merge.py) and math (compute/torch_ops.py) as `merge`, always with torch (an
independent check of the merge kernel), and is "exact" (same bytes), "within rounding" (every
element at most one unit in the last place of its dtype off, as a GPU merge or another tool may
be) or a mismatch. Comparisons run in blocks, so memory stays at a few copies of one tensor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..adapter.adapter import Adapter
from ..compute.torch_ops import merged_tensor
from ..errors import RsloraError
from ..formats.checkpoint import (
    INDEX_FILE,
    Checkpoint,
    CheckpointFiles,
    open_checkpoint,
    read_json_file,
    updated_config,
)
from ..formats.provenance import read_provenance
from ..formats.quant import QuantScheme, config_dtype
from ..formats.safetensors_file import (
    FLOAT_DTYPES,
    has_torch_dtype,
    read_into,
    tensor_nbytes,
    torch_dtype_name,
)
from ..plan.merge import plan_merge
from ..plan.tensors import Plan, TensorPlan
from ..reporting import ProgressCallback, Report, counted

if TYPE_CHECKING:
    import torch

TensorStatus = Literal["exact", "rounding", "mismatch"]
Verdict = Literal["exact", "within rounding", "mismatch"]

# config.json keys a merge may legitimately write differently (dtype is compared on its own)
_IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}
_BLOCK_BYTES = 4 << 20  # raw comparisons read this much of each file at a time
_BLOCK_ELEMENTS = 1 << 18  # numeric comparisons convert this many elements at a time


@dataclass
class TensorCheck:
    """How one tensor of the merged folder compares with what the merge must produce."""

    name: str
    dtype: str
    changed: bool  # the merge changes it (else it is a copy of the base tensor)
    status: TensorStatus
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    max_ulps: float = 0.0


@dataclass
class VerifyReport(Report):
    """What `verify` found; `to_dict()` is what `--json` prints."""

    merged: str
    base: str
    adapter: str
    verdict: Verdict
    tensors_total: int
    tensors_checked: int
    exact: int = 0
    rounding: int = 0
    mismatched: int = 0
    problems: list[str] = field(default_factory=list)
    tensors: list[TensorCheck] = field(default_factory=list)
    seconds: float = 0.0
    sampled: bool = False  # only a sample of the tensors was asked for
    recipe: dict[str, Any] = field(default_factory=dict)  # how the merge was made, as checked; "from": where from
    warnings: list[str] = field(default_factory=list)  # what is right but will not load (no config.json)
    computed_with: str = ""  # the arithmetic the expected values come from (torch's version, its thread count)

    @property
    def ok(self) -> bool:
        return self.verdict != "mismatch"


def check_folder(
    merged: Path,
    base: Path | Checkpoint,
    adapter: Adapter,
    *,
    trained_on: QuantScheme | None = None,
    base_is_residual: bool = False,
    sample: int | None = None,
    recipe: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Every tensor of the merged folder `merged` (or `sample` of them) against what merging `adapter` (loaded, stacked
    or relative as the merge had it) into `base` must give, and the folder's structure and config.json; `recipe`:
    how the merge was made, as the caller established it (for the report)."""
    started = time.monotonic()
    recorded = read_provenance(merged) if merged.is_dir() else {}
    problems: list[str] = []
    try:
        out: Checkpoint | None = open_checkpoint(merged)
    except RsloraError as e:
        out = None
        problems.append(f"the merged folder cannot be read: {e}")
    checkpoint = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    dtype = _merge_dtype(out, checkpoint) if out is not None else None
    kept = _kept_quantization(recorded, out, checkpoint)
    checkpoint, adapter, plan = plan_merge(
        checkpoint,
        adapter,
        dtype=dtype,
        trained_on=trained_on,
        base_is_residual=base_is_residual,
        keep_quantization=kept,
    )
    chosen = _choose(plan.tensors, sample)
    report = VerifyReport(
        str(merged),
        str(checkpoint.folder),
        str(adapter.path),
        "mismatch",
        len(plan.tensors),
        0,
        problems=problems,
        sampled=len(chosen) < len(plan.tensors),
        recipe=recipe or {},
    )
    if out is not None:
        report.problems += _adapter_files(Path(out.folder)) + _structure_problems(out, checkpoint, plan)
        if out.config is None:
            report.warnings.append(
                f"{merged} has no config.json (nor has BASE): transformers cannot load it without "
                "one; copy the base model's config.json into it"
            )
        report.tensors = _check_tensors(out, checkpoint, adapter, chosen, progress, {t.name: t for t in plan.tensors})
    report.tensors_checked = len(report.tensors)
    from torch import __version__ as torch_version

    report.computed_with = f"torch {torch_version}, one thread per tensor (as merge computes on any machine)"
    report.exact = sum(c.status == "exact" for c in report.tensors)
    report.rounding = sum(c.status == "rounding" for c in report.tensors)
    report.mismatched = sum(c.status == "mismatch" for c in report.tensors)
    if not report.mismatched and not report.problems:
        report.verdict = "within rounding" if report.rounding else "exact"
    report.seconds = time.monotonic() - started
    return report


def _adapter_files(folder: Path) -> list[str]:
    """Adapter files in a merged folder: loaders would apply that adapter (again) on top of the merged weights."""
    found = sorted(
        p.name for p in folder.iterdir() if p.name == "adapter_config.json" or p.name.startswith("adapter_model.")
    )
    if not found:
        return []
    return [
        f"{', '.join(found)} in the merged folder: transformers and PEFT load such a folder as an adapter and "
        "apply it (again) on top of the merged weights; remove them from the merged model"
    ]


def _kept_quantization(recorded: dict[str, Any], out: Checkpoint | None, base: Checkpoint) -> bool:
    """The merge kept a quantized base's format (--keep-quantization): its record says so, or the merged folder's
    config.json keeps the base's quantization_config."""
    quant = recorded.get("quantization")
    if isinstance(quant, dict) and quant.get("mode") in ("kept", "dequantized"):
        return quant["mode"] == "kept"
    base_quant = (base.config or {}).get("quantization_config")
    return out is not None and base_quant is not None and (out.config or {}).get("quantization_config") == base_quant


def _merge_dtype(out: Checkpoint, base: Checkpoint) -> str | None:
    """The `--dtype` the merged folder was made with: its floating tensors share one dtype the base's do not all
    have."""
    merged = {out.info(n).dtype for n in out.weight_map} & FLOAT_DTYPES
    original = {base.info(n).dtype for n in base.weight_map} & FLOAT_DTYPES
    return next(iter(merged)) if len(merged) == 1 and merged != original else None


def _check_tensors(
    out: Checkpoint,
    checkpoint: Checkpoint,
    adapter: Adapter,
    chosen: list[TensorPlan],
    progress: ProgressCallback | None,
    planned: dict[str, TensorPlan],
) -> list[TensorCheck]:
    checks = []
    total = sum(tensor_nbytes(t.dtype, t.shape) for t in chosen)
    files, merged_files = CheckpointFiles(checkpoint), CheckpointFiles(out)
    requantized: dict[str, dict[str, torch.Tensor]] = {}  # --keep-quantization: weight -> its stored tensors, by name
    global_scales: dict[int, torch.Tensor] = {}  # --keep-quantization of NVFP4: each fused group's global scale
    try:
        for t in chosen:
            if t.name not in out.weight_map:
                continue  # already reported as missing
            info = out.info(t.name)
            if info.shape != t.shape or info.dtype != t.dtype:
                continue  # reported by the structure check
            anchor = planned_anchor(t, planned)
            if anchor is not None:  # codes and scales: the reference quantizer's, on the merged weight, exactly
                if anchor.name not in requantized:
                    requantized[anchor.name] = _requantized(anchor, checkpoint, files, adapter, global_scales)
                checks.append(
                    compare(t.name, merged_files.read(t.name), requantized[anchor.name][t.name], changed=True)
                )
            elif t.untouched and t.source is not None and checkpoint.info(t.source).dtype == t.dtype:
                checks.append(_compare_bytes(t, files, merged_files))
            elif has_torch_dtype(info.dtype):
                actual = merged_files.read(t.name)
                expected = merged_tensor(t, files.read, adapter.tensor, actual.dtype)
                check = compare(t.name, actual, expected, changed=not t.untouched)
                if t.untouched and check.status == "rounding":  # a conversion is exact: only computing rounds
                    check.status = "mismatch"
                checks.append(check)
            if progress is not None:
                progress(tensor_nbytes(info.dtype, info.shape), total)
    finally:
        files.close()
        merged_files.close()
    return checks


def planned_anchor(t: TensorPlan, planned: dict[str, TensorPlan]) -> TensorPlan | None:
    """--keep-quantization: the quantized weight whose step writes `t` (itself, or the codes its scale goes with)."""
    if t.quant is not None and t.quant.keep is not None:
        return t
    return planned[t.written_with] if t.written_with is not None else None


def _requantized(
    t: TensorPlan,
    checkpoint: Checkpoint,
    files: CheckpointFiles,
    adapter: Adapter,
    global_scales: dict[int, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The stored tensors a --keep-quantization merge writes for one weight, by name (compute/requantize.py)."""
    from ..compute.requantize import kept_weight

    q = t.quant
    assert q is not None and q.keep is not None and q.stored is not None
    parts = kept_weight(t, checkpoint, files.read, adapter.tensor, global_scales).parts
    return {q.stored.parts[role]: tensor for role, tensor in parts.items()}


def _compare_bytes(t: TensorPlan, base: CheckpointFiles, merged: CheckpointFiles) -> TensorCheck:
    """A copied tensor: its bytes in the merged folder against the base's, a block at a time."""
    assert t.source is not None
    (fd_a, at_a), (fd_b, at_b) = merged.locate(t.name), base.locate(t.source)
    nbytes = tensor_nbytes(t.dtype, t.shape)
    a, b = memoryview(bytearray(min(nbytes, _BLOCK_BYTES))), memoryview(bytearray(min(nbytes, _BLOCK_BYTES)))
    for start in range(0, nbytes, _BLOCK_BYTES):
        n = min(_BLOCK_BYTES, nbytes - start)
        read_into(fd_a, at_a + start, a[:n], f"{merged.path(t.name)}: tensor {t.name!r}")
        read_into(fd_b, at_b + start, b[:n], f"{base.path(t.source)}: tensor {t.source!r}")
        if a[:n] != b[:n]:
            if has_torch_dtype(t.dtype):  # say how far off it is
                check = compare(t.name, merged.read(t.name), base.read(t.source), changed=False)
                check.status = "mismatch"
                return check
            return TensorCheck(t.name, torch_dtype_name(t.dtype), False, "mismatch", math.inf, math.inf, math.inf)
    return TensorCheck(t.name, torch_dtype_name(t.dtype), False, "exact")


def _choose(planned: list[TensorPlan], sample: int | None) -> list[TensorPlan]:
    """All tensors, or `sample` of them spread evenly over the model (changed tensors first)."""
    if sample is None or sample >= len(planned):
        return planned
    changed = [t for t in planned if not t.untouched]
    copied = [t for t in planned if t.untouched]
    pick = _spread(changed, min(sample, len(changed)))
    pick += _spread(copied, sample - len(pick))
    order = {t.name: i for i, t in enumerate(planned)}
    return sorted(pick, key=lambda t: order[t.name])


def _spread(items: list[TensorPlan], n: int) -> list[TensorPlan]:
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, *, changed: bool) -> TensorCheck:
    """Bytes equal -> exact; every element within 1 ulp of its dtype -> rounding; else mismatch (in blocks)."""
    import torch

    dtype = str(actual.dtype).removeprefix("torch.")
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return TensorCheck(name, dtype, changed, "mismatch", math.inf, math.inf, math.inf)
    a_all, e_all = actual.reshape(-1), expected.contiguous().reshape(-1)
    if torch.equal(a_all.view(torch.uint8), e_all.view(torch.uint8)):
        return TensorCheck(name, dtype, changed, "exact")
    if actual.dtype not in _float_formats():
        return TensorCheck(name, dtype, changed, "mismatch", math.inf, math.inf, math.inf)
    max_abs = max_rel = max_ulps = 0.0
    for start in range(0, a_all.numel(), _BLOCK_ELEMENTS):
        a = a_all[start : start + _BLOCK_ELEMENTS].double()
        e = e_all[start : start + _BLOCK_ELEMENTS].double()
        both_nan = torch.isnan(a) & torch.isnan(e)
        diff = torch.nan_to_num(torch.where(both_nan, torch.zeros_like(a), (a - e).abs()), nan=math.inf)
        rel = torch.where(e != 0, diff / e.abs(), torch.where(diff > 0, math.inf, 0.0))
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float(rel.max()))
        max_ulps = max(max_ulps, float((diff / ulp(e, actual.dtype)).max()))
    status: TensorStatus = "rounding" if max_ulps <= 1.0 else "mismatch"
    return TensorCheck(name, dtype, changed, status, max_abs, max_rel, max_ulps)


def _float_formats() -> dict[torch.dtype, tuple[int, int]]:
    """dtype -> (mantissa bits, smallest normal exponent), for the ulp of a value."""
    import torch

    return {torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float64: (52, -1022)}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at |x| (float64 tensor), subnormals included."""
    import torch

    mantissa, emin = _float_formats()[dtype]
    _, exponent = torch.frexp(x.abs().nan_to_num(posinf=0.0, neginf=0.0))
    exponent = torch.clamp(torch.where(x == 0, emin + 1, exponent), min=emin + 1)
    return torch.pow(2.0, (exponent - 1 - mantissa).double())


def _structure_problems(out: Checkpoint, base: Checkpoint, plan: Plan) -> list[str]:
    """Index vs shards, names, shapes, dtypes, config.json and total_size of the merged folder."""
    problems = []
    planned = {t.name: t for t in plan.tensors}
    present = set(out.weight_map)
    missing = [n for n in planned if n not in present]
    extra = sorted(present - set(planned))
    if missing:
        problems.append(f"{counted(len(missing), 'tensor')} missing from the merged folder, e.g. {missing[0]!r}")
    if extra:
        problems.append(f"{counted(len(extra), 'unexpected tensor')} in the merged folder, e.g. {extra[0]!r}")
    for name, t in planned.items():
        if name not in present:
            continue
        info = out.info(name)
        if info.shape != t.shape:
            problems.append(f"{name}: shape {list(info.shape)} in the merged folder, expected {list(t.shape)}")
        elif info.dtype != t.dtype:
            problems.append(f"{name}: dtype {info.dtype} in the merged folder, expected {t.dtype}")
    if out.index_metadata is not None and "total_size" in out.index_metadata:
        actual = sum(tensor_nbytes(out.info(n).dtype, out.info(n).shape) for n in present)
        if out.index_metadata["total_size"] != actual:
            problems.append(
                f"{INDEX_FILE}: total_size is {out.index_metadata['total_size']}, the shards hold {actual} bytes"
            )
    problems += _config_problems(out, base, plan)
    problems += _fused_scale_problems(out, base)
    return problems


def _fused_scale_problems(out: Checkpoint, base: Checkpoint) -> list[str]:
    """NVFP4 weights that vLLM and SGLang load as one layer (plan/quantization.py fused_groups) share one global
    scale in the base but not in the merged folder: those runtimes serve the group with the largest, its other
    members at the wrong scale."""
    suffix = ".weight_global_scale"
    if not any(n.endswith(suffix) for n in base.weight_map):
        return []
    from ..plan.quantization import fused_groups

    weights = [n.removesuffix(suffix) + ".weight" for n in out.weight_map if n.endswith(suffix)]
    problems = []
    files, base_files = CheckpointFiles(out), CheckpointFiles(base)
    try:
        for module, members in fused_groups(weights, out.weight_map):
            names = [m.removesuffix(".weight") + suffix for m in members]
            if not all(n in base.weight_map for n in names):
                continue
            ours = [float(files.read(n).reshape(-1)[0]) for n in names]
            theirs = [float(base_files.read(n).reshape(-1)[0]) for n in names]
            if len(set(theirs)) == 1 and len(set(ours)) > 1:
                parts = "/".join(m.removesuffix(".weight").rpartition(".")[2] for m in members)
                problems.append(
                    f"{module}: {parts} share one weight_global_scale in BASE but not in the merged "
                    f"folder ({', '.join(f'{v:g}' for v in ours)}); vLLM and SGLang load them as one layer "
                    "with the largest, serving the others at the wrong scale"
                )
    finally:
        files.close()
        base_files.close()
    return problems


def _config_problems(out: Checkpoint, base: Checkpoint, plan: Plan) -> list[str]:
    """Every key of config.json as the merge must write it (nested configs included); dtype by its effective value."""
    if base.config is None:
        return []
    path = Path(out.folder) / "config.json"
    if not path.is_file():
        return ["config.json is missing from the merged folder"]
    try:
        merged_config = read_json_file(path)
    except RsloraError as e:
        return [str(e)]
    if not isinstance(merged_config, dict):
        return ["config.json in the merged folder is not a JSON object"]
    expected = updated_config(base.config, plan.config_updates)
    problems = []
    for key in sorted(set(expected) | set(merged_config)):
        if key not in _IGNORED_CONFIG_KEYS and expected.get(key) != merged_config.get(key):
            problems.append(f"config.json: {key} is {merged_config.get(key)!r}, expected {expected.get(key)!r}")
    want, have = config_dtype(expected), config_dtype(merged_config)
    if want is not None and have is not None and want != have:  # from_pretrained(dtype="auto") casts to it
        problems.append(f"config.json: dtype is {have!r}, expected {want!r}")
    embed = next((t for t in plan.tensors if t.name.endswith("embed_tokens.weight")), None)
    vocab = merged_config.get("vocab_size")
    if embed is not None and isinstance(vocab, int) and vocab != embed.shape[0]:
        problems.append(f"config.json: vocab_size {vocab} does not match {embed.name} with {embed.shape[0]} rows")
    return problems
