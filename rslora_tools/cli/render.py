"""What every command prints the same way: JSON reports, warnings, the push line, a report's tail."""

from __future__ import annotations

import json
from typing import Any

import click

from ..reporting import Report, counted


def echo_json(report: Report | dict[str, Any]) -> None:
    """The report as one JSON document on stdout (what --json prints)."""
    click.echo(json.dumps(report.to_dict() if isinstance(report, Report) else report, indent=2))


def echo_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"Warning: {warning}", err=True)


def echo_push(push: dict[str, Any] | None) -> None:
    """The push line (stderr, as huggingface_hub's own), and the stale files the commit deleted."""
    if push is None:
        return
    where = push.get("pr_url") or push.get("commit_url")
    card = ", model card written" if push.get("card_written") else ""
    click.echo(f"Pushed {counted(push['files'], 'file')} to {push['repo_id']} in one commit{card}: {where}", err=True)
    if push.get("removed"):
        click.echo(
            f"  removed from the repo in the same commit (stale weight or adapter files): "
            f"{', '.join(push['removed'])}",
            err=True,
        )


def finish(report: Any, printer: Any, as_json: bool, quiet: bool) -> None:
    """A command's output: the JSON document, or the printer's text and the push line (nothing with --quiet)."""
    if as_json:
        echo_json(report)
        return
    if not quiet:
        printer(report)
        echo_push(report.push)
