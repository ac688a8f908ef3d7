"""Stage 6, commands: `verify`, recompute what every merged tensor must be and compare it with a merged folder.

The expected value comes from the same plan (planner.py) and math (compute.py) as `merge`,
streamed one tensor at a time, always with torch: an independent check of the merge kernel. A tensor is "exact" when its bytes are equal, "rounding" when it is within one unit in
the last place of its dtype (what a GPU merge or another implementation may differ by), else a
mismatch. The folder itself is checked too: index vs shards, tensor names, shapes and dtypes,
config.json and the index's total_size.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .adapter import Adapter
from .checkpoint import INDEX_FILE, Checkpoint, CheckpointFiles, open_checkpoint, read_json_file
from .compute import merged_tensor
from .errors import RsloraError
from .plan import Plan, TensorPlan
from .planner import plan_merge
from .safetensors_file import FLOAT_DTYPES, has_torch_dtype, tensor_nbytes

# dtype -> (mantissa bits, smallest normal exponent) for the ulp of a value
_FLOAT_FORMAT = {torch.float32: (23, -126), torch.bfloat16: (7, -126), torch.float16: (10, -14),
                 torch.float64: (52, -1022)}
_IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


TensorStatus = Literal["exact", "rounding", "mismatch"]
Verdict = Literal["exact", "within rounding", "mismatch"]
ProgressCallback = Callable[[int, int], None]  # (bytes just checked, total bytes to check)


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
class VerifyReport:
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

    @property
    def ok(self) -> bool:
        return self.verdict != "mismatch"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(
    merged: str | os.PathLike[str],
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str] | Adapter,
    *,
    sample: int | None = None,
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Check that MERGED is BASE with ADAPTER merged: recompute every tensor and compare, and check the folder.

    Args:
        merged: the merged model folder to check.
        base: the base model folder.
        adapter: the adapter folder, or a loaded `Adapter`.
        sample: check only this many tensors, spread over the model (changed ones first).
        allow_pickle: read an adapter that exists only as `adapter_model.bin` (weights_only).
        progress: called as `progress(bytes_checked_now, total_bytes)` after each tensor.

    Returns:
        A `VerifyReport`: per tensor exact, within rounding or mismatch, and the folder's problems.
    """
    started = time.monotonic()
    checkpoint, adapter_obj, plan = plan_merge(base, adapter, allow_pickle=allow_pickle)
    planned = plan.tensors
    report = VerifyReport(str(merged), str(checkpoint.folder), str(adapter_obj.path), "mismatch", len(planned), 0)
    try:
        out = open_checkpoint(merged)
    except RsloraError as e:
        report.problems.append(f"the merged folder cannot be read: {e}")
        report.seconds = time.monotonic() - started
        return report
    report.problems += _structure_problems(out, checkpoint, plan)
    files, merged_files = CheckpointFiles(checkpoint), CheckpointFiles(out)
    chosen = _choose(planned, sample)
    total = sum(tensor_nbytes(t.dtype, t.shape) for t in chosen)
    try:
        for t in chosen:
            if t.name not in out.weight_map:
                continue  # already reported as missing
            info = out.info(t.name)
            if info.shape != t.shape or not has_torch_dtype(info.dtype):
                continue  # reported by the structure check
            actual = merged_files.read(t.name)
            expected = merged_tensor(t, files.read, adapter_obj.tensor, actual.dtype)
            check = compare(t.name, actual, expected, changed=not t.untouched)
            report.tensors.append(check)
            if progress is not None:
                progress(tensor_nbytes(info.dtype, info.shape), total)
    finally:
        files.close()
        merged_files.close()
    report.tensors_checked = len(report.tensors)
    report.exact = sum(c.status == "exact" for c in report.tensors)
    report.rounding = sum(c.status == "rounding" for c in report.tensors)
    report.mismatched = sum(c.status == "mismatch" for c in report.tensors)
    if report.mismatched or report.problems:
        report.verdict = "mismatch"
    else:
        report.verdict = "within rounding" if report.rounding else "exact"
    report.seconds = time.monotonic() - started
    return report


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
    """Bytes equal -> exact; every element within 1 ulp of its dtype -> rounding; else mismatch."""
    dtype = str(actual.dtype).removeprefix("torch.")
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return TensorCheck(name, dtype, changed, "mismatch", math.inf, math.inf, math.inf)
    if torch.equal(actual.reshape(-1).view(torch.uint8), expected.contiguous().reshape(-1).view(torch.uint8)):
        return TensorCheck(name, dtype, changed, "exact")
    if actual.dtype not in _FLOAT_FORMAT:
        return TensorCheck(name, dtype, changed, "mismatch", math.inf, math.inf, math.inf)
    a, e = actual.double(), expected.double()
    both_nan = torch.isnan(a) & torch.isnan(e)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    diff = torch.nan_to_num(diff, nan=math.inf)
    ulps = diff / ulp(e, actual.dtype)
    rel = torch.where(e != 0, diff / e.abs(), torch.where(diff > 0, math.inf, 0.0))
    max_ulps = float(ulps.max())
    status: TensorStatus = "rounding" if max_ulps <= 1.0 else "mismatch"
    return TensorCheck(name, dtype, changed, status, float(diff.max()), float(rel.max()), max_ulps)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` values at |x| (float64 tensor), subnormals included."""
    mantissa, emin = _FLOAT_FORMAT[dtype]
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
        problems.append(f"{len(missing)} tensor(s) missing from the merged folder, e.g. {missing[0]!r}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) in the merged folder, e.g. {extra[0]!r}")
    for name, t in planned.items():
        if name not in present:
            continue
        info = out.info(name)
        if info.shape != t.shape:
            problems.append(f"{name}: shape {list(info.shape)} in the merged folder, expected {list(t.shape)}")
        elif info.dtype != t.dtype and not (t.dtype in FLOAT_DTYPES and info.dtype in FLOAT_DTYPES):  # --dtype
            problems.append(f"{name}: dtype {info.dtype} in the merged folder, expected {t.dtype}")
    if out.index_metadata is not None and "total_size" in out.index_metadata:
        actual = sum(tensor_nbytes(out.info(n).dtype, out.info(n).shape) for n in present)
        if out.index_metadata["total_size"] != actual:
            problems.append(f"{INDEX_FILE}: total_size is {out.index_metadata['total_size']}, the shards hold {actual} bytes")
    problems += _config_problems(out, base, plan)
    return problems


def _config_problems(out: Checkpoint, base: Checkpoint, plan: Plan) -> list[str]:
    if base.config is None:
        return []
    path = Path(out.folder) / "config.json"
    if not path.is_file():
        return ["config.json is missing from the merged folder"]
    try:
        merged_config = read_json_file(path)
    except RsloraError as e:
        return [str(e)]
    expected = {**base.config, **plan.config_updates}
    problems = []
    for key in sorted(set(expected) | set(merged_config)):
        if key in _IGNORED_CONFIG_KEYS or key.endswith("_config"):
            continue
        if expected.get(key) != merged_config.get(key):
            problems.append(f"config.json: {key} is {merged_config.get(key)!r}, expected {expected.get(key)!r}")
    embed = next((t for t in plan.tensors if t.name.endswith("embed_tokens.weight")), None)
    vocab = merged_config.get("vocab_size")
    if embed is not None and isinstance(vocab, int) and vocab != embed.shape[0]:
        problems.append(f"config.json: vocab_size {vocab} does not match {embed.name} with {embed.shape[0]} rows")
    return problems

