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

from ..errors import InputError, OptionError, marked_message
from ..flags import DRY_RUN, TOKEN, Flag, marked, option
from ..formats.quant import QuantScheme, trained_on_scheme
from ..formats.sizes import parse_size
from ..plan.tensors import parse_dtype
from ..reporting import PhaseProgress
from .gguf_model import DEFAULT_OUTTYPE, OUTTYPES

if TYPE_CHECKING:  # the push code is imported when a command pushes
    from ..hub.target import PushTarget

# Flags several options objects share, declared once.
ALLOW_PICKLE = Flag(
    "--allow-pickle",
    is_flag=True,
    help="Read an adapter that exists only as adapter_model.bin (torch.load weights_only=True; no code runs).",
)
PUSH = (
    Flag(
        "--push-to-hub",
        dest="push_to",
        metavar="REPO_ID",
        api="push=PushTarget(",
        help="Upload OUT to this Hub repo when done.",
    ),
    Flag(
        "--private", is_flag=True, api="PushTarget(private=True)", help="With --push-to-hub: create the repo private."
    ),
    Flag(
        "--create-pr",
        is_flag=True,
        api="PushTarget(create_pr=True)",
        help="With --push-to-hub: open a pull request instead of committing to main.",
    ),
    Flag(
        "--commit-message",
        metavar="TEXT",
        api="PushTarget(commit_message=",
        help="With --push-to-hub: the commit message.",
    ),
)
BASE_REVISION = Flag("--base-revision", metavar="REV", help="Branch, tag or commit of BASE when it is a Hub repo.")
ADAPTER_REVISION = Flag(
    "--adapter-revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo."
)
TRAINED_ON = (
    Flag(
        "--trained-on",
        choices=("nf4", "fp4", "int8"),
        help="The adapter was trained on BASE quantized this way "
        "(QLoRA): quantize the weights transformers would, as bitsandbytes does, then merge. A quantized BASE is "
        "dequantized without this.",
    ),
    Flag(
        "--double-quant",
        secondary="--no-double-quant",
        dest="double_quant",
        api="trained_on_scheme(double_quant=True)",
        help="With --trained-on nf4/fp4: "
        "bnb_4bit_use_double_quant [default: off, as in BitsAndBytesConfig; most QLoRA recipes turn it on].",
    ),
    Flag(
        "--quant-blocksize",
        dest="quant_blocksize",
        api="trained_on_scheme(blocksize=",
        choices=tuple(str(2**i) for i in range(5, 13)),
        help="With --trained-on nf4/fp4: the 4-bit block size [default: 64, bitsandbytes' and so "
        "BitsAndBytesConfig's].",
    ),
    Flag(
        "--skip-modules",
        dest="skip_modules",
        api="trained_on_scheme(skip_modules=",
        metavar="NAMES",
        help="With --trained-on: modules transformers left "
        "unquantized, comma-separated, as llm_int8_skip_modules (replaces the default, which keeps the output head).",
    ),
)
INITIAL = Flag(
    "--initial",
    metavar="INIT",
    help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved right after "
    "initialisation (folder or Hub repo); merge into the original BASE.",
)
REVISION = Flag("--revision", metavar="REV", help="Branch, tag or commit of ADAPTER when it is a Hub repo.")
BASE_IS_RESIDUAL = Flag(
    "--base-is-residual",
    is_flag=True,
    help="PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ: BASE is the "
    "residual base the adapter was trained on (you saved it); merge as plain LoRA.",
)
STREAM = (
    Flag(
        "--stream",
        is_flag=True,
        api="stream=StreamOptions()",
        help="With --push-to-hub: stream shard by shard from BASE to the Hub; OUT is "
        "omitted (every argument after BASE is an adapter), the disk holds a few shards at a time.",
    ),
    Flag(
        "--scratch",
        dest="scratch",
        api="StreamOptions(scratch=",
        metavar="DIR",
        folder=True,
        help="With --stream: the run works in "
        "DIR/rslora-tools-stream-ORG--NAME (default DIR ~/.cache/rslora-tools/stream), a folder of its own; a re-run "
        "with the same one resumes.",
    ),
    Flag(
        "--keep-cache",
        dest="keep_cache",
        api="StreamOptions(keep_cache=True)",
        is_flag=True,
        help="With --stream: keep the downloaded base shards in the "
        "Hugging Face cache (default: delete them after use; shards cached before are never deleted).",
    ),
    Flag(
        "--no-resume",
        dest="no_resume",
        api="StreamOptions(no_resume=True)",
        is_flag=True,
        help="With --stream: forget what an earlier run uploaded (its journal in the scratch folder) and start over.",
    ),
)


