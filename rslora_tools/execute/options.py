"""The options of the commands that write: what every one takes (`OutputOptions`) and a merge's (`MergeOptions`,
`StreamOptions`), each frozen and checked when made (`OptionError`: a usage error).

The writers of this stage read them (execute/outputs.py decides from OUT and these options which
writer a merge takes); commands/ builds them from keyword arguments, the CLI from its flags.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, OptionError, cli_message
from ..formats.quant import QuantScheme, trained_on_scheme
from ..formats.sizes import parse_size
from ..plan.tensors import parse_dtype
from ..reporting import PhaseProgress
from .gguf_model import OUTTYPES

if TYPE_CHECKING:  # the push code is imported when a command pushes
    from ..hub.push import PushTarget


@dataclass(frozen=True)
class OutputOptions:
    """What every command that writes an output takes (the fields of its options object)."""

    overwrite: bool = False  # replace OUT when rslora-tools wrote it (docs/reliability.md, "What --overwrite replaces")
    dry_run: bool = False  # plan and report; write nothing
    allow_nonfinite: bool = False  # write NaN/Inf where the inputs or the result hold them
    token: str | None = None  # Hugging Face token for Hub inputs (and the push, unless push.token is set)
    push: PushTarget | None = None  # publish OUT to this repo when it is written

    @property
    def push_target(self) -> PushTarget | None:
        """The push, with this options' token when it names none."""
        if self.push is None or self.push.token is not None or self.token is None:
            return self.push
        return dataclasses.replace(self.push, token=self.token)


def parse_weights(weights: Any) -> tuple[float, ...]:
    """Adapter weights as given: a sequence of numbers, or one comma-separated string ("0.7,0.3") as the CLI
    takes them; each finite."""
    items = weights.split(",") if isinstance(weights, str) else weights
    try:
        values = tuple(float(w) for w in items) if not isinstance(items, (int, float)) else (float(items),)
    except (TypeError, ValueError):
        raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)") from None
    if not values or any(isinstance(w, bool) for w in (items if isinstance(items, (list, tuple)) else ())):
        raise OptionError(f"--weights {weights!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)")
    if not all(math.isfinite(w) for w in values):
        raise OptionError("--weights must be finite numbers")
    return values


@dataclass(frozen=True)
class MergeOptions(OutputOptions):
    """Everything a merge can be asked to do besides its inputs and OUT; checked when made (OptionError).

    `dtype` ("bf16", "fp16", "fp32", their torch spellings, or None/"auto": keep the base's),
    `max_shard_size` ("5GB" or bytes) and `trained_on` ("nf4", "fp4", "int8", or a QuantScheme
    from formats.quant.trained_on_scheme for its block size and double quantization) are taken
    as people write them and kept parsed.
    """

    weights: tuple[float, ...] | None = None  # several adapters: each one's delta multiplied (PEFT's set_scale)
    dtype: str | None = None  # safetensors dtype of the floating output tensors; None keeps the base's
    device: str = "cpu"  # cpu (bit-exact with PEFT), cuda or auto
    max_shard_size: int | None = None  # re-shard the output; None keeps the base's shards
    verify: bool = False  # recompute and compare every tensor before OUT is replaced
    allow_pickle: bool = False  # read an adapter that exists only as adapter_model.bin (weights_only)
    trained_on: QuantScheme | None = None  # quantize the base's weights as in training before merging (QLoRA)
    keep_quantization: bool = False  # a quantized base: write the changed weights back in its format
    initial: str | None = None  # INIT (folder or Hub repo): merge a PiSSA/OLoRA/CorDA/LoRA-GA adapter into BASE
    base_is_residual: bool = False  # BASE is such an adapter's residual base: merge it as plain LoRA
    base_revision: str | None = None  # of BASE, when it is a Hub repo
    adapter_revision: str | None = None  # of the (first) adapter, when it is a Hub repo
    stream: StreamOptions | None = None  # stream from BASE to the Hub repo `push`, shard by shard (no OUT)
    outtype: str | None = None  # an OUT.gguf: f16, bf16, f32 or q8_0 (convert_hf_to_gguf.py's --outtype); default f16
    llama_cpp: str | None = None  # an OUT.gguf: the llama.cpp checkout whose converter writes it

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", parse_dtype(self.dtype))
            size = self.max_shard_size
            object.__setattr__(self, "max_shard_size", parse_size(size) if size is not None else None)
            if isinstance(self.trained_on, str):
                object.__setattr__(self, "trained_on", trained_on_scheme(self.trained_on))
        except (ValueError, InputError) as e:
            raise OptionError(cli_message(e)) from None
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise OptionError(f"unknown device {self.device!r}; use cpu, cuda or auto")
        if self.weights is not None:
            object.__setattr__(self, "weights", parse_weights(self.weights))
        if self.initial is not None and self.base_is_residual:
            raise OptionError("--initial and --base-is-residual exclude each other: the first merges into the original "
                              "base, the second into the residual base")
        if self.keep_quantization and self.trained_on is not None:
            raise OptionError("--keep-quantization keeps a quantized base's format; --trained-on is for an unquantized "
                              "base (and the output is unquantized)")
        if self.keep_quantization and self.dtype is not None:
            raise OptionError("--keep-quantization writes the base's own dtypes; --dtype does not go with it")
        if self.stream is not None:
            self._check_stream()
        if self.outtype is not None and self.outtype not in OUTTYPES:
            *first, last = OUTTYPES
            raise OptionError(f"unknown --outtype {self.outtype!r}; use {', '.join(first)} or {last}")

    def _check_stream(self) -> None:
        if self.push is None and self.outtype is None:
            raise OptionError("--stream sends the merged model to the Hub: pass --push-to-hub REPO_ID (or name an "
                              "OUT.gguf with --outtype; without --stream, merge into OUT)")
        for given, name in ((self.verify, "--verify"), (self.overwrite, "--overwrite")):
            if given:
                raise OptionError(f"{name} does not go with --stream (no OUT is written); verify the pushed repo with "
                                  "`rslora-tools verify` after downloading it")


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed merge runs (--scratch, --keep-cache, --no-resume); where it goes is `MergeOptions.push`."""

    scratch: Path | None = None  # the folder the run's working folder goes in; default: ~/.cache/rslora-tools/stream
    keep_cache: bool = False  # base shards downloaded go into the Hugging Face cache and stay
    no_resume: bool = False  # forget what an earlier run uploaded (its journal) and start over
    progress: PhaseProgress | None = None  # called as progress(phase, bytes_done_now, phase_total)
