"""The three threads of a streamed merge, a bounded pipeline over one schedule (plan/stream.py decides the order
and the disk bound).

- download: fetches the base shards the output shard being written and the next one read
  (hub.transfer.ShardFetcher; a local base needs none);
- merge (the calling thread): writes one output shard at a time with the executor into the
  scratch folder, then releases the base shards no later output shard reads;
- upload: pre-uploads each finished output shard as an LFS object, records it in the journal and
  deletes it; at most two output shards are on disk.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StreamInterrupted
from ..hub.transfer import Publisher, ShardFetcher
from ..plan.stream import FETCH_AHEAD, OUTPUTS_ON_DISK, StreamSchedule
from ..reporting import PhaseProgress
from .executor import execute
from .lowering import Lowered
from .merge_job import PreparedMerge, record_measures
from .options import MergeOptions
from .stream_journal import Journal

PHASES = ("download", "merge", "upload")
STOP_WAIT_SECONDS = 30.0  # after a failure, how long a download or upload in flight gets to finish


@dataclass
class Phase:
    bytes: int = 0
    seconds: float = 0.0  # time this phase's thread was busy


class Pipeline:
    """Download, merge and upload threads over one schedule; the calling thread merges."""

    def __init__(
        self,
        prepared: PreparedMerge,
        order: StreamSchedule,
        fetcher: ShardFetcher | None,
        publisher: Publisher,
        journal: Journal,
        out: Path,
        progress: PhaseProgress | None,
        options: MergeOptions,
    ):
        self.prepared, self.order, self.fetcher, self.publisher = prepared, order, fetcher, publisher
        self.journal, self.out, self.progress, self.options = journal, out, progress, options
        self.todo = order.todo
        self.position = -1  # the output shard being written
        self.changed = threading.Condition()
        self.ready = {shard: threading.Event() for _, shard in order.fetch_order()}
        self.slots = threading.Semaphore(OUTPUTS_ON_DISK)
        self.uploads: queue.Queue[str | None] = queue.Queue()
        self.operations: dict[str, Any] = {}
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.phases = {p: Phase() for p in PHASES}
        self.measures: dict[str, tuple[float, float, float]] = {}
        self.hub_had: list[str] = []  # shards whose blob the Hub already stored (nothing sent)
        self.download_total = sum(
            order.base_bytes[s] for s in self.ready if fetcher is not None and fetcher.cached(s) is None
        )
        if fetcher is not None and progress is not None:
            fetcher.progress = lambda n: progress("download", n, self.download_total)

    def run(self) -> dict[str, Any]:
        """Every todo shard merged and pre-uploaded; their commit operations by name (`phases` and `hub_had` say
        what each thread did, also after a failure)."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        threads = [
            threading.Thread(target=self._guarded, args=(loop,), daemon=True, name=f"rslora-tools-{name}")
            for name, loop in (("download", self._download_all), ("upload", self._upload_all))
        ]
        for thread in threads:
            thread.start()
        try:
            self._merge_all()
            self.uploads.put(None)
            while threads[1].is_alive():
                threads[1].join(0.1)
                self._raise_failure()
            self._raise_failure()
        except KeyboardInterrupt as e:
            raise StreamInterrupted(self._interrupted()) from e
        finally:
            self.stop.set()
            with self.changed:
                self.changed.notify_all()
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            shutil.rmtree(self.out, ignore_errors=True)
        record_measures(self.prepared, self.measures, sample=False)  # the base shards are gone by now
        return self.operations

    def _interrupted(self) -> str:
        done = len(self.journal.entries)
        return (
            f"interrupted; {done} of {len(self.order.outputs)} output shards are uploaded to {self.publisher.repo_id} "
            "but not committed (the repo is unchanged); run the same command again to resume"
        )

    def _guarded(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # re-raised on the merging thread
            self.failures.append(e)
            self.stop.set()

    def _raise_failure(self) -> None:
        if self.failures:
            raise self.failures[0]

    def _wait(self, event: threading.Event) -> None:
        while not event.wait(0.1):
            self._raise_failure()

    def _merge_all(self) -> None:
        last = self.order.last_use()
        lowered = dict(self.prepared.lowered.shards)
        for i, name in enumerate(self.todo):
            while not self.slots.acquire(timeout=0.1):  # shard i - 2 is uploaded and deleted
                self._raise_failure()
            with self.changed:  # only now may base shards for i + 1 come (the disk bound's step i)
                self.position = i
                self.changed.notify_all()
            for shard in self.order.needs[name]:
                self._wait(self.ready[shard])
            started = time.monotonic()
            try:
                execute(
                    Lowered([(name, lowered[name])], self.prepared.lowered.device),
                    self.prepared.checkpoint,
                    self.prepared.adapter,
                    self.out,
                    self._counter("merge"),
                    allow_nonfinite=self.options.allow_nonfinite,
                    measures=self.measures,
                )
            except BaseException:
                (self.out / name).unlink(missing_ok=True)
                raise
            self._done("merge", self.order.out_bytes[name], started)
            self.uploads.put(name)
            for shard in [s for s in self.order.needs[name] if last[s] == i]:
                if self.fetcher is not None:
                    self.fetcher.release(shard)

    def _counter(self, phase: str) -> Callable[[int, int], None] | None:
        progress = self.progress
        if progress is None:
            return None
        total = self._total(phase)
        return lambda n, _total: progress(phase, n, total)

    def _total(self, phase: str) -> int:
        if phase == "download":
            return self.download_total
        return sum(self.order.out_bytes[name] for name in self.todo)

    def _done(self, phase: str, nbytes: int, started: float) -> None:
        self.phases[phase].bytes += nbytes
        self.phases[phase].seconds += time.monotonic() - started

    def _download_all(self) -> None:
        for first, shard in self.order.fetch_order():
            with self.changed:
                self.changed.wait_for(lambda: self.stop.is_set() or self.position + FETCH_AHEAD >= first)
            if self.stop.is_set():
                return
            if self.fetcher is not None:
                started = time.monotonic()
                fetched = self.fetcher.fetch(shard)
                if fetched.downloaded:
                    self._done("download", fetched.downloaded, started)
            self.ready[shard].set()

    def _upload_all(self) -> None:
        while not self.stop.is_set():
            try:
                name = self.uploads.get(timeout=0.1)
            except queue.Empty:
                continue
            if name is None:
                return
            started = time.monotonic()
            path = self.out / name
            operation, blob, had = self.publisher.upload(path, name)
            self.journal.add(blob)
            self.operations[name] = operation
            path.unlink()
            self.slots.release()
            if had:
                self.hub_had.append(name)
            else:
                self._done("upload", blob.size, started)
            if self.progress is not None:
                self.progress("upload", blob.size, self._total("upload"))
