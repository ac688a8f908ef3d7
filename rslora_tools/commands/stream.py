"""`merge --stream --push-to-hub`: Hub (or local) base to Hub, a few shards on disk at a time.

Three threads form a bounded pipeline (plan/stream.py decides the order and the disk bound):
- download: fetches the base shards the output shard being written and the next one read
  (hub.transfer.ShardFetcher; a local base needs none);
- merge (the calling thread): writes one output shard at a time with the executor into the
  scratch folder, then releases the base shards no later output shard reads;
- upload: pre-uploads each finished output shard as an LFS object and deletes it; at most
  two output shards are on disk.
At the end one commit adds every shard, the index, configs, side files, provenance and the card.

Resuming: every uploaded shard is recorded in a journal in the scratch folder, keyed by the
inputs and options; a re-run of the same command checks that the Hub still stores those blobs
and skips their shards entirely (no download, no merge, no upload). A shard the journal does not
know is merged again, and the Hub's pre-upload step skips its blob if it has it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._version import __version__
from ..adapter.adapter import Adapter
from ..errors import InputError, OutputError, StreamInterrupted
from ..execute.executor import execute
from ..execute.lowering import Lowered
from ..formats.checkpoint import Checkpoint, open_checkpoint, side_files
from ..formats.output import free_space, work_folder
from ..formats.quant import checkpoint_scheme
from ..formats.safetensors_file import SafetensorsHeader, read_header
from ..formats.sizes import human_size
from ..hub.card import model_card
from ..hub.resolve import Source
from ..hub.transfer import (
    Publisher,
    ShardFetcher,
    Uploaded,
    cached_shard,
    hub_bars_hidden,
    listed_sha256,
    remote_header,
)
from ..plan.stream import FETCH_AHEAD, OUTPUTS_ON_DISK, StreamSchedule, schedule
from ..reporting import PhaseProgress
from .common import AdapterSpec
from .merged_model import (
    MergeInputs,
    MergeOptions,
    MergeReport,
    PreparedMerge,
    StreamOptions,
    check_inputs_finite,
    measure_sample,
    merge_inputs,
    prepare_merge,
    record_measures,
    write_extras,
)

JOURNAL_NAME = "rslora-tools-stream.json"
PHASES = ("download", "merge", "upload")
STOP_WAIT_SECONDS = 30.0  # after a failure, how long a download or upload in flight gets to finish


@dataclass
class Phase:
    bytes: int = 0
    seconds: float = 0.0  # time this phase's thread was busy


@dataclass
class StreamReport(MergeReport):
    """What a streamed merge did: the merge report's fields, and the stream's; `to_dict()` is what `--json` prints."""

    repo_id: str = ""
    scratch: str = ""
    disk_bound: int = 0  # peak bytes the run stores in the scratch folder (and the cache, with --keep-cache)
    model_bytes: int = 0  # the merged model's size, for comparison
    phases: dict[str, Phase] = field(default_factory=lambda: {p: Phase() for p in PHASES})
    skipped: dict[str, list[str]] = field(default_factory=dict)  # what a re-run did not do again, and why

    @classmethod
    def of(cls, merge: MergeReport, **stream: Any) -> StreamReport:
        return cls(**{f.name: getattr(merge, f.name) for f in fields(MergeReport)}, **stream)


def work_folder_path(repo_id: str, scratch: Path | None = None) -> Path:
    """The working folder of a push to `repo_id`: a folder of its own inside --scratch DIR (default
    ~/.cache/rslora-tools/stream), where a re-run finds its journal; never DIR itself (a user's folder)."""
    root = scratch if scratch is not None else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "rslora-tools" / "stream"
    return root.expanduser().resolve() / f"rslora-tools-stream-{repo_id.replace('/', '--')}"


def stream_merge(base: str | os.PathLike[str], adapters: list[AdapterSpec], options: MergeOptions) -> StreamReport:
    """Merge BASE (a Hub repo or a local folder) and ADAPTER... into the Hub repo `options.push`, shard by shard.

    The repo gets one commit with the whole model (with `create_pr`, a pull request) and a card;
    the disk holds at most the report's `disk_bound` beyond the adapter. A failure or Ctrl-C
    leaves the repo unchanged and the journal for a re-run. `options.dry_run`: plan, report the
    bound and the free space, transfer nothing.
    """
    target, stream = options.push_target, options.stream
    assert target is not None and stream is not None  # MergeOptions checks it
    try:
        inputs = merge_inputs(base, adapters, options, base_shards=False)
    except InputError as e:
        last = adapters[-1]
        if isinstance(last, Adapter) or not e.cli_message.startswith(os.fspath(last)):
            raise
        raise InputError(f"{e.cli_message} (with --stream there is no OUT: every argument after BASE is an adapter; --scratch DIR "
                         "names the scratch folder)", **e.fields) from e
    target.refuse_inputs(inputs.sources)
    work = work_folder_path(target.repo_id, stream.scratch)
    assert inputs.base_source is not None
    check_scratch(work, inputs.base_source, inputs.adapter)
    with hub_bars_hidden():
        if options.dry_run:
            return _stream_merge(inputs, options, work)
        with work_folder(work, f"the scratch folder of a --stream into {target.repo_id}"):
            return _stream_merge(inputs, options, work)


def _stream_merge(inputs: MergeInputs, options: MergeOptions, scratch: Path) -> StreamReport:
    started = time.monotonic()
    target, stream, base = options.push_target, options.stream, inputs.base_source
    assert target is not None and stream is not None and base is not None
    checkpoint = open_streamed_base(base, scratch, target.token)
    prepared = prepare_merge(checkpoint, inputs, Path(target.repo_id), options)
    prepared.report.out = f"hf://{target.repo_id}"
    order = schedule(prepared.plan, checkpoint)
    journal = Journal(scratch, _journal_key(prepared, options, base), forget=stream.no_resume)
    publisher = None if options.dry_run else Publisher(target)
    fetcher = shard_fetcher(base, scratch, stream, target.token)
    report = _plan_report(prepared, order, fetcher, scratch, stream, target.repo_id)
    if publisher is not None:
        order.done = _still_on_hub(journal, publisher, order, report)
    if options.dry_run:
        if not prepared.plan.prequantized:  # a quantized base's weights are not fetched for a sample
            measure_sample(prepared)
        report.seconds = time.monotonic() - started
        return report
    _check_space(report, scratch)
    check_inputs_finite(prepared.adapter, options)
    make_view(base, scratch)
    assert publisher is not None
    publisher.open()
    pipeline = _Pipeline(prepared, order, fetcher, publisher, journal, scratch / "out", stream.progress, options)
    operations = pipeline.run(report)
    try:
        report.push = _commit(prepared, order, publisher, journal, operations, scratch, options).to_dict()
    except KeyboardInterrupt as e:
        raise StreamInterrupted(f"interrupted during the final commit to {target.repo_id}; run the same command again: "
                                "it uploads nothing again and makes (or repeats) the commit") from e
    _clean(scratch, journal)
    report.seconds = time.monotonic() - started
    return report


def check_scratch(scratch: Path, base: Source, adapter: Adapter) -> None:
    """The scratch folder may not be, hold or sit inside an input folder (it is emptied at the end)."""
    inputs = [base.path] + [a.path for a in adapter.sources]
    for folder in inputs:
        real = Path(folder).resolve()
        if scratch == real or real in scratch.parents or scratch in real.parents:
            raise OutputError(f"{scratch}: the scratch folder may not be, contain or be inside an input ({folder})")
    if scratch.exists() and not scratch.is_dir():
        raise OutputError(f"{scratch}: exists and is not a folder (the scratch folder of --stream)")


def open_streamed_base(base: Source, scratch: Path, token: str | None) -> Checkpoint:
    """A local base as it is; a Hub base from its snapshot (configs, index) and its shards' headers, each shard to be
    read through a link in `scratch/view` (made by `_make_view`, filled when the shard is fetched)."""
    if base.repo_id is None:
        return open_checkpoint(base.path)
    view = scratch / "view"

    def header(shard: str) -> SafetensorsHeader:  # a cached shard's header is read, not fetched
        cached = cached_shard(base, shard)
        if cached is None:
            return remote_header(base, shard, view, token)
        found = read_header(cached)
        found.path = view / shard
        return found

    checkpoint = open_checkpoint(base.path, remote=header)
    scheme = checkpoint_scheme(checkpoint.config, base.spec)
    if scheme is not None and scheme.method not in STREAMED_QUANTIZATION:
        raise InputError(f"{base.spec}: a {scheme.label} base is not streamed yet (FP8, MXFP4 and compressed-tensors "
                         "bases are); merge it without --stream (download, merge, then push)")
    return checkpoint


# Quantized formats a streamed merge takes: planning them reads headers only (bitsandbytes' quant states and GPTQ's
# group indices are tensor data, not yet fetched then). A compressed-tensors INT4/INT8 weight's shape comes from its
# scales (per group) or its packed width (per channel, Checkpoint.remote), its weight_shape checked when dequantized.
STREAMED_QUANTIZATION = ("fp8", "mxfp4", "ct_fp8", "ct_nvfp4", "ct_int")


def make_view(base: Source, scratch: Path) -> None:
    """The (empty) folder of links through which the merge reads a Hub base's shards."""
    scratch.mkdir(parents=True, exist_ok=True)
    if base.repo_id is not None:
        shutil.rmtree(scratch / "view", ignore_errors=True)
        (scratch / "view").mkdir()


def shard_fetcher(base: Source, scratch: Path, stream: StreamOptions, token: str | None) -> ShardFetcher | None:
    if base.repo_id is None:
        return None
    return ShardFetcher(base, scratch / "view", scratch / "base", keep_cache=stream.keep_cache, token=token,
                        listed=listed_sha256(base, token))


def _plan_report(prepared: PreparedMerge, order: StreamSchedule, fetcher: ShardFetcher | None, scratch: Path,
                 stream: StreamOptions, repo_id: str) -> StreamReport:
    """The disk bound: base shards this run stores (not cached; kept when --keep-cache), two output shards, the
    small files of the commit."""
    stored: set[str] = set()  # a local base: nothing is fetched
    if fetcher is not None:
        stored = {s for s in order.base_bytes if fetcher.cached(s) is None}
    extras = sum(p.stat().st_size for p in side_files(prepared.checkpoint.folder)) + (1 << 20)  # + index, provenance
    bound = order.disk_bound(set() if stream.keep_cache else stored) + extras
    if stream.keep_cache:
        bound += sum(order.base_bytes[s] for s in stored)
    report = StreamReport.of(prepared.report, repo_id=repo_id, scratch=str(scratch), disk_bound=bound,
                             model_bytes=order.total_out)
    report.free_bytes = free_space(scratch)
    if fetcher is not None:
        report.skipped["cached"] = sorted(set(order.base_bytes) - stored)
        report.skipped["downloaded_before"] = sorted(s for s in stored if fetcher.stored_before(s))
    return report


def _still_on_hub(journal: Journal, publisher: Publisher, order: StreamSchedule, report: StreamReport) -> set[str]:
    """Output shards an earlier run uploaded (the journal) that the Hub still stores: not made again."""
    known = [blob for name, blob in journal.entries.items() if name in order.out_bytes]
    stored = publisher.stored(known)
    done = {blob.path_in_repo for blob in known if blob.sha256 in stored}
    for name in set(journal.entries) - done:
        journal.entries.pop(name)
    report.skipped["uploaded_before"] = sorted(done)
    return done


def _check_space(report: StreamReport, scratch: Path) -> None:
    free = report.free_bytes
    if free is not None and report.disk_bound > free:
        raise OutputError(
            f"{scratch}: the streamed merge needs up to {human_size(report.disk_bound)} there but only "
            f"{human_size(free)} is free; free some space or pass --scratch on a larger disk (nothing was uploaded)")


def _journal_key(prepared: PreparedMerge, options: MergeOptions, base: Source) -> str:
    """What makes the shards of two runs equal: tool version, target, inputs (commits, or files' sizes and times),
    options and the output layout."""
    folders = [a.path for a in prepared.adapter.sources] + ([base.path] if base.repo_id is None else [])
    record = {
        "version": __version__, "repo": options.push.repo_id if options.push else None,
        "create_pr": options.push.create_pr if options.push else None,
        "sources": prepared.sources, "base": base.to_dict(),
        "inputs": [_listing(Path(f)) for f in folders] + ([options.initial] if options.initial else []),
        "options": [options.dtype, options.max_shard_size, options.device, str(options.trained_on),
                    options.base_is_residual, options.allow_nonfinite, options.keep_quantization],
        "weights": list(prepared.adapter.weights),
        "shards": [(name, [(t.name, t.dtype, list(t.shape)) for t in tensors]) for name, tensors in prepared.plan.shards],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    out = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else [folder]:
        if path.is_file():
            info = path.stat()
            out.append((path.name, info.st_size, info.st_mtime_ns))
    return out


class Journal:
    """The shards uploaded so far (not yet committed), in the scratch folder, for a re-run to skip.

    A journal of other inputs or options (another key) is ignored; one that cannot be read is an
    error that names it and says how to start over (`forget`: --no-resume).
    """

    def __init__(self, scratch: Path, key: str, *, forget: bool = False):
        self.path, self.key = scratch / JOURNAL_NAME, key
        self.entries: dict[str, Uploaded] = {}
        if forget or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("key") != key:
                return
            entries = [_journal_entry(e) for e in data["uploaded"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{self.path}: the journal of an earlier --stream run cannot be read ({_why(e)}); pass "
                             "--no-resume to start over, or delete it") from None
        self.entries = {e.path_in_repo: e for e in entries}

    def add(self, blob: Uploaded) -> None:
        self.entries[blob.path_in_repo] = blob
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "uploaded": [asdict(b) for b in self.entries.values()]}, indent=1),
                       encoding="utf-8")
        os.replace(tmp, self.path)


