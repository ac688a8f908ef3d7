"""Execute a merge plan: stream tensors from the base shards through the deltas into OUT.

The output shards are created with their headers first; then a few worker threads fill in the
tensors, each at its own offset:
- untouched tensors are copied as raw bytes, inside the kernel (copy_file_range);
- linear and embedding LoRA weights go through the C kernel (kernel.py) a block of rows at a time:
  read (pread), merge, write (pwrite), with about a megabyte per worker in memory;
- everything else (DoRA, conv, dtype changes, CUDA, ...) is computed with torch
  (delta.py), one tensor at a time; torch is imported only then.
Everything is written into a temporary folder beside OUT that is renamed at the end, so a
failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import kernel
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
from .errors import InputError, MismatchError, OutputError, UnsupportedAdapterError
from .output import atomic_folder, check_output_location, free_space, human_size
from .provenance import write_provenance
from .plan import Plan, TensorPlan, build_plan
from .safetensors_file import (
    DTYPE_BITS,
    FLOAT_DTYPES,
    SafetensorsWriter,
    read_into,
    read_tensor,
    tensor_bytes,
    tensor_nbytes,
    torch_dtype,
    write_at,
)

if TYPE_CHECKING:
    import torch


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


def resolve_device(device: str) -> str:
    """"cpu" or a CUDA device name; torch is imported only to look for CUDA."""
    if device == "cpu":
        return device
    if device != "auto" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or auto")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise InputError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    return device


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
    target = check_output_location(out, [checkpoint.folder, adapter_obj.path], overwrite)
    device = resolve_device(device)
    report = _report(checkpoint, adapter_obj, plan, out, device, dtype)
    report.dry_run = dry_run
    report.free_bytes = free_space(target)
    if dry_run:
        report.seconds = time.monotonic() - started
        return report
    check_free_space(out, report.bytes_written + _side_bytes(checkpoint), report.free_bytes)
    if not allow_nonfinite:
        check_finite(adapter_obj)

    try:
        _write_output(target, overwrite, checkpoint, adapter_obj, plan, report, device, progress,
                      max_shard_size is not None, sources or {}, verify)
    except OSError as e:  # a full disk (ENOSPC), a read error, ...: the partial output is already removed
        where = f" ({e.filename})" if e.filename else ""
        raise OutputError(f"{out}: the merge failed: {e.strerror or e}{where}; nothing was written") from e
    report.seconds = time.monotonic() - started
    return report


def _write_output(out: Path, overwrite: bool, checkpoint: Checkpoint, adapter_obj: Adapter, plan: Plan,
                  report: MergeReport, device: str, progress: bool, resharded: bool,
                  sources: dict[str, dict[str, Any]], verify: bool) -> None:
    with atomic_folder(out, overwrite) as tmp:
        _write_shards(checkpoint, adapter_obj, plan, tmp, device, progress)
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
    checkpoint: Checkpoint, adapter: Adapter, plan: Plan, out: Path, device: str, dtype: str | None
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
        device=device,
        seconds=0.0,
        config_updates=plan.config_updates,
        notes=plan.notes,
        warnings=plan.warnings,
        changes=_changes(plan, checkpoint, adapter, device),
        unmatched=plan.unmatched,
        memory_bytes=estimate_memory(plan, checkpoint, adapter, device),
    )


def _verify_summary(checked) -> str:
    first = next((c.name for c in checked.tensors if c.status == "mismatch"), None)
    parts = [f"{checked.mismatched} tensor(s) differ beyond rounding" + (f", e.g. {first}" if first else "")]
    return "; ".join(parts + checked.problems[:3])


def _changes(plan: Plan, checkpoint: Checkpoint, adapter: Adapter, device: str) -> list[dict[str, Any]]:
    """Each changed tensor: how it changes, the module and scale, and what computes it (`by`)."""
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
            "by": _computed_by(t, checkpoint, adapter, device),
        })
    return changes


def estimate_memory(plan: Plan, checkpoint: Checkpoint, adapter: Adapter, device: str = "cpu") -> int:
    """Peak memory of a merge: the runtime, the kernel workers' blocks, and the largest torch working set.

    Kernel and copy jobs hold a block of rows (plus the module's fp32 A and B) per worker. A
    torch job (one at a time on the CPU, a few on a GPU: _Staging) holds the base tensor and its
    merged value; linear and embedding deltas are added in small fp32 blocks, other kinds (DoRA,
    conv, experts, ...) also hold two whole fp32 copies.
    """
    runtime = 32 * 10**6  # Python and the CLI's modules (measured: ~31 MB for a tiny merge)
    kernel_peak = torch_peak = 0
    for t in plan.tensors:
        if t.untouched or _copied_from_adapter(adapter, t):
            continue
        if _uses_kernel(t, checkpoint, adapter, device):
            op = t.lora
            assert op is not None and op.module.a_key is not None and op.module.b_key is not None
            ab = 4 * (math.prod(adapter.shapes[op.module.a_key]) + math.prod(adapter.shapes[op.module.b_key]))
            kernel_peak = max(kernel_peak, 2 * _BLOCK_BYTES + 2 * ab)
            continue
        nbytes = tensor_nbytes(t.dtype, t.shape)
        blocked = t.lora is None or (t.lora.kind in ("linear", "embedding") and not t.lora.dora)
        torch_peak = max(torch_peak, nbytes * 3 if blocked else math.prod(t.shape) * 4 * 2 + nbytes * 3)
    if torch_peak:
        runtime += 210 * 10**6  # torch itself (measured: ~240 MB in all)
    if device != "cpu":  # on a GPU each staging set may hold a tensor on the host
        torch_peak *= _gpu_sets()
    return runtime + _workers() * kernel_peak + torch_peak


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


def _copied_from_adapter(adapter: Adapter, t: TensorPlan) -> bool:
    """A tensor the adapter replaces wholesale (modules_to_save, ...), saved in the output's dtype: copied as is."""
    return (t.replacement is not None and t.lora is None and t.bias_of is None and t.tokens is None
            and adapter.raw_available and adapter.dtypes[t.replacement] == t.dtype)


class BaseFiles:
    """Open a checkpoint's shard files (and the adapter's) on demand, read-only, one descriptor each."""

    def __init__(self, checkpoint: Checkpoint, adapter: Adapter | None = None):
        self.checkpoint = checkpoint
        self.adapter = adapter
        self.fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, shard: str) -> int:
        return self._open(shard, self.checkpoint.folder / shard)

    def adapter_fd(self) -> int:
        """The adapter's safetensors file (for tensors copied from it)."""
        assert self.adapter is not None
        return self._open("\0adapter", self.adapter.weights_path)

    def _open(self, key: str, path: Path) -> int:
        with self._lock:  # worker threads open files too
            if key not in self.fds:
                self.fds[key] = os.open(path, os.O_RDONLY)
            return self.fds[key]

    def locate(self, name: str) -> tuple[int, int]:
        """(file descriptor, absolute offset) of a tensor's bytes."""
        shard = self.checkpoint.weight_map[name]
        header = self.checkpoint.headers[shard]
        return self.fd(shard), header.data_start + header.tensors[name].begin

    def read(self, name: str) -> torch.Tensor:
        shard = self.checkpoint.weight_map[name]
        return read_tensor(self.fd(shard), self.checkpoint.headers[shard], name)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_BLOCK_BYTES = 1 << 20  # rows the kernel merges per step: in and out stay in the CPU's cache


