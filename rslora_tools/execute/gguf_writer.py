"""The writer of an OUT.gguf: the merged model straight into one llama.cpp file (execute/gguf_model.py).

The merge is planned as for a folder; its side files (config, tokenizer, templates) go into a small
working folder named as OUT without `.gguf` (the name llama.cpp's converter records as the model's
name), and llama.cpp's converter writes OUT from them and the merged tensors, one tensor at a time:
the disk holds the inputs, OUT and those few files. OUT is written atomically like every output.
Streamed (`--stream`), a Hub base's shards are fetched as the converter first needs them and
deleted once every tensor reading them is written.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

from ..formats.checkpoint import copy_side_files
from ..formats.output import check_output_file, free_space, work_folder, writing
from ..formats.sizes import human_size
from ..hub.transfer import ShardFetcher, hub_bars_hidden
from ..plan.stream import schedule
from ..plan.tensors import Plan
from ..reporting import ProgressCallback
from .gguf_model import OUTTYPES
from .merge_job import MergeInputs, MergeReport, PreparedMerge, check_inputs_finite, prepare_merge
from .options import MergeOptions
from .outputs import GgufFile
from .streamed_base import check_scratch, make_view, open_streamed_base, shard_fetcher

NEXT_STEP = (
    "next: K-quants with an importance matrix, as llama.cpp advises: llama-imatrix on OUT with a "
    "calibration text, then llama-quantize OUT with that matrix (README, 'Straight to GGUF')"
)


def write_gguf_file(
    inputs: MergeInputs, output: GgufFile, options: MergeOptions, progress: ProgressCallback | None = None
) -> MergeReport:
    """A merge of resolved inputs into OUT.gguf (or, dry, its report); llama.cpp's converter draws its own progress
    on a terminal, not through `progress`."""
    started = time.monotonic()
    if output.streamed:
        return _streamed(inputs, output, options, started)
    prepared = prepare_merge(inputs.base, inputs, output.path, options)
    return _write(prepared, output, options, started)


def gguf_size(plan: Plan, outtype: str) -> int:
    """About what the GGUF's tensors take: matrices in `outtype`, vectors in float32 (as llama.cpp's converter keeps
    norms and biases), plus the side files' size for the metadata."""
    total = 0.0
    for t in plan.tensors:
        total += math.prod(t.shape) * (OUTTYPES[outtype].bytes_per_value if len(t.shape) > 1 else 4.0)
    return int(total)


def _write(
    prepared: PreparedMerge,
    output: GgufFile,
    options: MergeOptions,
    started: float,
    fetcher: ShardFetcher | None = None,
) -> MergeReport:
    """Write (or, dry, describe) OUT.gguf from a prepared merge; `fetcher`: a streamed Hub base's shards."""
    from .gguf_model import find_llama_cpp, write_merged_gguf

    checkpoint, adapter, report, plan = prepared.checkpoint, prepared.adapter, prepared.report, prepared.plan
    out, outtype = output.path, output.outtype
    llama_cpp = find_llama_cpp(options.llama_cpp)
    written = check_output_file(out, [checkpoint.folder, *(a.path for a in adapter.sources)], options.overwrite)
    report.bytes_written = gguf_size(plan, outtype)
    report.shards = [out.name]
    report.free_bytes = free_space(out.parent)
    report.gguf = {"outtype": outtype, "llama_cpp": str(llama_cpp), "next_step": NEXT_STEP}
    if options.dry_run:
        report.seconds = time.monotonic() - started
        return report
    check_inputs_finite(adapter, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.rslora-tools-side-", dir=out.parent) as work:
        side = Path(work) / out.name.removesuffix(".gguf")
        side.mkdir()
        copy_side_files(checkpoint.folder, adapter.path, side, plan.config_updates)
        with writing(
            out,
            written,
            overwrite=options.overwrite,
            what="writing the GGUF file",
            warnings=report.warnings,
            single_file=True,
        ) as tmp:
            streamed = (fetcher.fetch, fetcher.release) if fetcher is not None else None
            write_merged_gguf(plan, checkpoint, adapter, side, tmp, outtype, llama_cpp, streamed)
    report.bytes_written = out.stat().st_size
    report.seconds = time.monotonic() - started
    return report


def _streamed(inputs: MergeInputs, output: GgufFile, options: MergeOptions, started: float) -> MergeReport:
    """`merge --stream BASE ADAPTER... OUT.gguf`: the disk holds OUT, the side files and a shard or two."""
    stream, source, out = options.stream, inputs.base_source, output.path
    assert stream is not None and source is not None
    scratch = stream.scratch or out.parent / f".{out.name}.rslora-tools-stream"
    check_scratch(scratch, source, inputs.adapter)
    with hub_bars_hidden():
        checkpoint = open_streamed_base(source, scratch, options.token)
        prepared = prepare_merge(checkpoint, inputs, out, options)
        order = schedule(prepared.plan, checkpoint)
        fetcher = shard_fetcher(source, scratch, stream, options.token)
        stored = {s for s in order.base_bytes if fetcher is not None and fetcher.cached(s) is None}
        largest = max(
            (sum(order.base_bytes[s] for s in order.needs[o] if s in stored) for o in order.outputs), default=0
        )
        prepared.report.notes.append(
            f"streamed: base shards fetched as needed and deleted after use (at most about "
            f"{human_size(largest)} of them on disk at a time, in {scratch})"
        )
        if options.dry_run:
            return _write(prepared, output, options, started)
        with work_folder(scratch, f"the scratch folder of a [[stream=StreamOptions()]] into {out}"):
            make_view(source, scratch)
            report = _write(prepared, output, options, started, fetcher)
            shutil.rmtree(scratch, ignore_errors=True)  # this tool made it and owns all in it (links, download notes)
        return report