@dataclass(frozen=True)
class OutputOptions:
    """What every command that writes an output takes (the fields of its options object)."""

    overwrite: bool = option(
        False,
        Flag(  # docs/reliability.md, "What --overwrite replaces"
            "--overwrite",
            is_flag=True,
            help="Replace OUT if rslora-tools wrote it (an earlier output); other folders and "
            "files are never replaced.",
        ),
    )
    dry_run: bool = option(False, DRY_RUN)
    allow_nonfinite: bool = option(
        False,
        Flag(  # write NaN/Inf where the inputs or the result hold them
            "--allow-nonfinite", is_flag=True, help="{verb} even if the weights hold NaN or Inf."
        ),
    )
    token: str | None = option(None, TOKEN)  # for Hub inputs (and the push, unless push.token is set)
    push: PushTarget | None = option(None, *PUSH)  # publish OUT to this repo when it is written

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
        raise OptionError(
            f"[[weights={weights!r}]] is not a comma-separated list of numbers (e.g. 0.7,0.3)", options=("weights",)
        ) from None
    if not values or any(isinstance(w, bool) for w in (items if isinstance(items, (list, tuple)) else ())):
        raise OptionError(
            f"[[weights={weights!r}]] is not a comma-separated list of numbers (e.g. 0.7,0.3)", options=("weights",)
        )
    if not all(math.isfinite(w) for w in values):
        raise OptionError("[[weights]] must be finite numbers", options=("weights",))
    return values