def _workers() -> int:
    """Worker threads: one per core (copies wait on I/O, the kernel computes), 2 to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def _uses_kernel(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter, device: str) -> bool:
    if device != "cpu" or not adapter.raw_available:
        return False
    if t.replacement is not None:  # e.g. an embedding whose base layer the adapter saved (save_embedding_layers)
        if tuple(adapter.shapes[t.replacement]) != t.shape:
            return False
        start_dtype = adapter.dtypes[t.replacement]
    elif t.source is not None:
        start_dtype = checkpoint.info(t.source).dtype
    else:
        return False
    return kernel.handles(t, start_dtype, adapter.dtypes, adapter.shapes)


def _computed_by(t: TensorPlan, checkpoint: Checkpoint, adapter: Adapter, device: str) -> str:
    """"copy", "kernel" or "torch": how `_merge_one` produces a changed tensor."""
    if _copied_from_adapter(adapter, t):
        return "copy"
    return "kernel" if _uses_kernel(t, checkpoint, adapter, device) else "torch"


class _Stopped(Exception):
    """Another worker failed or the merge was interrupted: stop at the next block."""


@dataclass
class _Merge:
    """What the workers share: inputs, the progress bar, torch's staging buffers and the stop flag."""

    checkpoint: Checkpoint
    adapter: Adapter
    files: BaseFiles
    device: str
    bar: Any
    staging: _Staging
    stop: threading.Event = field(default_factory=threading.Event)
    progress_lock: threading.Lock = field(default_factory=threading.Lock)


