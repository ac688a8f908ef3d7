"""Where a merge goes, decided once from OUT and the options: a folder, one GGUF file, or a stream to the Hub.

`merge_output(out, options)` makes the one `Folder | GgufFile | HubStream` a merge writes; each
refuses, when made, what it cannot do (a GGUF file is not re-sharded, a stream has no OUT to
overwrite), and says whether BASE's shards are fetched before the merge starts or as its writer
needs them (`reads_base_shards`). Each has one writer with the same interface,
`write_...(inputs, output, options, progress) -> MergeReport`, which prepares the merge, writes it
and reports: execute/folder_writer.py, gguf_writer.py, hub_stream.py (`_write` in
commands/merge.py calls it). A new kind of output is one class here and one writer module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError
from ..flags import marked
from .gguf_model import DEFAULT_OUTTYPE
from .options import MergeOptions


@dataclass(frozen=True)
class Folder:
    """OUT, a folder of safetensors shards with the base's side files, written atomically."""

    path: Path

    reads_base_shards = True


@dataclass(frozen=True)
class GgufFile:
    """OUT.gguf, one llama.cpp file written by llama.cpp's converter from the merged tensors; `streamed`: a Hub base's
    shards fetched as the converter needs them (--stream)."""

    path: Path
    outtype: str = DEFAULT_OUTTYPE
    streamed: bool = False

    def __post_init__(self) -> None:
        if self.path.suffix != ".gguf":
            raise OptionError(f"{self.path}: a GGUF OUT ends in .gguf", argument="OUT")

    @property
    def reads_base_shards(self) -> bool:
        return not self.streamed

    @classmethod
    def of(cls, out: Path, options: MergeOptions) -> GgufFile:
        for field in ("keep_quantization", "max_shard_size", "verify", "push"):
            if getattr(options, field) not in (None, False):
                raise OptionError(
                    f"{marked(MergeOptions, field)} does not go with a .gguf OUT (one llama.cpp file); "
                    "merge into a folder for it",
                    options=(field,),
                    out=str(out),
                )
        return cls(out, options.outtype or DEFAULT_OUTTYPE, streamed=options.stream is not None)


@dataclass(frozen=True)
class HubStream:
    """No OUT: the merged model streamed shard by shard into the Hub repo `options.push`, in one commit."""

    repo_id: str

    reads_base_shards = False


Output = Folder | GgufFile | HubStream


def merge_output(out: str | os.PathLike[str] | None, options: MergeOptions) -> Output:
    """The output OUT and the options ask for (OUT None: a stream to the Hub), or an OptionError saying why none."""
    gguf = out is not None and Path(out).suffix == ".gguf"
    if (options.outtype or options.llama_cpp) and not gguf:
        raise OptionError(
            "[[outtype]] and [[llama_cpp]] go with an OUT ending in .gguf (one llama.cpp file)",
            options=("outtype", "llama_cpp"),
        )
    if gguf:
        assert out is not None
        return GgufFile.of(Path(out), options)
    if options.stream is not None:
        if out is not None:
            raise OptionError(
                "a streamed merge writes no OUT (to the Hub) or one OUT.gguf: every other argument after "
                "BASE is an adapter",
                options=("stream",),
            )
        if options.push is None:
            raise OptionError(
                "[[stream=StreamOptions()]] with [[outtype]] writes an OUT.gguf: name it after the adapters",
                options=("stream", "outtype"),
            )
        return HubStream(options.push.repo_id)
    if out is None:
        raise OptionError("missing OUT: merge BASE ADAPTER... OUT (or stream to the Hub)", argument="OUT")
    return Folder(Path(out))
