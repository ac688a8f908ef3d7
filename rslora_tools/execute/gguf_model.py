"""A merged model written straight into one GGUF file by llama.cpp's own converter, used as a library.

`convert_hf_to_gguf.py` reads a model folder: config and tokenizer files for the metadata, and the
safetensors shards for the tensors, which it wraps lazily and converts one at a time as it writes.
Here the converter gets a folder holding only the merged model's side files (config.json with the
merge's updates, tokenizer, chat template: a few MB), and, in place of the shards, the same lazy
tensors computed by the merge (compute/torch_ops.merged_tensor, which `verify` proves equal to the
merged folder's tensors), in the order it would read the merged folder's shards: shard files sorted,
tensors sorted by name within each. So the GGUF is byte for byte what `convert_hf_to_gguf.py
MERGED --outtype T` writes for the folder `merge` writes, with no 16-bit copy on disk (docs/gguf.md).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedAdapterError
from ..formats.checkpoint import Checkpoint, CheckpointFiles
from ..formats.safetensors_file import safetensors_to_torch_dtype
from ..plan.tensors import Plan, TensorPlan

if TYPE_CHECKING:
    import torch

    from ..adapter.adapter import Adapter


@dataclass(frozen=True)
class Outtype:
    """One `--outtype` of a merged GGUF (convert_hf_to_gguf.py's own): the file type the converter is given, and
    what a matrix takes per value (q8_0: blocks of 32 values in 34 bytes; vectors stay float32)."""

    file_type: str  # the gguf.LlamaFileType member
    bytes_per_value: float


# The one table of outtypes: MergeOptions checks against it, the CLI offers its keys, the writer sizes and converts.
OUTTYPES = {
    "f16": Outtype("MOSTLY_F16", 2.0),
    "bf16": Outtype("MOSTLY_BF16", 2.0),
    "f32": Outtype("ALL_F32", 4.0),
    "q8_0": Outtype("MOSTLY_Q8_0", 34 / 32),
}
DEFAULT_OUTTYPE = "f16"  # an OUT.gguf whose outtype is not given
LLAMA_CPP_ENV = "RSLORA_TOOLS_LLAMA_CPP_DIR"
_TEST_BUILD = "llama-cpp-python-0.3.36/llama.cpp"  # where scripts/setup_llama_cpp.sh unpacks the converter
TWO_STEP = (
    "merge into a folder, then run llama.cpp's converter on it: [[rslora_tools.merge(BASE, ADAPTER, MERGED)]] && "
    "python convert_hf_to_gguf.py MERGED --outtype T"
)


def find_llama_cpp(explicit: str | os.PathLike[str] | None) -> Path:
    """The llama.cpp checkout whose convert_hf_to_gguf.py writes the GGUF: `explicit` (--llama-cpp), else
    $RSLORA_TOOLS_LLAMA_CPP_DIR, else the copy scripts/setup_llama_cpp.sh unpacked."""
    cache = Path(os.environ.get("RSLORA_TOOLS_CACHE") or Path.home() / ".cache" / "rslora-tools")
    candidates = (
        [Path(explicit)]
        if explicit
        else [Path(p) for p in (os.environ.get(LLAMA_CPP_ENV),) if p] + [cache / _TEST_BUILD]
    )
    for folder in candidates:
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir():
            return folder
    where = explicit or os.environ.get(LLAMA_CPP_ENV) or str(cache / _TEST_BUILD)
    raise InputError(
        f"{where}: no llama.cpp checkout here (convert_hf_to_gguf.py and gguf-py/); a GGUF OUT needs "
        f"one: run scripts/setup_llama_cpp.sh (in a clone of rslora-tools: it unpacks the llama.cpp the "
        f"tests use there), or pass [[llama_cpp=DIR]] or set {LLAMA_CPP_ENV} (git clone "
        "https://github.com/ggml-org/llama.cpp)"
    )


@contextmanager
def _converter_on_path(llama_cpp: Path) -> Iterator[Any]:
    """llama.cpp's `conversion` package and its own `gguf` (gguf-py: the converter needs its own version)."""
    paths = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    saved = {k: v for k, v in sys.modules.items() if k == "gguf" or k.startswith(("gguf.", "conversion"))}
    for name in saved:
        del sys.modules[name]
    sys.path[:0] = paths
    try:
        try:
            conversion = importlib.import_module("conversion")
        except ImportError as e:
            raise InputError(
                f"{llama_cpp}: llama.cpp's converter needs the Python package {e.name!r}: pip install "
                f"-r {llama_cpp}/requirements/requirements-convert_hf_to_gguf.txt"
            ) from e
        yield conversion
    finally:
        del sys.path[: len(paths)]
        for name in [k for k in sys.modules if k == "gguf" or k.startswith(("gguf.", "conversion"))]:
            del sys.modules[name]
        sys.modules.update(saved)


class ShardUse:
    """A streamed base (`merge --stream OUT.gguf`): each base shard fetched when a tensor first needs it, and released
    (closed, then deleted by `release`) once every tensor reading it is computed, whatever order the converter asks
    in."""

    def __init__(
        self, plan: Plan, files: CheckpointFiles, fetch: Callable[[str], object], release: Callable[[str], None]
    ):
        from ..plan.stream import base_reads

        self.files, self.fetch, self.release = files, fetch, release
        self.reads = {t.name: sorted({files.checkpoint.weight_map[r] for r in base_reads(t)}) for t in plan.tensors}
        self.left: dict[str, int] = {}
        for shards in self.reads.values():
            for shard in shards:
                self.left[shard] = self.left.get(shard, 0) + 1
        self.present: set[str] = set()

    def before(self, t: TensorPlan) -> None:
        for shard in self.reads[t.name]:
            if shard not in self.present:
                self.fetch(shard)
                self.present.add(shard)

    def after(self, t: TensorPlan) -> None:
        for shard in self.reads[t.name]:
            self.left[shard] -= 1
            if self.left[shard] == 0:
                self.files.forget(shard)
                self.release(shard)
                self.present.discard(shard)


def write_merged_gguf(
    plan: Plan,
    checkpoint: Checkpoint,
    adapter: Adapter,
    side_dir: Path,
    out: Path,
    outtype: str,
    llama_cpp: Path,
    streamed: tuple[Callable[[str], object], Callable[[str], None]] | None = None,
) -> None:
    """Write the merged model as one GGUF file at `out`, llama.cpp's converter reading `side_dir` for its metadata;
    `streamed`: (fetch, release) of a streamed base's shards (ShardUse)."""
    import logging

    import torch

    files = CheckpointFiles(checkpoint)
    use = ShardUse(plan, files, *streamed) if streamed is not None else None
    quiet = logging.getLogger("hf-to-gguf"), logging.getLogger("gguf.gguf_writer")
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)  # its notes ("Unknown RoPE type") are not this command's
    try:
        with _converter_on_path(llama_cpp) as conversion, torch.inference_mode():
            model_class = _model_class(conversion, side_dir)
            lazy = importlib.import_module("conversion.base").LazyTorchTensor
            tensors = _merged_tensors(plan, files, adapter, use)

            class Merged(model_class):  # type: ignore[misc, valid-type]
                model_arch = model_class.model_arch  # the converter requires it in each class's own body

                def index_tensors(self, remote_hf_model_id: str | None = None) -> dict[str, Callable[[], Any]]:
                    indexed: dict[str, Callable[[], Any]] = {}
                    for name, (dtype, shape, compute) in tensors.items():

                        def gen(
                            dtype: torch.dtype = dtype,
                            shape: tuple[int, ...] = shape,
                            compute: Callable[[], torch.Tensor] = compute,
                        ) -> Any:
                            return lazy(meta=lazy.meta_with_dtype_and_shape(dtype, shape), args=(), func=compute)

                        if item := self.filter_tensors((name, gen)):
                            indexed[item[0]] = item[1]
                    return indexed

            ftype = getattr(importlib.import_module("gguf").LlamaFileType, OUTTYPES[outtype].file_type)
            model = Merged(side_dir, ftype, out)
            _progress_on_terminal(model.gguf_writer)
            try:
                model.write()
            except (ValueError, OSError, KeyError, TypeError) as e:
                if "tokenizer" not in str(e).lower() and "vocab" not in str(e).lower():
                    raise
                raise InputError(_no_vocabulary(checkpoint, e)) from None
    finally:
        files.close()
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def _progress_on_terminal(writer: Any) -> None:
    """The converter's progress bar, drawn only on a terminal (as every progress bar of this tool)."""
    write_tensors = writer.write_tensors_to_file

    def quiet_unless_terminal(*args: Any, progress: bool = False, **kwargs: Any) -> Any:
        return write_tensors(*args, progress=progress and sys.stderr.isatty(), **kwargs)

    writer.write_tensors_to_file = quiet_unless_terminal