def _write_shards(checkpoint: Checkpoint, adapter: Adapter, plan: Plan, tmp: Path, device: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(tensor_nbytes(t.dtype, t.shape) for t in plan.tensors)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Merging", file=sys.stderr,
        disable=None if progress else True, dynamic_ncols=True,
    )
    merge = _Merge(checkpoint, adapter, BaseFiles(checkpoint, adapter), device, bar, _Staging(device))
    workers = _Workers(merge.stop)
    writers: list[SafetensorsWriter] = []
    jobs: list[tuple[TensorPlan, SafetensorsWriter]] = []
    try:
        for shard_name, tensors in plan.shards:
            writer = SafetensorsWriter(tmp / shard_name, [(t.name, t.dtype, t.shape) for t in tensors], {"format": "pt"})
            writers.append(writer)
            jobs += [(t, writer) for t in tensors]
        workers.run(jobs, lambda job: _merge_one(merge, *job))
    finally:
        if workers.stopped:  # else a worker may still write: closing would free its descriptor numbers
            for writer in writers:
                writer.close()
            merge.files.close()
        bar.close()


class _Workers:
    """Runs `work(job)` for every job on worker threads, in order; re-raises the first failure.

    The main thread only waits, so Ctrl-C (KeyboardInterrupt) arrives at once; the workers then
    stop at their next block (`stop`), and are given a few seconds to do so.
    """

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.threads: list[threading.Thread] = []

    @property
    def stopped(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def run(self, jobs: list, work: Callable[[Any], None]) -> None:
        todo = iter(jobs)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def loop() -> None:
            while not self.stop.is_set():
                with lock:
                    job = next(todo, None)
                if job is None:
                    return
                try:
                    work(job)
                except _Stopped:
                    return
                except BaseException as e:  # re-raised on the main thread
                    errors.append(e)
                    self.stop.set()
                    return

        self.threads = [threading.Thread(target=loop, name=f"rslora-tools-worker-{i}", daemon=True)
                        for i in range(_workers())]
        for thread in self.threads:
            thread.start()
        try:
            for thread in self.threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:
            self.stop.set()
            deadline = time.monotonic() + 10
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        if errors:
            raise errors[0]


def _merge_one(merge: _Merge, t: TensorPlan, writer: SafetensorsWriter) -> None:
    """Produce one output tensor at its place in its shard."""
    if merge.stop.is_set():
        raise _Stopped
    checkpoint = merge.checkpoint
    if _copied_raw(checkpoint, t):
        assert t.source is not None
        writer.copy_raw(t.name, *merge.files.locate(t.source))
    elif _copied_from_adapter(merge.adapter, t):
        assert t.replacement is not None
        writer.copy_raw(t.name, merge.files.adapter_fd(), merge.adapter.raw_offset(t.replacement))
    elif not (_uses_kernel(t, checkpoint, merge.adapter, merge.device) and _merge_with_kernel(merge, t, writer)):
        _merge_with_torch(merge, t, writer)  # also when the kernel met a non-finite sum (torch's NaN encoding)
    with merge.progress_lock:
        merge.bar.update(tensor_nbytes(t.dtype, t.shape))


_thread_blocks = threading.local()


def _block_buffers(nbytes: int) -> tuple[memoryview, memoryview]:
    """The calling worker's block buffers (in, out), reused from tensor to tensor."""
    if getattr(_thread_blocks, "size", 0) < nbytes:
        _thread_blocks.size = max(nbytes, _BLOCK_BYTES)
        _thread_blocks.views = (memoryview(bytearray(_thread_blocks.size)), memoryview(bytearray(_thread_blocks.size)))
    return _thread_blocks.views


def _merge_with_kernel(merge: _Merge, t: TensorPlan, writer: SafetensorsWriter) -> bool:
    """W + s * delta through the C kernel, a block of rows at a time; False if a sum is not finite."""
    op = t.lora
    assert op is not None and op.module.a_key is not None and op.module.b_key is not None
    adapter = merge.adapter
    a = kernel.widen(adapter.raw(op.module.a_key), adapter.dtypes[op.module.a_key])  # type: ignore[arg-type]
    b = kernel.widen(adapter.raw(op.module.b_key), adapter.dtypes[op.module.b_key])  # type: ignore[arg-type]
    rows, cols = t.shape
    operands = kernel.Operands(op.kind, a, b, adapter.shapes[op.module.a_key][0], rows, cols, op.transpose)
    row_bytes = cols * DTYPE_BITS[t.dtype] // 8
    step = max(1, _BLOCK_BYTES // row_bytes)
    if t.replacement is not None:  # the delta goes onto the adapter's saved copy of the weight
        source_fd, source_offset = merge.files.adapter_fd(), adapter.raw_offset(t.replacement)
        source, source_file = t.replacement, adapter.weights_path
    else:
        assert t.source is not None
        source_fd, source_offset = merge.files.locate(t.source)
        source, source_file = t.source, merge.checkpoint.folder / merge.checkpoint.weight_map[t.source]
    target_offset = writer.offset(t.name)
    block_in, block_out = _block_buffers(step * row_bytes)
    for start in range(0, rows, step):
        if merge.stop.is_set():
            raise _Stopped
        n = min(step, rows - start)
        size = n * row_bytes
        read_into(source_fd, source_offset + start * row_bytes, block_in[:size], f"{source!r} from {source_file}")
        if not kernel.merge_rows(block_in[:size], t.dtype, operands, start, n, op.scale.scale, block_out[:size]):
            return False
        write_at(writer.fd, target_offset + start * row_bytes, block_out[:size])
    return True


class _Staging:
    """Host buffers (page-locked on a GPU) and a CUDA stream per set, for tensors computed with torch.

    A worker takes a set for one tensor, so the number of sets bounds the memory: one on the CPU
    (torch uses every core for one tensor anyway), a few on a GPU, where reads, transfers and
    writes of different tensors then overlap. Reused buffers cost no page faults, and pinned
    ones let the copies to and from the GPU run asynchronously on the set's stream.
    """

    def __init__(self, device: str):
        self.cuda = device != "cpu"
        self._sets: queue.Queue = queue.Queue()
        for _ in range(_gpu_sets() if self.cuda else 1):
            self._sets.put({})

    @contextlib.contextmanager
    def take(self):
        buffers = self._sets.get()
        try:
            yield buffers
        finally:
            self._sets.put(buffers)

    def buffer(self, buffers: dict, key: str, nbytes: int) -> torch.Tensor:
        import torch

        if key not in buffers or buffers[key].numel() < nbytes:
            buffers.pop(key, None)  # free the smaller one first
            buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.cuda)
        return buffers[key][:nbytes]


def _gpu_sets() -> int:
    return min(4, _workers())


def _merge_with_torch(merge: _Merge, t: TensorPlan, writer: SafetensorsWriter) -> None:
    """Compute one tensor with torch (delta.py) on merge.device, staged through reused host buffers."""
    import torch

    staging = merge.staging
    with staging.take() as buffers:
        if staging.cuda and "stream" not in buffers:
            buffers["stream"] = torch.cuda.Stream(device=merge.device)
        with torch.cuda.stream(buffers["stream"]) if staging.cuda else contextlib.nullcontext():
            base = None
            if t.source is not None:
                shard = merge.checkpoint.weight_map[t.source]
                header = merge.checkpoint.headers[shard]
                info = header.tensors[t.source]
                host = staging.buffer(buffers, "in", info.nbytes).view(torch_dtype(header, t.source)).view(info.shape)
                read_into(merge.files.fd(shard), header.data_start + info.begin, tensor_bytes(host),
                          f"{header.path}: tensor {t.source!r}")
                base = host.to(merge.device, non_blocking=True)
            value = merged_tensor(t, merge.files, merge.adapter, merge.device, base=base)
            if value.device.type != "cpu":
                out = staging.buffer(buffers, "out", tensor_nbytes(t.dtype, t.shape)).view(value.dtype).view(value.shape)
                out.copy_(value, non_blocking=True)
                buffers["stream"].synchronize()
                value = out
            writer.write_tensor(t.name, value)


def merged_tensor(t: TensorPlan, files: BaseFiles, adapter: Adapter, device: str,
                  out_dtype: torch.dtype | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """The merged value of one planned tensor, computed with torch on `device` (in the plan's dtype, or `out_dtype`).

    `base`: the base value (on `device`, writable) when the caller has read it already.
    """
    from . import safetensors_file
    from .delta import compute

    if base is None and t.source is not None:
        base = files.read(t.source).to(device)
    return compute(t, base, adapter.tensor, out_dtype or safetensors_file.ST_TO_TORCH[t.dtype])


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
