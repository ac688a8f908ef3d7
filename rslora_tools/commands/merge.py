"""`merge`, the merge command: resolve BASE and ADAPTER..., decide the output once, write it, publish it.

The work happens in the stages before: plan/merge.py decides what every output tensor becomes,
execute/lowering.py how each is produced; execute/outputs.py decides from OUT and the options
whether the merge writes a folder, one GGUF file or a stream to the Hub, and that output's writer
(execute/folder_writer.py, gguf_writer.py, hub_stream.py) prepares and writes it, atomically. This
module resolves the inputs (folders or Hub repos, several adapters stacked, `--initial`) and pushes
a folder OUT when asked.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from ..adapter.adapter import Adapter
from ..adapter.load import load_adapter
from ..adapter.relative import RelativeAdapter, relative_to_original
from ..adapter.stacked import stack_adapters
from ..errors import InputError, OptionError
from ..execute.merge_job import MergeInputs, MergeReport
from ..execute.options import MergeOptions
from ..execute.outputs import Folder, GgufFile, HubStream, Output, merge_output
from ..hub.resolve import resolve_merge_inputs
from ..reporting import ProgressCallback, counted
from .common import AdapterSpec, adapter_input, adapter_list, check_order, check_push, lora_only, publish, with_fields

__all__ = ["MergeOptions", "MergeReport", "merge", "merge_inputs", "with_initial"]


def merge(
    base: str | os.PathLike[str],
    adapter: AdapterSpec | Sequence[AdapterSpec],
    out: str | os.PathLike[str] | None = None,
    *,
    options: MergeOptions | None = None,
    progress: ProgressCallback | bool | None = None,
    **fields: Any,
) -> MergeReport:
    """Merge PEFT LoRA adapters into a base checkpoint, streaming, exactly as PEFT's merge_and_unload.

    Args:
        base: the base model: a folder (safetensors, single file or sharded), a Hub repo (`org/name`,
            `org/name@rev`, `hf://org/name`), or "auto" (the base the adapter records).
        adapter: an adapter (folder, Hub repo or loaded `Adapter`), or several: a stacked merge, in that
            order, as PEFT's merge_and_unload(adapter_names=[...]) (plan/stacking.py).
        out: the output folder, written atomically; None for a streamed merge (`options.stream`).
        options: a `MergeOptions`; keyword arguments are taken as its fields (`dtype="bf16"`, `overwrite=True`).
        progress: called as `progress(bytes_done_now, total_bytes)` as tensors are written (from worker
            threads, one call at a time); the CLI draws its progress bar with it.

    Returns:
        A `MergeReport` (a streamed merge: a `StreamReport`); `push` holds the push when one was asked.
    """
    if isinstance(progress, bool):  # the library never draws (the CLI does)
        if progress:
            warnings.warn(
                "merge(progress=True) no longer draws a progress bar (the CLI does); pass a callback "
                "progress(bytes_done_now, total_bytes)",
                DeprecationWarning,
                stacklevel=2,
            )
        progress = None
    options = with_fields(options, MergeOptions, fields)
    adapters = adapter_list(adapter)
    output = merge_output(out, options)  # decided once: a folder, a GGUF file or a stream to the Hub
    inputs = (
        _stream_inputs(base, adapters, options)
        if isinstance(output, HubStream)
        else merge_inputs(base, adapters, options, base_shards=output.reads_base_shards)
    )
    check_push(options, inputs.sources)  # a push into an input's own repo: refused before any work
    report = _write(inputs, output, options, progress)
    if isinstance(output, Folder):  # pushed once complete on disk (a stream is its own push)
        pushed = publish(output.path, options)
        report.push = pushed.to_dict() if pushed is not None else None
    return report


def _write(
    inputs: MergeInputs, output: Output, options: MergeOptions, progress: ProgressCallback | None
) -> MergeReport:
    """The output's writer (execute/outputs.py), imported only when it writes (a folder merge loads neither the Hub
    nor the GGUF code)."""
    if isinstance(output, Folder):
        from ..execute.folder_writer import write_folder

        return write_folder(inputs, output, options, progress)
    if isinstance(output, GgufFile):
        from ..execute.gguf_writer import write_gguf_file

        return write_gguf_file(inputs, output, options, progress)
    from ..execute.hub_stream import stream_to_hub

    return stream_to_hub(inputs, output, options, progress)


def _stream_inputs(base: str | os.PathLike[str], adapters: list[AdapterSpec], options: MergeOptions) -> MergeInputs:
    """A stream's inputs, its base's shards not fetched; a last adapter that is not one may be a mistaken OUT."""
    try:
        return merge_inputs(base, adapters, options, base_shards=False)
    except InputError as e:
        last = adapters[-1]
        if isinstance(last, Adapter) or not e.message.startswith(os.fspath(last)):
            raise
        raise InputError(
            f"{e.message} (with [[stream=StreamOptions()]] there is no OUT: every argument after BASE is an adapter; "
            "[[StreamOptions(scratch=DIR)]] names the scratch folder)",
            **e.fields,
        ) from e


def merge_inputs(
    base: str | os.PathLike[str], adapters: list[AdapterSpec], options: MergeOptions, base_shards: bool = True
) -> MergeInputs:
    """Resolve BASE and ADAPTER... (folders or Hub repos; BASE "auto": the adapter's own), load the adapters (several:
    stacked with their weights; --initial: made relative to the original base) and say where each came from."""
    check_order(
        "merge", "BASE, ADAPTER..., OUT", [("BASE", base, ("model", "merged")), ("ADAPTER", adapters[0], ("adapter",))]
    )
    if options.weights is not None and len(options.weights) != len(adapters):
        raise OptionError(
            f"[[weights]] has {counted(len(options.weights), 'weight')} for {counted(len(adapters), 'adapter')}"
        )
    if options.initial is not None and len(adapters) > 1:
        raise OptionError(
            "[[initial]] applies to one adapter; convert each PiSSA/OLoRA/CorDA/LoRA-GA adapter with "
            "`convert [[initial]]` first, then merge the converted adapters together"
        )
    first = adapters[0]
    base_source, first_source, warnings = resolve_merge_inputs(
        os.fspath(base),
        os.fspath(first.path if isinstance(first, Adapter) else first),
        base_revision=options.base_revision,
        adapter_revision=options.adapter_revision,
        token=options.token,
        allow_pickle=options.allow_pickle,
        base_shards=base_shards,
    )
    resolved = [(first if isinstance(first, Adapter) else first_source.path, first_source.to_dict())]
    resolved += [adapter_input(a, token=options.token, allow_pickle=options.allow_pickle) for a in adapters[1:]]
    loaded = [a if isinstance(a, Adapter) else load_adapter(a, allow_pickle=options.allow_pickle) for a, _ in resolved]
    sources: dict[str, Any] = {"base": base_source.to_dict(), "adapter": resolved[0][1]}
    if len(loaded) > 1 or options.weights is not None:  # one adapter with a weight: a stack of one
        lora_only(loaded, "a stacked merge")
        sources["adapters"] = [source for _, source in resolved]
        adapter_obj: Adapter = stack_adapters(loaded, list(options.weights) if options.weights else None)
    else:
        adapter_obj = loaded[0]
    if options.initial is not None:
        init, sources["initial"] = adapter_input(
            options.initial, token=options.token, allow_pickle=options.allow_pickle
        )
        adapter_obj = with_initial(adapter_obj, init, options.allow_pickle)
    return MergeInputs(base_source.path, adapter_obj, sources, warnings, base_source)


def with_initial(
    adapter: str | os.PathLike[str] | Adapter, initial: str | os.PathLike[str] | Adapter, allow_pickle: bool = False
) -> RelativeAdapter:
    """ADAPTER (PiSSA, OLoRA, CorDA, LoRA-GA) relative to the original base, given its INIT adapter."""
    trained = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, allow_pickle=allow_pickle)
    init = initial if isinstance(initial, Adapter) else load_adapter(initial, allow_pickle=allow_pickle)
    lora_only([trained, init], "a merge relative to the original base ([[initial=INIT]])")
    return relative_to_original(trained, init)