def _journal_entry(entry: object) -> Uploaded:
    """One uploaded blob as the journal records it, checked (a bad value raises ValueError)."""
    if not isinstance(entry, dict):
        raise ValueError("an entry is not an object")
    name, sha256, size = entry["path_in_repo"], entry["sha256"], entry["size"]
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        raise ValueError(f"path_in_repo {name!r} is not a shard name")
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256 {sha256!r} of {name} is not 64 hex digits")
    if type(size) is not int or size < 0:
        raise ValueError(f"size {size!r} of {name} is not a byte count")
    return Uploaded(name, sha256, size)


def _why(e: Exception) -> str:
    return f"missing {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__


class _Pipeline:
    """Download, merge and upload threads over one schedule; the calling thread merges."""

    def __init__(self, prepared: PreparedMerge, order: StreamSchedule, fetcher: ShardFetcher | None,
                 publisher: Publisher, journal: Journal, out: Path, progress: PhaseProgress | None,
                 options: MergeOptions):
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
        self.download_total = sum(order.base_bytes[s] for s in self.ready
                                  if fetcher is not None and fetcher.cached(s) is None)
        if fetcher is not None and progress is not None:
            fetcher.progress = lambda n: progress("download", n, self.download_total)

    def run(self, report: StreamReport) -> dict[str, Any]:
        """Every todo shard merged and pre-uploaded; their commit operations by name."""
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        threads = [threading.Thread(target=self._guarded, args=(loop,), daemon=True, name=f"rslora-tools-{name}")
                   for name, loop in (("download", self._download_all), ("upload", self._upload_all))]
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
            report.phases = self.phases
            report.skipped["hub_had"] = sorted(self.hub_had)
        record_measures(self.prepared, self.measures, sample=False)  # the base shards are gone by now
        return self.operations

    def _interrupted(self) -> str:
        done = len(self.journal.entries)
        return (f"interrupted; {done} of {len(self.order.outputs)} output shards are uploaded to {self.publisher.repo_id} "
                "but not committed (the repo is unchanged); run the same command again to resume")

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
                execute(Lowered([(name, lowered[name])], self.prepared.lowered.device), self.prepared.checkpoint,
                        self.prepared.adapter, self.out, self._counter("merge"),
                        allow_nonfinite=self.options.allow_nonfinite, measures=self.measures)
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


def _commit(prepared: PreparedMerge, order: StreamSchedule, publisher: Publisher, journal: Journal,
            operations: dict[str, Any], scratch: Path, options: MergeOptions) -> Any:
    """The one commit: every shard (uploaded now or by an earlier run), index, configs, provenance, card."""
    extras = scratch / "extras"
    shutil.rmtree(extras, ignore_errors=True)
    extras.mkdir()
    write_extras(extras, prepared, options)
    card = None if (extras / "README.md").is_file() else model_card(extras, publisher.repo_id)
    shards = [operations.get(name) or Publisher.restored(journal.entries[name]) for name in order.outputs]
    return publisher.commit(shards, extras, card, {name: order.out_bytes[name] for name in order.outputs})


def _clean(scratch: Path, journal: Journal) -> None:
    """After the commit: remove the working folder (this tool made it, and owns everything in it)."""
    journal.path.unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        scratch.parent.rmdir()  # --scratch DIR, when nothing else is in it (as it was made for the run)
    except OSError:
        pass  # the user's own files are in it
