"""What a merge run's worker threads share: the run's inputs and state, each output tensor's slot, torch's
staging buffers, the block buffers, and the workers themselves (execute/executor.py starts them)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..adapter.adapter import Adapter
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.safetensors_file import (
    SafetensorsWriter,
    read_into,
)
from .lowering import BLOCK_BYTES, Device, staging_sets, worker_count

if TYPE_CHECKING:
    import torch


ProgressCallback = Callable[[int, int], None]  # (bytes just finished, total bytes)


class Stopped(Exception):
    """Another worker failed or the merge was interrupted: stop at the next block."""


class NonFinite(Exception):
    """A value or a sum the kernel computed is not finite: compute the tensor with torch (its NaN encodings)."""


@dataclass
class Run:
    """What the workers share: inputs, open files, torch's staging buffers, the stop flag and progress."""

    checkpoint: Checkpoint
    adapter: Adapter
    base: CheckpointFiles
    device: Device
    staging: Staging
    total: int
    progress: ProgressCallback | None
    allow_nonfinite: bool = False
    measures: dict[str, tuple[float, float, float]] | None = None  # --trained-on: quantization_norms per weight
    adapter_fd: int = -1
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    global_scales: dict[int, torch.Tensor] = field(default_factory=dict)  # NVFP4 fused groups' (compute/requantize)
    group_lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, nbytes: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(nbytes, self.total)


STOP_WAIT_SECONDS = 10.0  # after a failure or Ctrl-C, how long the workers get to reach their next block


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one output tensor goes: its shard's writer and its row there (the writer keeps no index by name)."""

    writer: SafetensorsWriter
    row: int

    @property
    def fd(self) -> int:
        return self.writer.fd

    @property
    def offset(self) -> int:
        return self.writer.offset_at(self.row)

    def write(self, tensor: torch.Tensor) -> None:
        self.writer.write_row(self.row, tensor)

    def copy_raw(self, source_fd: int, source_offset: int) -> None:
        self.writer.copy_row(self.row, source_fd, source_offset)


class Staging:
    """Host buffers (page-locked on a GPU) and a CUDA stream per set, for tensors computed with torch.

    A worker takes a set for one tensor, so the number of sets bounds the memory: one on the CPU
    (torch uses every core for one tensor anyway), a few on a GPU, where reads, transfers and
    writes of different tensors then overlap. Reused buffers cost no page faults, and pinned
    ones let the copies to and from the GPU run asynchronously on the set's stream.
    """

    def __init__(self, device: Device):
        self.device = device
        self._lock = threading.Lock()
        self._sets: queue.Queue[dict[str, Any]] | None = None  # made on first use: only torch steps need the device

    @contextlib.contextmanager
    def take(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            if self._sets is None:
                self._sets = queue.Queue()
                for _ in range(staging_sets(self.device)):
                    self._sets.put({})
            sets = self._sets
        buffers = sets.get()
        try:
            yield buffers
        finally:
            sets.put(buffers)

    def buffer(self, buffers: dict[str, Any], key: str, nbytes: int) -> torch.Tensor:
        import torch

        if key not in buffers or buffers[key].numel() < nbytes:
            buffers.pop(key, None)  # free the smaller one first
            buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.device.is_cuda)
        tensor: torch.Tensor = buffers[key][:nbytes]
        return tensor


def record(run: Run, name: str, norms: tuple[float, float, float]) -> None:
    if run.measures is not None:
        with run.lock:
            run.measures[name] = norms


def read_block(run: Run, fd: int, offset: int, view: memoryview, what: str) -> None:
    if run.stop.is_set():
        raise Stopped
    read_into(fd, offset, view, what)


_thread_blocks = threading.local()


def block_buffers(nbytes: int) -> tuple[memoryview, memoryview, memoryview]:
    """The calling worker's block buffers (in, out, one more for the 4-bit path), reused from tensor to tensor."""
    if getattr(_thread_blocks, "size", 0) < nbytes:
        _thread_blocks.size = max(nbytes, BLOCK_BYTES)
        _thread_blocks.views = tuple(memoryview(bytearray(_thread_blocks.size)) for _ in range(3))
    views: tuple[memoryview, memoryview, memoryview] = _thread_blocks.views
    return views


class Workers:
    """Runs `work(job)` for every job on worker threads, in order; re-raises the failure of the earliest job.

    After a failure no later job starts, and the jobs already running finish, so the error raised is
    the same whatever the threads' timing (the first failing tensor in plan order). The main thread
    only waits, so Ctrl-C (KeyboardInterrupt) arrives at once; the workers then stop at their next
    block (`stop`), and are given a few seconds to do so.
    """

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.threads: list[threading.Thread] = []

    @property
    def stopped(self) -> bool:
        return not any(thread.is_alive() for thread in self.threads)

    def run(self, jobs: list[Any], work: Callable[[Any], None]) -> None:
        todo = iter(enumerate(jobs))
        lock = threading.Lock()
        errors: list[tuple[int, BaseException]] = []

        def loop() -> None:
            while not self.stop.is_set():
                with lock:
                    item = next(todo, None)
                    if item is None or errors:
                        return
                index, job = item
                try:
                    work(job)
                except Stopped:
                    return
                except BaseException as e:  # re-raised on the main thread
                    with lock:
                        errors.append((index, e))
                    return

        self.threads = [
            threading.Thread(target=loop, name=f"rslora-tools-worker-{i}", daemon=True) for i in range(worker_count())
        ]
        for thread in self.threads:
            thread.start()
        try:
            for thread in self.threads:
                while thread.is_alive():
                    thread.join(0.2)
        finally:
            self.stop.set()
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            for thread in self.threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        if errors:
            raise min(errors, key=lambda error: error[0])[1]