@dataclass(frozen=True)
class MergeOptions(OutputOptions):
    """Everything a merge can be asked to do besides its inputs and OUT; checked when made (OptionError).

    `dtype` ("bf16", "fp16", "fp32", their torch spellings, or None/"auto": keep the base's),
    `max_shard_size` ("5GB" or bytes) and `trained_on` ("nf4", "fp4", "int8", or a QuantScheme
    from formats.quant.trained_on_scheme for its block size and double quantization) are taken
    as people write them and kept parsed.
    """

    weights: tuple[float, ...] | None = option(
        None,
        Flag(  # each adapter's delta multiplied (PEFT's set_scale)
            "--weights",
            metavar="W1,W2,...",
            help="Multiply each adapter's delta by its weight (PEFT's set_scale), one "
            "weight per adapter (`--weights 0.5` with one adapter merges half its delta); default 1 each.",
        ),
    )
    dtype: str | None = option(
        None,
        Flag(  # safetensors dtype of the floating output tensors; None keeps the base's
            "--dtype",
            choices=("auto", "bf16", "fp16", "fp32", "bfloat16", "float16", "float32"),
            default="auto",
            show_default=True,
            help="Dtype of the merged floating tensors; auto keeps the base's.",
        ),
    )
    device: str = option(
        "cpu",
        Flag(
            "--device",
            choices=("cpu", "cuda", "auto"),
            show_default=True,
            help="Where deltas are computed. cpu: "
            "bit-exact with PEFT; cuda: every computed tensor on the GPU; auto: the merge kernel where it applies, "
            "CUDA "
            "(when present) for the rest.",
        ),
    )
    max_shard_size: int | None = option(
        None,
        Flag(  # None keeps the base's shards
            "--max-shard-size",
            metavar="SIZE",
            help="Re-shard the output, e.g. 5GB (decimal, like transformers) or 2GiB. "
            "Default: keep the base's shards.",
        ),
    )
    verify: bool = option(
        False,
        Flag(
            "--verify",
            is_flag=True,
            help="Recompute and compare every merged tensor before OUT is replaced; fail on a mismatch.",
        ),
    )
    allow_pickle: bool = option(False, ALLOW_PICKLE)
    trained_on: QuantScheme | None = option(None, *TRAINED_ON)  # quantize the base's weights as in training (QLoRA)
    keep_quantization: bool = option(
        False,
        Flag(
            "--keep-quantization",
            is_flag=True,
            help="A quantized BASE (FP8, MXFP4, compressed-tensors FP8/INT4/INT8/"
            "NVFP4): write the merged weights back in BASE's own format, scales recomputed as its quantizer does; "
            "other "
            "tensors copied byte for byte.",
        ),
    )
    initial: str | None = option(None, INITIAL)  # INIT (folder or Hub repo)
    base_is_residual: bool = option(False, BASE_IS_RESIDUAL)
    base_revision: str | None = option(None, BASE_REVISION)
    adapter_revision: str | None = option(None, ADAPTER_REVISION)
    stream: StreamOptions | None = option(None, *STREAM)  # stream from BASE to the Hub repo `push` (no OUT)
    outtype: str | None = option(
        None,
        Flag(  # convert_hf_to_gguf.py's --outtype
            "--outtype",
            choices=tuple(OUTTYPES),
            help=f"OUT.gguf: the GGUF's type, as convert_hf_to_gguf.py's --outtype (default {DEFAULT_OUTTYPE}).",
        ),
    )
    llama_cpp: str | None = option(
        None,
        Flag(
            "--llama-cpp",
            metavar="DIR",
            help="OUT.gguf: the llama.cpp checkout whose converter writes it (default: $RSLORA_TOOLS_LLAMA_CPP_DIR).",
        ),
    )

    def __post_init__(self) -> None:
        for name, parse in (("dtype", parse_dtype), ("max_shard_size", parse_size), ("trained_on", trained_on_scheme)):
            value = getattr(self, name)
            if value is None or (name == "trained_on" and not isinstance(value, str)):
                continue  # not given (the base's dtype, its shards), or a QuantScheme already
            try:
                object.__setattr__(self, name, parse(value))
            except (ValueError, InputError) as e:
                raise OptionError(marked_message(e), options=(name,)) from None
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise OptionError(f"unknown device {self.device!r}; use cpu, cuda or auto", options=("device",))
        if self.weights is not None:
            object.__setattr__(self, "weights", parse_weights(self.weights))
        if self.initial is not None and self.base_is_residual:
            raise OptionError(
                "[[initial]] and [[base_is_residual=True]] exclude each other: the first merges into the original "
                "base, the second into the residual base",
                options=("initial", "base_is_residual"),
            )
        if self.keep_quantization and self.trained_on is not None:
            raise OptionError(
                "[[keep_quantization=True]] keeps a quantized base's format; [[trained_on]] is for an unquantized "
                "base (and the output is unquantized)",
                options=("keep_quantization", "trained_on"),
            )
        if self.keep_quantization and self.dtype is not None:
            raise OptionError(
                "[[keep_quantization=True]] writes the base's own dtypes; [[dtype]] does not go with it",
                options=("keep_quantization", "dtype"),
            )
        if self.stream is not None:
            self._check_stream()
        if self.outtype is not None and self.outtype not in OUTTYPES:
            *first, last = OUTTYPES
            raise OptionError(
                f"unknown [[outtype={self.outtype!r}]]; use {', '.join(first)} or {last}", options=("outtype",)
            )

    def _check_stream(self) -> None:
        if self.push is None and self.outtype is None:
            raise OptionError(
                "[[stream=StreamOptions()]] sends the merged model to the Hub: pass [[push=PushTarget(REPO_ID)]] (or "
                "name an "
                "OUT.gguf with [[outtype]]; without [[stream=StreamOptions()]], merge into OUT)",
                options=("stream", "push", "outtype"),
            )
        for field in ("verify", "overwrite"):
            if getattr(self, field):
                raise OptionError(
                    f"{marked(MergeOptions, field)} does not go with [[stream=StreamOptions()]] (no OUT is written); "
                    f"verify the "
                    f"pushed repo with "
                    "`[[rslora_tools.verify()]]` after downloading it",
                    options=(field, "stream"),
                )


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed merge runs (--scratch, --keep-cache, --no-resume); where it goes is `MergeOptions.push`."""

    scratch: Path | None = None  # the folder the run's working folder goes in; default: ~/.cache/rslora-tools/stream
    keep_cache: bool = False  # base shards downloaded go into the Hugging Face cache and stay
    no_resume: bool = False  # forget what an earlier run uploaded (its journal) and start over
    progress: PhaseProgress | None = None  # called as progress(phase, bytes_done_now, phase_total)
