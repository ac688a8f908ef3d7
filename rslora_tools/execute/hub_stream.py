"""`merge --stream --push-to-hub`: the writer of a Hub stream, Hub (or local) base to Hub, a few shards on disk at
a time.

The base is opened as it streams (execute/streamed_base.py); three threads merge and upload
(execute/stream_pipeline.py); at the end one commit adds every shard, the index, configs, side
files, provenance and the card. Resuming: every uploaded shard is recorded in the journal
(execute/stream_journal.py); a re-run of the same command checks that the Hub still stores those
blobs and skips their shards entirely (no download, no merge, no upload).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import OutputError, StreamInterrupted
from ..formats.checkpoint import side_files
from ..formats.output import free_space, work_folder
from ..formats.sizes import human_size
from ..hub.card import model_card
from ..hub.transfer import Publisher, ShardFetcher, hub_bars_hidden
from ..plan.stream import StreamSchedule, schedule
from ..reporting import ProgressCallback
from .merge_job import (
    MergeInputs,
    MergeReport,
    PreparedMerge,
    check_inputs_finite,
    measure_sample,
    prepare_merge,
    write_extras,
)
from .options import MergeOptions, StreamOptions
from .outputs import HubStream
from .stream_journal import Journal, journal_key
from .stream_pipeline import PHASES, Phase, Pipeline
from .streamed_base import check_scratch, make_view, open_streamed_base, shard_fetcher


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
    root = (
        scratch
        if scratch is not None
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rslora-tools" / "stream"
    )
    return root.expanduser().resolve() / f"rslora-tools-stream-{repo_id.replace('/', '--')}"


def stream_to_hub(
    inputs: MergeInputs, output: HubStream, options: MergeOptions, progress: ProgressCallback | None = None
) -> StreamReport:
    """Merge resolved inputs (BASE a Hub repo or a local folder, its shards not fetched) into the Hub repo
    `options.push`, shard by shard.

    The repo gets one commit with the whole model (with `create_pr`, a pull request) and a card;
    the disk holds at most the report's `disk_bound` beyond the adapter. A failure or Ctrl-C
    leaves the repo unchanged and the journal for a re-run. `options.dry_run`: plan, report the
    bound and the free space, transfer nothing. Progress goes by phase (`StreamOptions.progress`), not to
    `progress`.
    """
    target, stream = options.push_target, options.stream
    assert target is not None and stream is not None  # MergeOptions checks it; commands/merge.py refuses a push
    # into an input's own repo
    work = work_folder_path(target.repo_id, stream.scratch)
    assert inputs.base_source is not None
    check_scratch(work, inputs.base_source, inputs.adapter)
    with hub_bars_hidden():
        if options.dry_run:
            return _stream_merge(inputs, options, work)
        with work_folder(work, f"the scratch folder of a [[stream=StreamOptions()]] into {target.repo_id}"):
            return _stream_merge(inputs, options, work)


def _stream_merge(inputs: MergeInputs, options: MergeOptions, scratch: Path) -> StreamReport:
    started = time.monotonic()
    target, stream, base = options.push_target, options.stream, inputs.base_source
    assert target is not None and stream is not None and base is not None
    checkpoint = open_streamed_base(base, scratch, target.token)
    prepared = prepare_merge(checkpoint, inputs, Path(target.repo_id), options)
    prepared.report.out = f"hf://{target.repo_id}"
    order = schedule(prepared.plan, checkpoint)
    journal = Journal(scratch, journal_key(prepared, options, base), forget=stream.no_resume)
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
    pipeline = Pipeline(prepared, order, fetcher, publisher, journal, scratch / "out", stream.progress, options)
    try:
        operations = pipeline.run()
    finally:
        report.phases = pipeline.phases
        report.skipped["hub_had"] = sorted(pipeline.hub_had)
    try:
        report.push = _commit(prepared, order, publisher, journal, operations, scratch, options).to_dict()
    except KeyboardInterrupt as e:
        raise StreamInterrupted(
            f"interrupted during the final commit to {target.repo_id}; run the same command again: "
            "it uploads nothing again and makes (or repeats) the commit"
        ) from e
    _clean(scratch, journal)
    report.seconds = time.monotonic() - started
    return report


def _plan_report(
    prepared: PreparedMerge,
    order: StreamSchedule,
    fetcher: ShardFetcher | None,
    scratch: Path,
    stream: StreamOptions,
    repo_id: str,
) -> StreamReport:
    """The disk bound: base shards this run stores (not cached; kept when --keep-cache), two output shards, the
    small files of the commit."""
    stored: set[str] = set()  # a local base: nothing is fetched
    if fetcher is not None:
        stored = {s for s in order.base_bytes if fetcher.cached(s) is None}
    extras = sum(p.stat().st_size for p in side_files(prepared.checkpoint.folder)) + (1 << 20)  # + index, provenance
    bound = order.disk_bound(set() if stream.keep_cache else stored) + extras
    if stream.keep_cache:
        bound += sum(order.base_bytes[s] for s in stored)
    report = StreamReport.of(
        prepared.report, repo_id=repo_id, scratch=str(scratch), disk_bound=bound, model_bytes=order.total_out
    )
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
            f"{human_size(free)} is free; free some space or pass [[StreamOptions(scratch=...)]] on a larger disk "
            f"(nothing was uploaded)"
        )


def _commit(
    prepared: PreparedMerge,
    order: StreamSchedule,
    publisher: Publisher,
    journal: Journal,
    operations: dict[str, Any],
    scratch: Path,
    options: MergeOptions,
) -> Any:
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
