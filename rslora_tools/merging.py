"""Execute a merge plan: stream tensors from the base shards through the deltas into OUT.

One tensor at a time: read it (pread, no mmap), apply its delta, write it, drop it. Untouched
tensors are copied as raw bytes. Everything is written into a temporary folder beside OUT
that is renamed at the end, so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, check_finite, load_adapter
from .checkpoint import (
    INDEX_FILE,
    Checkpoint,
    is_tokenizer_file,
    open_checkpoint,
    parse_size,
    read_json_file,
    side_files,
    write_json_file,
)
from .delta import compute
from .errors import InputError, MismatchError, OutputError, UnsupportedAdapterError
from .output import atomic_folder, check_output_location, human_size
from .provenance import write_provenance
from .plan import Plan, TensorPlan, build_plan
from .safetensors_file import DIRECT_BUFFER_BYTES, FLOAT_DTYPES, ST_TO_TORCH, StreamingWriter, read_tensor, tensor_nbytes


@dataclass
class MergeReport:
    """What a merge did; `to_dict()` is what `--json` prints."""

    base: str
    adapter: str
    out: str
    convention: str
    modules: int
    tensors_merged: int
    tensors_copied: int
    tensors_total: int
    scale_min: float | None
    scale_max: float | None
    shards: list[str]
    bytes_written: int
    dtype: str
    device: str
    seconds: float
    config_updates: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    changes: list[dict[str, Any]] = field(default_factory=list)  # what happens to each changed tensor
    unmatched: list[str] = field(default_factory=list)  # adapter tensors that match nothing (dry run)
    memory_bytes: int = 0  # estimated peak memory of the merge
    free_bytes: int | None = None  # free disk space where OUT goes
    verify: dict[str, Any] | None = None  # the verification of the fresh output (--verify)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or auto")
    return torch.device(device)


def prepare(
    base: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    *,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    allow_pickle: bool = False,
    collect_unmatched: bool = False,
) -> tuple[Checkpoint, Adapter, Plan]:
    """Open both inputs and plan the merge (headers and config only)."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter, allow_pickle=allow_pickle)
    checkpoint = open_checkpoint(base)
    quant = (checkpoint.config or {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise UnsupportedAdapterError(
            f"{checkpoint.folder}: the base is a {method} checkpoint; merge into the unquantized base model "
            "(merging into quantized weights loses the adapter to rounding)"
        )
    size = parse_size(max_shard_size) if max_shard_size is not None else None
    plan = build_plan(checkpoint, adapter, dtype=dtype, max_shard_size=size, collect_unmatched=collect_unmatched)
    return checkpoint, adapter, plan


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike | Adapter,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    allow_pickle: bool = False,
    dry_run: bool = False,
    sources: dict[str, dict[str, Any]] | None = None,
    verify: bool = False,
    allow_nonfinite: bool = False,
) -> MergeReport:
    """Merge a PEFT LoRA adapter into a base checkpoint, streaming, exactly as PEFT's merge_and_unload.

    Args:
        base: base model folder (safetensors, single file or sharded).
        adapter: adapter folder (adapter_config.json + adapter_model.safetensors) or a loaded `Adapter`.
        out: output folder; written atomically (a temporary folder beside it is renamed at the end).
        dtype: output dtype for floating tensors ("bf16", "fp16", "fp32"); default: the base's.
        device: "cpu", "cuda" or "auto" (cuda when available).
        max_shard_size: re-shard the output ("5GB" = 5e9 bytes); default: keep the base's shards.
        overwrite: replace an existing non-empty OUT.
        progress: show a progress bar on stderr (only when it is a terminal).
        dry_run: plan only (headers and config); write nothing. The report lists every change,
            adapter tensors that match nothing, the memory needed and the free disk space.
        verify: recompute and compare every tensor of the fresh output before it replaces OUT;
            a mismatch beyond rounding fails the merge and nothing is written.
        allow_nonfinite: merge an adapter whose weights hold NaN or Inf (refused by default).
        sources: where BASE and ADAPTER came from ({"base": ..., "adapter": ...}, hub.Source dicts), for the
            provenance file OUT gets (a later `push` writes the model card from it).

    Returns:
        A `MergeReport` with what was merged.
    """
    started = time.monotonic()
    out = Path(out)
    checkpoint, adapter_obj, plan = prepare(
        base, adapter, dtype=dtype, max_shard_size=max_shard_size, allow_pickle=allow_pickle,
        collect_unmatched=dry_run,
    )
    check_output_location(out, [checkpoint.folder, adapter_obj.path], overwrite)
    torch_device = resolve_device(device)
    report = _report(checkpoint, adapter_obj, plan, out, torch_device, dtype)
    report.dry_run = dry_run
    report.free_bytes = free_space(out)
    if dry_run:
        report.seconds = time.monotonic() - started
        return report
    check_free_space(out, report.bytes_written + _side_bytes(checkpoint), report.free_bytes)
    if not allow_nonfinite:
        check_finite(adapter_obj)

    try:
        _write_output(out, overwrite, checkpoint, adapter_obj, plan, report, torch_device, progress,
                      max_shard_size is not None, sources or {}, verify)
    except OSError as e:  # a full disk (ENOSPC), a read error, ...: the partial output is already removed
        where = f" ({e.filename})" if e.filename else ""
        raise OutputError(f"{out}: the merge failed: {e.strerror or e}{where}; nothing was written") from e
    report.seconds = time.monotonic() - started
    return report


def _write_output(out: Path, overwrite: bool, checkpoint: Checkpoint, adapter_obj: Adapter, plan: Plan,
                  report: MergeReport, torch_device: torch.device, progress: bool, resharded: bool,
                  sources: dict[str, dict[str, Any]], verify: bool) -> None:
    with atomic_folder(out, overwrite) as tmp:
        _write_shards(checkpoint, adapter_obj, plan, tmp, torch_device, progress)
        _write_index(checkpoint, plan, tmp, resharded)
        _copy_side_files(checkpoint, adapter_obj, plan, tmp)
        write_provenance(tmp, {
            "operation": "merge",
            "base": sources.get("base") or {"spec": str(checkpoint.folder)},
            "adapter": sources.get("adapter") or {"spec": str(adapter_obj.path)},
            "convention": report.convention, "modules": report.modules,
            "scale_min": report.scale_min, "scale_max": report.scale_max, "dtype": report.dtype,
        })
        if verify:
            from .verification import verify as run_verify

            checked = run_verify(tmp, checkpoint.folder, adapter_obj)
            report.verify = checked.to_dict()
            if not checked.ok:
                raise MismatchError(
                    f"verification of the merged output failed ({_verify_summary(checked)}); nothing was written"
                )


def _report(
    checkpoint: Checkpoint, adapter: Adapter, plan: Plan, out: Path, device: torch.device, dtype: str | None
) -> MergeReport:
    tensors = plan.tensors
    scales = [op.scale.scale for op in plan.lora_ops]
    dtypes = sorted({t.dtype for t in tensors if t.dtype in FLOAT_DTYPES})
    return MergeReport(
        base=str(checkpoint.folder),
        adapter=str(adapter.path),
        out=str(out),
        convention=adapter.config.convention,
        modules=len(plan.lora_ops),
        tensors_merged=sum(not t.untouched for t in tensors),
        tensors_copied=sum(_copied_raw(checkpoint, t) for t in tensors),
        tensors_total=len(tensors),
        scale_min=min(scales) if scales else None,
        scale_max=max(scales) if scales else None,
        shards=[name for name, _ in plan.shards],
        bytes_written=sum(tensor_nbytes(t.dtype, t.shape) for t in tensors),
        dtype=",".join(dtypes),
        device=str(device),
        seconds=0.0,
        config_updates=plan.config_updates,
        notes=plan.notes,
        warnings=plan.warnings,
        changes=_changes(plan),
        unmatched=plan.unmatched,
        memory_bytes=estimate_memory(plan),
    )


def _verify_summary(checked) -> str:
    first = next((c.name for c in checked.tensors if c.status == "mismatch"), None)
    parts = [f"{checked.mismatched} tensor(s) differ beyond rounding" + (f", e.g. {first}" if first else "")]
    return "; ".join(parts + checked.problems[:3])


def _changes(plan: Plan) -> list[dict[str, Any]]:
    changes = []
    for t in plan.tensors:
        if t.untouched:
            continue
        how = []
        if t.replacement is not None:
            how.append(f"replaced by adapter tensor {t.replacement}")
        if t.lora is not None:
            how.append(("DoRA" if t.lora.dora else "LoRA") + f" ({t.lora.kind})")
        if t.bias_of is not None:
            how.append("lora_bias")
        if t.tokens is not None:
            how.append(f"{len(t.tokens[1])} trainable token rows")
        op = t.lora or t.bias_of
        changes.append({
            "tensor": t.name, "how": ", ".join(how), "module": op.module.name if op is not None else None,
            "scale": op.scale.scale if op is not None else None, "rank": op.scale.r if op is not None else None,
            "alpha": op.scale.alpha if op is not None else None,
        })
    return changes


def estimate_memory(plan: Plan) -> int:
    """Peak memory of a merge: the runtime and output buffer, plus the largest changed tensor's working set.

    Up to five copies of a changed tensor are alive: read ahead, being merged, two queued for
    the writer, one being written. Linear and embedding deltas are added in small fp32 blocks;
    other kinds (DoRA, conv, experts, ...) also hold two whole fp32 copies while merging.
    """
    runtime = 250 * 10**6  # Python, torch and the libraries (measured: ~240 MB for a tiny merge)
    peak = 0
    for t in plan.tensors:
        if t.untouched:
            continue
        nbytes = tensor_nbytes(t.dtype, t.shape)
        blocked = t.lora is None or (t.lora.kind in ("linear", "embedding") and not t.lora.dora)
        peak = max(peak, nbytes * 5 if blocked else math.prod(t.shape) * 4 * 2 + nbytes * 5)
    return runtime + DIRECT_BUFFER_BYTES + peak


def free_space(out: Path) -> int | None:
    """Free bytes on the file system OUT will be written to (its nearest existing ancestor)."""
    folder = out.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_free_space(out: Path, needed: int, free: int | None) -> None:
    if free is not None and needed > free:
        raise OutputError(
            f"{out}: the merge writes {human_size(needed)} but only {human_size(free)} is free there; free some space or "
            "choose another output folder (nothing was written)"
        )


def _side_bytes(checkpoint: Checkpoint) -> int:
    return sum(p.stat().st_size for p in side_files(checkpoint.folder))


def _copied_raw(checkpoint: Checkpoint, t: TensorPlan) -> bool:
    """An untouched tensor that keeps its dtype: its bytes are copied without decoding."""
    return t.untouched and t.source is not None and checkpoint.info(t.source).dtype == t.dtype


class BaseFiles:
    """Open a checkpoint's shard files on demand (read-only), one descriptor per shard."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, shard: str) -> int:
        with self._lock:  # the read-ahead thread opens shards too
            if shard not in self.fds:
                self.fds[shard] = os.open(self.checkpoint.folder / shard, os.O_RDONLY)
            return self.fds[shard]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        shard = self.checkpoint.weight_map[name]
        return read_tensor(self.fd(shard), self.checkpoint.headers[shard], name, out)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _BufferPool:
    """Byte buffers reused across tensors of the same size (a model repeats a few shapes).

    Fresh large allocations cost page faults and fragment the heap, which made peak memory
    drift upwards over a long merge; reusing buffers keeps both flat. Thread-safe: buffers are
    taken by the read-ahead thread and given back by the writer thread.
    """

    def __init__(self, keep_per_size: int = 3):
        self._free: dict[int, list[torch.Tensor]] = {}
        self._keep = keep_per_size
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            free = self._free.setdefault(buffer.numel(), [])
            if len(free) < self._keep:
                free.append(buffer)


class _ReadAhead:
    """Reads the base value of the next tensor to merge on a thread while the current one is computed.

    pread releases the GIL, so reading overlaps computing. One tensor is read ahead at most, on
    a daemon thread, so that an interrupted merge never waits for it.
    """

    def __init__(self, files: BaseFiles, tensors: list[TensorPlan], pool: _BufferPool):
        self._files = files
        self._pool = pool
        self._todo = [t for t in tensors if t.source is not None]
        self._next = 0
        self._pending: tuple[str, dict[str, Any], threading.Event] | None = None
        self._start()

    def _start(self) -> None:
        self._pending = None
        if self._next >= len(self._todo):
            return
        t = self._todo[self._next]
        self._next += 1
        box: dict[str, Any] = {}
        done = threading.Event()

        def read() -> None:
            try:
                buffer = self._pool.take(self._files.checkpoint.info(t.source).nbytes)  # type: ignore[arg-type]
                box["buffer"] = buffer
                box["value"] = self._files.read(t.source, buffer)  # type: ignore[arg-type]
            except BaseException as e:  # re-raised by take()
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=read, name="rslora-tools-reader", daemon=True).start()
        self._pending = (t.name, box, done)

    def take(self, t: TensorPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(base value, its pool buffer) of `t` if it was read ahead (and start reading the next one)."""
        if self._pending is None or self._pending[0] != t.name:
            return None, None
        _, box, done = self._pending
        done.wait()
        self._start()
        if "error" in box:
            raise box["error"]
        return box["value"], box["buffer"]


class _WriteBehind:
    """Runs write jobs in order on one background thread, so that writing overlaps reading and computing.

    torch and file writes release the GIL; the queue depth bounds the tensors held in memory.
    """

    def __init__(self, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rslora-tools-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # re-raised on the main thread
                    self._error = e

    def submit(self, job) -> None:
        self.raise_error()
        self._queue.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()


def _write_shards(
    checkpoint: Checkpoint, adapter: Adapter, plan: Plan, tmp: Path, device: torch.device, progress: bool
) -> None:
    from tqdm.auto import tqdm

    total = sum(tensor_nbytes(t.dtype, t.shape) for t in plan.tensors)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Merging", file=sys.stderr,
        disable=None if progress else True, dynamic_ncols=True,
    )
    files = BaseFiles(checkpoint)
    pool = _BufferPool()
    ahead = _ReadAhead(files, [t for t in plan.tensors if not _copied_raw(checkpoint, t)], pool)
    metadata = {"format": "pt"}
    writers: list[StreamingWriter] = []
    background = _WriteBehind()
    finished = False
    try:
        for shard_name, tensors in plan.shards:
            entries = [(t.name, t.dtype, t.shape) for t in tensors]
            writer = StreamingWriter(tmp / shard_name, entries, metadata, direct=True)
            writers.append(writer)
            for t in tensors:
                n = tensor_nbytes(t.dtype, t.shape)
                if _copied_raw(checkpoint, t):
                    source = t.source
                    assert source is not None
                    shard = checkpoint.weight_map[source]
                    offset = checkpoint.headers[shard].data_start + checkpoint.info(source).begin
                    fd = files.fd(shard)
                    background.submit(lambda w=writer, t=t, fd=fd, offset=offset: w.copy_raw(t.name, fd, offset))
                else:
                    base, buffer = ahead.take(t)
                    value = merged_tensor(t, files, adapter, device, base=base)
                    del base
                    background.submit(lambda w=writer, t=t, value=value, buffer=buffer: _write_and_recycle(
                        w, t.name, value, pool, buffer))
                bar.update(n)
            background.submit(writer.close)
        background.finish()
        finished = True
    finally:
        if not finished:
            try:
                background.finish()
            except BaseException:
                pass
            for writer in writers:
                writer.abort()
        files.close()
        bar.close()


def _write_and_recycle(writer: StreamingWriter, name: str, value: torch.Tensor, pool: _BufferPool,
                       buffer: torch.Tensor | None) -> None:
    """Write a merged tensor, then hand the base buffer it was computed from (often its own memory) back."""
    writer.write_tensor(name, value)
    if buffer is not None:
        pool.give(buffer)


def merged_tensor(t: TensorPlan, files: BaseFiles, adapter: Adapter, device: torch.device,
                  out_dtype: torch.dtype | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """The merged value of one planned tensor (in the plan's dtype, or `out_dtype`).

    `base` is the base tensor when the caller has already read it (read-ahead).
    """
    if base is None and t.source is not None:
        base = files.read(t.source)
    base = base.to(device) if base is not None else None
    out_dtype = out_dtype or ST_TO_TORCH[t.dtype]
    value = compute(t, base, adapter.tensor, out_dtype)
    return value.cpu() if value.device.type != "cpu" else value


def _write_index(checkpoint: Checkpoint, plan: Plan, tmp: Path, resharded: bool) -> None:
    """Write model.safetensors.index.json when there are several shards (or the base had an index)."""
    if len(plan.shards) == 1 and (resharded or not checkpoint.sharded):
        return
    weight_map = {t.name: shard for shard, tensors in plan.shards for t in tensors}
    metadata = dict(checkpoint.index_metadata or {})
    metadata["total_size"] = sum(tensor_nbytes(t.dtype, t.shape) for t in plan.tensors)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(t.shape) for t in plan.tensors)
    write_json_file(tmp / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map}, sort_keys=True)


def _copy_side_files(checkpoint: Checkpoint, adapter: Adapter, plan: Plan, tmp: Path) -> None:
    """config.json (updated only where the merge changes it), generation config, tokenizer, templates.

    The tokenizer comes from the adapter folder when it has one (the tokenizer it was trained with).
    """
    adapter_files = [p for p in side_files(adapter.path) if is_tokenizer_file(p.name)]
    take_tokenizer_from_adapter = bool(adapter_files)
    for path in side_files(checkpoint.folder):
        if take_tokenizer_from_adapter and is_tokenizer_file(path.name):
            continue
        if path.name == "config.json" and plan.config_updates:
            config = read_json_file(path)
            config.update(plan.config_updates)
            if "text_config" in config and isinstance(config["text_config"], dict) and "vocab_size" in plan.config_updates:
                config["text_config"]["vocab_size"] = plan.config_updates["vocab_size"]
            write_json_file(tmp / path.name, config)
            continue
        shutil.copyfile(path, tmp / path.name)
    for path in adapter_files:
        shutil.copyfile(path, tmp / path.name)
