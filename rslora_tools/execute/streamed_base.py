"""A base read while it streams: a Hub base opened from its snapshot and shard headers, each shard read through a
link in the scratch folder once fetched (hub.transfer.ShardFetcher), and the scratch folder's rules.

Both streamed writers use it: execute/hub_stream.py (Hub to Hub) and execute/gguf_writer.py
(`merge --stream ... OUT.gguf`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..adapter.adapter import Adapter
from ..errors import InputError, OutputError
from ..formats.checkpoint import Checkpoint, open_checkpoint
from ..formats.quant import checkpoint_scheme
from ..formats.safetensors_file import SafetensorsHeader, read_header
from ..hub.resolve import Source
from ..hub.transfer import ShardFetcher, cached_shard, listed_sha256, remote_header
from .options import StreamOptions


def check_scratch(scratch: Path, base: Source, adapter: Adapter) -> None:
    """The scratch folder may not be, hold or sit inside an input folder (it is emptied at the end)."""
    inputs = [base.path] + [a.path for a in adapter.sources]
    for folder in inputs:
        real = Path(folder).resolve()
        if scratch == real or real in scratch.parents or scratch in real.parents:
            raise OutputError(f"{scratch}: the scratch folder may not be, contain or be inside an input ({folder})")
    if scratch.exists() and not scratch.is_dir():
        raise OutputError(f"{scratch}: exists and is not a folder (the scratch folder of [[stream=StreamOptions()]])")


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
        raise InputError(
            f"{base.spec}: a {scheme.label} base is not streamed yet (FP8, MXFP4 and compressed-tensors "
            "bases are); merge it without [[stream=StreamOptions()]] (download, merge, then push)"
        )
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
    return ShardFetcher(
        base,
        scratch / "view",
        scratch / "base",
        keep_cache=stream.keep_cache,
        token=token,
        listed=listed_sha256(base, token),
    )