def _model_class(conversion: Any, side_dir: Path) -> Any:
    hparams = conversion.ModelBase.load_hparams(side_dir, False)
    try:
        architecture = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
    except ValueError as e:  # no "architectures" in config.json
        raise InputError(
            f"BASE's config.json: llama.cpp's converter cannot tell the architecture ({e}); add "
            '"architectures" (e.g. ["LlamaForCausalLM"]) to it'
        ) from None
    try:
        return conversion.get_model_class(architecture, mmproj=False)
    except NotImplementedError:
        raise UnsupportedAdapterError(
            f"llama.cpp's converter does not support {architecture}, so no GGUF can be written for it; {TWO_STEP} "
            "(with a llama.cpp that supports it)"
        ) from None


def _no_vocabulary(checkpoint: Checkpoint, e: Exception) -> str:
    """One true line for the converter's failure to read BASE's tokenizer (it says "install sentencepiece" even when
    sentencepiece is installed and the files are simply not there)."""
    found = sorted(p.name for p in checkpoint.folder.iterdir() if p.name.startswith("tokenizer"))
    has = f"it has {', '.join(found)}" if found else "it has no tokenizer files"
    reason = " ".join(str(e).split())[:160]
    return (
        f"{checkpoint.folder}: llama.cpp's converter cannot read BASE's tokenizer ({has}; it said: {reason}); a "
        "GGUF holds the vocabulary, so BASE needs the model's tokenizer files (tokenizer.model, or tokenizer.json "
        "with tokenizer_config.json), and the converter's Python needs (transformers, sentencepiece)"
    )


def _merged_tensors(
    plan: Plan, files: CheckpointFiles, adapter: Adapter, use: ShardUse | None
) -> dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """Every output tensor, in the order the converter reads the merged folder, with the function computing it."""
    order = sorted((shard, t.name) for shard, planned in plan.shards for t in planned)
    by_name = {t.name: t for t in plan.tensors}
    out = {}
    for _, name in order:
        t = by_name[name]
        out[name] = (safetensors_to_torch_dtype(t.dtype), tuple(t.shape), _compute(t, files, adapter, use))
    return out


def _compute(
    t: TensorPlan, files: CheckpointFiles, adapter: Adapter, use: ShardUse | None
) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        from ..compute.torch_ops import merged_tensor

        if use is not None:
            use.before(t)
        dtype = safetensors_to_torch_dtype(t.dtype)
        if t.untouched and t.source is not None and files.checkpoint.info(t.source).dtype == t.dtype:
            value = files.read(t.source)
        else:
            value = merged_tensor(t, files.read, adapter.tensor, dtype).contiguous()
        if use is not None:
            use.after(t)
        return value

    return compute
