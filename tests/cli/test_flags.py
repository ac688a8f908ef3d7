"""Every command-line flag is declared once, on the options field it sets (rslora_tools/flags.py), and the CLI's
click options and its flags-to-options mapping are generated from those declarations."""

from __future__ import annotations

from dataclasses import dataclass

import click
from click.testing import CliRunner

from rslora_tools.cli import cli
from rslora_tools.cli import options as o
from rslora_tools.cli.words import as_flags
from rslora_tools.commands.options import (
    CombineOptions,
    ConvertOptions,
    ExtractOptions,
    InspectOptions,
    VerifyOptions,
)
from rslora_tools.execute.options import MergeOptions
from rslora_tools.flags import DRY_RUN, Flag, flags_of, option
from rslora_tools.hub.target import PushTarget

# How a report is shown, or which exit code a warning gives: the CLI's own, not what a command does.
CLI_OWN = {"--json", "--quiet", "--strict", "--help"}
DECLARED: dict[str, tuple[list[Flag], str]] = {
    "merge": ([f for _, _, fs in flags_of(MergeOptions) for f in fs], "Merge"),
    "convert": ([f for _, _, fs in flags_of(ConvertOptions) for f in fs], "Convert"),
    "combine": ([f for _, _, fs in flags_of(CombineOptions) for f in fs], "Combine"),
    "extract": ([f for name, _, fs in flags_of(ExtractOptions) if name != "allow_nonfinite" for f in fs], "Extract"),
    "verify": ([f for _, _, fs in flags_of(VerifyOptions) for f in fs], ""),
    "inspect": ([f for _, _, fs in flags_of(InspectOptions) for f in fs], ""),
    "push": ([*(f for _, _, fs in flags_of(PushTarget) for f in fs), DRY_RUN], ""),
}


def test_every_flag_of_every_command_is_generated_from_a_field():
    assert set(DECLARED) == set(cli.commands)
    for name, command in cli.commands.items():
        declared, verb = DECLARED[name]
        by_name = {f.name: f for f in declared}
        offered = {}
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            long = next(opt for opt in param.opts if opt.startswith("--"))
            if long in CLI_OWN:
                continue
            assert long in by_name, f"{name} {long}: a flag declared in the CLI, not on an options field"
            flag = by_name[long]
            assert param.help == flag.help.replace("{verb}", verb), f"{name} {long}: not the field's help"
            assert param.secondary_opts == ([flag.secondary] if flag.secondary else []), f"{name} {long}"
            offered[long] = param
        assert set(offered) == set(by_name), f"{name}: declared but not offered: {set(by_name) - set(offered)}"


def test_a_new_merge_option_is_one_declaration_plus_its_use():
    @dataclass(frozen=True)
    class WithLimit(MergeOptions):
        limit: int | None = option(None, Flag("--limit", type=int, metavar="N", help="At most N tensors."))

    made: list[WithLimit] = []

    @click.command()
    @o.flags_from(WithLimit, verb="Merge")
    def run(**flags: object) -> None:
        made.append(o.options_from(WithLimit, flags))

    result = CliRunner().invoke(run, ["--limit", "3", "--dtype", "bf16", "--push-to-hub", "me/x", "--private"])
    assert result.exit_code == 0, result.output
    assert made[0].limit == 3 and made[0].dtype == "BF16"
    assert made[0].push is not None and made[0].push.repo_id == "me/x" and made[0].push.private
    assert "--limit N" in CliRunner().invoke(run, ["--help"]).output


def test_a_flag_given_without_the_one_it_qualifies_is_a_usage_error():
    for args, said in (
        (["--scratch", "s"], "--scratch, --keep-cache and --no-resume go with --stream"),
        (["--private"], "--private goes with --push-to-hub REPO_ID"),
        (["--double-quant"], "describe --trained-on; pass it too"),
    ):
        result = CliRunner().invoke(cli, ["merge", "b", "a", "out", *args])
        assert result.exit_code == 2 and said in result.output, result.output


OPTION_MODULES = ["execute/options.py", "commands/options.py", "execute/outputs.py", "cli/options.py", "hub/target.py"]


def test_every_option_error_of_the_options_names_the_fields_it_is_about():
    """An OptionError says which fields it is about (`error.fields["options"]`, or `argument` for OUT), so that a
    caller (a UI, the CLI) can point at them; each is a field of an options object."""
    import ast
    from pathlib import Path

    import rslora_tools

    package = Path(rslora_tools.__file__).parent
    known = {
        name
        for cls in (
            MergeOptions,
            PushTarget,
            ConvertOptions,
            CombineOptions,
            ExtractOptions,
            VerifyOptions,
            InspectOptions,
        )
        for name in cls.__dataclass_fields__
    }
    missing, unknown = [], []
    for module in OPTION_MODULES:
        for node in ast.walk(ast.parse((package / module).read_text())):
            if not (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", None) == "OptionError"
            ):
                continue
            keywords = {k.arg: k.value for k in node.exc.keywords}
            if "options" not in keywords and "argument" not in keywords:
                missing.append(f"{module}:{node.lineno}")
            elif "options" in keywords and isinstance(keywords["options"], ast.Tuple):
                unknown += [
                    f"{module}:{node.lineno}: {e.value}"
                    for e in keywords["options"].elts
                    if isinstance(e, ast.Constant) and e.value not in known
                ]
    assert missing == [] and unknown == []


def test_an_option_error_carries_its_fields_and_says_them_in_each_callers_words():
    import pytest

    from rslora_tools.errors import OptionError

    with pytest.raises(OptionError) as caught:
        MergeOptions(initial="init/", base_is_residual=True)
    assert caught.value.fields["options"] == ("initial", "base_is_residual")
    assert str(caught.value).startswith("initial and base_is_residual=True exclude each other")
    assert as_flags(caught.value.message).startswith("--initial and --base-is-residual exclude each other")
    with pytest.raises(OptionError) as caught:
        MergeOptions(dtype="fp8")
    assert caught.value.fields["options"] == ("dtype",)
    with pytest.raises(OptionError) as caught:
        ExtractOptions(rank=4, energy=0.9)
    assert caught.value.fields["options"] == ("rank", "energy", "max_error")
