"""The options object of each command but merge (whose writers read its options: execute/options.py): what it can
be asked to do, each field declared once with its flags (rslora_tools/flags.py), checked when made (OptionError).

Kept apart from the commands' code so that the CLI, which generates its flags from these fields
when it starts, loads nothing heavy (no torch, no tensor code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..adapter.runtimes import runtime
from ..errors import InputError, OptionError, RsloraError, marked_message
from ..execute.options import (
    ADAPTER_REVISION,
    ALLOW_PICKLE,
    BASE_IS_RESIDUAL,
    BASE_REVISION,
    INITIAL,
    REVISION,
    TRAINED_ON,
    OutputOptions,
)
from ..flags import TOKEN, Flag, option
from ..formats.quant import trained_on_scheme
from ..plan.combine import DENSITY_METHODS, METHODS
from ..plan.convert import CONVENTIONS

if TYPE_CHECKING:
    from ..formats.quant import QuantScheme


@dataclass(frozen=True)
class ConvertOptions(OutputOptions):
    """What a conversion does; checked when made (OptionError). One of `to`, `target` or `initial` is needed."""

    to: str | None = (
        option(  # "rslora" or "classic": rewrite the alphas (or, with `bake`, fold the change into lora_B)
            None,
            Flag(
                "--to-rslora",
                dest="to_rslora",
                is_flag=True,
                api='to="rslora"',
                help="Rewrite to rsLoRA (alpha/sqrt(r)), same scales.",
            ),
            Flag(
                "--to-classic",
                dest="to_classic",
                is_flag=True,
                api='to="classic"',
                help="Rewrite to classic LoRA (alpha/r), same scales.",
            ),
        )
    )
    target: str | None = option(
        None,
        Flag(  # a runtime ("vllm", "vllm@0.6.3", ...) or "unit": what that runtime needs
            "--target",
            type="runtime_or_unit",
            metavar="RUNTIME[@VERSION]",
            help="Produce an adapter that this runtime "
            "serves with PEFT's exact per-module scales: peft, vllm, tgi, lorax, sglang, llama.cpp, mlx (mlx-lm's "
            "format) "
            "or unit; a release as vllm@0.6.3 (default: the current one).",
        ),
    )
    bake: bool = option(
        False,
        Flag(  # with `to`: fold the scale change into lora_B instead of rewriting alphas
            "--bake", is_flag=True, help="With --to-*: fold the scale change into lora_B instead of rewriting alphas."
        ),
    )
    base: str | None = option(
        None,
        Flag(  # the base model (folder or Hub repo): a .gguf OUT needs its tensor names
            "--base",
            help="Base model folder or Hub repo; needed for --target llama.cpp with a .gguf OUT, and for "
            "--expert-layout / --key-layout.",
        ),
    )
    initial: str | None = option(
        None,
        Flag(  # INIT of a PiSSA/OLoRA/CorDA/LoRA-GA adapter: the result is relative to BASE
            "--initial",
            metavar="INIT",
            help="PiSSA/OLoRA/CorDA/LoRA-GA: the adapter saved right after initialisation "
            "(folder or Hub repo); the result is a plain LoRA relative to the original base (rank 2r). Alone, or with "
            "--to-*/--target.",
        ),
    )
    revision: str | None = option(None, REVISION)  # of ADAPTER, when it is a Hub repo
    allow_pickle: bool = option(False, ALLOW_PICKLE)
    expert_layout: str | None = option(
        None,
        Flag(  # rewrite MoE expert LoRA into that layout (needs base)
            "--expert-layout",
            choices=("per-expert", "fused"),
            help="Rewrite MoE expert LoRA: per-expert (one LoRA per "
            "expert Linear, as transformers 4 and some runtimes apply it) or fused (target_parameters on "
            "gate_up_proj/down_proj, as transformers 5 holds experts).",
        ),
    )
    key_layout: str | None = option(
        None,
        Flag(  # rename module paths to that naming of the base
            "--key-layout",
            choices=("base", "transformers-5"),
            help="Rename module paths to BASE's checkpoint naming (base: "
            "e.g. model.language_model.layers -> model.layers, for transformers 4 and runtimes) or to transformers "
            "5's "
            "in-memory naming of BASE (transformers-5: what PEFT needs on transformers 5).",
        ),
    )

    def __post_init__(self) -> None:
        relayout = self.expert_layout is not None or self.key_layout is not None
        if relayout:
            self._check_relayout()
            return
        if (self.to is not None and self.target is not None) or (
            self.to is None and self.target is None and self.initial is None
        ):
            raise OptionError(
                'choose one of [[to="rslora"]], [[to="classic"]] or [[target=RUNTIME]] (or [[initial=INIT]] alone), '
                "or [[expert_layout]] / [[key_layout]]",
                options=("to", "target", "initial", "expert_layout", "key_layout"),
            )
        if self.to is not None and self.to not in CONVENTIONS:
            raise OptionError(f"unknown convention {self.to!r}; use rslora or classic", options=("to",))
        if self.bake and self.to is None:
            raise OptionError(
                '[[bake=True]] goes with [[to="rslora"]] or [[to="classic"]] ([[target]] bakes when it must)',
                options=("bake", "to"),
            )
        if self.target is not None and self.target != "unit":
            try:
                runtime(self.target)  # an unknown runtime or version is an error before anything is read
            except InputError as e:
                raise OptionError(marked_message(e), options=("target",)) from None

    def _check_relayout(self) -> None:
        if self.expert_layout not in (None, "per-expert", "fused"):
            raise OptionError(
                f"unknown expert layout {self.expert_layout!r}; use per-expert or fused", options=("expert_layout",)
            )
        if self.key_layout not in (None, "base", "transformers-5"):
            raise OptionError(
                f"unknown key layout {self.key_layout!r}; use base or transformers-5", options=("key_layout",)
            )
        if self.to is not None or self.target is not None or self.initial is not None or self.bake:
            raise OptionError(
                "[[expert_layout]] and [[key_layout]] rewrite the layout only; convert the convention or "
                "for a runtime in a second convert",
                options=("expert_layout", "key_layout"),
            )
        if self.base is None:
            raise OptionError(
                "[[expert_layout]] and [[key_layout]] need [[base=BASE]] (its config.json names the "
                "architecture and its checkpoint the tensors)",
                options=("expert_layout", "key_layout", "base"),
            )


@dataclass(frozen=True)
class CombineOptions(OutputOptions):
    """How adapters are combined; checked when made (OptionError)."""

    weights: tuple[float, ...] | None = option(
        None,
        Flag(  # the delta is sum(w_i * delta_i)
            "--weights", metavar="W1,W2,...", help="One weight per adapter (default 1 each)."
        ),
    )
    method: str = option(
        "cat",
        Flag(  # cat, svd, or PEFT's task arithmetic: linear, ties, dare_*, magnitude_prune
            "--method",
            choices=tuple(METHODS),
            show_default=True,
            help="cat: the exact weighted sum (rank = sum of "
            "ranks); svd: its best rank-R approximation; the others are PEFT's task-arithmetic methods on the factors "
            "(equal ranks per module).",
        ),
    )
    rank: int | None = option(
        None, Flag("--rank", type=int, metavar="R", help="svd: the output rank (default: the largest input rank).")
    )
    density: float | None = option(
        None,
        Flag("--density", type=float, metavar="D", help="ties, dare_*, magnitude_prune: the fraction of values kept."),
    )
    seed: int | None = option(
        None,
        Flag(  # a generator per module, seeded from this and the module's name
            "--seed", type=int, metavar="N", help="dare_*: the random masks' seed (default 0); same seed, same result."
        ),
    )
    rslora: bool = option(
        False,
        Flag(
            "--rslora",
            is_flag=True,
            help="Write the rsLoRA convention (alpha = sqrt(rank)) instead of classic (alpha = "
            "rank); every module's scale is 1 either way.",
        ),
    )
    target: str | None = option(
        None,
        Flag(
            "--target",
            type="runtime_or_unit",
            metavar="RUNTIME[@VERSION]",
            help="Then convert the combined adapter for this runtime (as convert --target), in the same run.",
        ),
    )
    allow_pickle: bool = option(False, ALLOW_PICKLE)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}", options=("method",))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not all(math.isfinite(w) for w in self.weights):
                raise OptionError("[[weights]] must be finite numbers", options=("weights",))
        if self.rank is not None and (self.method != "svd" or self.rank < 1):
            raise OptionError(
                "[[rank]] goes with [[method]] svd and is a positive integer", options=("rank", "method")
            )
        density, method = self.density, self.method
        if method in DENSITY_METHODS:
            low_ok = density is not None and (density > 0.0 if method.startswith("dare") else density >= 0.0)
            if density is None or not low_ok or density > 1.0:
                raise OptionError(
                    f"[[method={method}]] needs [[density=D]], the fraction of values kept (0 to 1; above 0 "
                    "for dare, which divides by it)",
                    options=("method", "density"),
                )
        elif density is not None:
            raise OptionError(f"[[density]] goes with {', '.join(DENSITY_METHODS)}", options=("density", "method"))
        if self.target is not None and self.target != "unit":
            try:
                runtime(self.target)  # an unknown runtime is refused before anything is computed
            except InputError as e:
                raise OptionError(marked_message(e), options=("target",)) from None


@dataclass(frozen=True)
class ExtractOptions(OutputOptions):
    """How a fine-tune is extracted; checked when made (OptionError). One of rank, energy or max_error (default:
    rank 16)."""

    rank: int | None = option(
        None, Flag("--rank", type=int, metavar="R", help="A fixed rank for every module (default 16).")
    )
    energy: float | None = option(
        None,
        Flag(  # of the delta's squared norm
            "--energy",
            type=float,
            metavar="F",
            help="Per module, the smallest rank keeping this fraction of the delta's "
            "squared Frobenius norm (e.g. 0.9).",
        ),
    )
    max_error: float | None = option(
        None,
        Flag("--max-error", type=float, metavar="E", help="Per module, the smallest rank with relative error <= E."),
    )
    rslora: bool = option(
        True,
        Flag(
            "--rslora",
            secondary="--classic",
            show_default=True,
            help="Write use_rslora (alpha = sqrt(rank)) or classic LoRA (alpha = rank); scale 1 either way.",
        ),
    )
    alpha: float | None = option(
        None,
        Flag(  # each module's scale is folded into its factors
            "--alpha",
            type=float,
            metavar="A",
            help="Write lora_alpha = A instead; each module's scale is folded into its factors.",
        ),
    )
    target_modules: tuple[str, ...] | None = option(
        None,
        Flag(  # only these modules are factorised
            "--target-modules",
            metavar="NAMES",
            help="Comma-separated module names (or name suffixes) to factorise; "
            "other changed tensors still go to modules_to_save.",
        ),
    )
    device: str = option(
        "cpu", Flag("--device", choices=("cpu", "cuda", "auto"), show_default=True, help="Where the SVDs run.")
    )
    exact: bool = option(
        False,
        Flag(  # else randomized above 512 columns; the residual is measured either way
            "--exact",
            is_flag=True,
            help="Always the full SVD (default: randomized above 512 columns, residual measured either way).",
        ),
    )

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.rank, self.energy, self.max_error)) > 1:
            raise OptionError(
                "choose one of [[rank]], [[energy]] or [[max_error]]", options=("rank", "energy", "max_error")
            )
        if self.rank is not None and self.rank < 1:
            raise OptionError("[[rank]] must be a positive integer", options=("rank",))
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise OptionError(
                "[[energy]] is a fraction of the delta's squared norm, above 0 and at most 1", options=("energy",)
            )
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise OptionError("[[max_error]] is a relative error, at least 0 and below 1", options=("max_error",))
        if self.alpha is not None and not (self.alpha > 0 and self.alpha < float("inf")):
            raise OptionError("[[alpha]] must be a positive number", options=("alpha",))
        if self.device not in ("cpu", "auto") and not self.device.startswith("cuda"):
            raise OptionError(f"unknown device {self.device!r}; use cpu, cuda or auto", options=("device",))
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank is None and self.energy is None and self.max_error is None:
            object.__setattr__(self, "rank", 16)


@dataclass(frozen=True)
class VerifyOptions:
    """How the merge being checked was made, and how to check it; checked when made (OptionError).

    Where the merge's own options are not given, MERGED's rslora_tools.json says them (weights,
    --trained-on, --base-is-residual), and the report's `recipe` says so.
    """

    weights: tuple[float, ...] | None = option(
        None, Flag("--weights", metavar="W1,W2,...", help="Several adapters: the weights the merge was given.")
    )
    sample: int | None = option(
        None,
        Flag(  # spread over the model (changed ones first)
            "--sample",
            type=int,
            metavar="N",
            help="Check only N tensors spread over the model (changed ones first), for a quick check.",
        ),
    )
    allow_pickle: bool = option(False, ALLOW_PICKLE)
    trained_on: QuantScheme | None = option(None, *TRAINED_ON)  # the merge was made with --trained-on
    initial: str | None = option(None, INITIAL)  # INIT, as given to the merge (folder or Hub repo)
    base_is_residual: bool = option(False, BASE_IS_RESIDUAL)
    base_revision: str | None = option(None, BASE_REVISION)
    adapter_revision: str | None = option(None, ADAPTER_REVISION)
    token: str | None = option(None, TOKEN)

    def __post_init__(self) -> None:
        if self.sample is not None and self.sample < 1:
            raise OptionError("[[sample]] must be a positive number of tensors", options=("sample",))
        if isinstance(self.trained_on, str):
            try:
                object.__setattr__(self, "trained_on", trained_on_scheme(self.trained_on))
            except InputError as e:
                raise OptionError(marked_message(e), options=("trained_on",)) from None
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.initial is not None and self.base_is_residual:
            raise OptionError(
                "[[initial]] and [[base_is_residual=True]] exclude each other: the first merges into the original "
                "base, the second into the residual base",
                options=("initial", "base_is_residual"),
            )


@dataclass(frozen=True)
class InspectOptions:
    """What `inspect` also checks: a base, the runtimes you serve with; how it reads the adapter."""

    base: str | None = option(
        None,
        Flag(  # folder or Hub repo
            "--base",
            help="Also check the adapter against this base model (folder or Hub repo): list the base tensors "
            "each module changes, and fail when it changes none or records another base.",
        ),
    )
    runtimes: tuple[str, ...] = option(
        (),
        Flag(  # ("vllm", "vllm@0.6.3"): their problems are warnings
            "--runtime",
            dest="runtimes",
            multiple=True,
            type="runtime",
            metavar="RUNTIME[@VERSION]",
            help="Runtime(s) you "
            "will serve with, e.g. vllm or vllm@0.6.3: their problems become warnings, and their other releases are "
            "shown "
            "where they differ (repeatable).",
        ),
    )
    revision: str | None = option(None, REVISION)  # of ADAPTER, when it is a Hub repo
    token: str | None = option(None, TOKEN)
    allow_pickle: bool = option(False, ALLOW_PICKLE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtimes", tuple(self.runtimes))
        for spec in self.runtimes:
            try:
                runtime(spec)
            except RsloraError as e:
                raise OptionError(marked_message(e), options=("runtimes",)) from None
