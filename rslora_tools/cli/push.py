"""`rslora-tools push`: a folder to a Hub repo, through the one publish path (hub.push)."""

from __future__ import annotations

from pathlib import Path

import click

from ..flags import DRY_RUN
from ..formats.sizes import human_size
from ..hub.target import PushTarget
from . import options as o
from .app import cli
from .render import echo_json, echo_push


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("repo_id")
@o.flags_from(PushTarget)
@o.flag_option(DRY_RUN)
@o.json_option
@o.quiet_option()
def push(
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    commit_message: str | None,
    create_pr: bool,
    dry_run: bool,
    token: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Upload FOLDER (a merged model or converted adapter) to the Hub repo REPO_ID, in one commit.

    Creates the repo if needed and commits FOLDER's files (re-run the same command to resume an
    interrupted upload: blobs the Hub has are not sent again). The same commit deletes the repo's
    stale weight and adapter files (an older model.safetensors, adapter_config.json, *.gguf, ...),
    and the output names them. Then it checks that every local file is in the repo. When FOLDER
    has no README.md, a model card is generated from what rslora-tools recorded (base, adapters
    and their revisions, the command, the verification) and uploaded with it; FOLDER itself is not
    changed. --dry-run lists the files and prints that card without going online. A push into the
    repo of FOLDER's base or adapter is refused unless it goes to another branch or a pull request.

    \b
    Examples:
      rslora-tools push merged/ me/my-merged-model --private
      rslora-tools push merged/ me/my-merged-model --dry-run
      rslora-tools push for-vllm/ me/my-adapter-vllm --create-pr
    """
    _check_order(folder, repo_id)
    if dry_run:
        from ..hub.push import preview_push

        preview = preview_push(folder, repo_id, revision=revision, create_pr=create_pr)
        if as_json:
            echo_json(preview)
            return
        if quiet:
            return
        click.echo(
            f"Would push {len(preview.files)} files to {repo_id} in one commit "
            f"({human_size(sum(preview.files.values()))}; stale weight files in the repo would be deleted):"
        )
        for name, size in preview.files.items():
            click.echo(
                f"  {name}  {human_size(size)}"
                + ("  (generated model card)" if name == "README.md" and preview.card is not None else "")
            )
        if preview.card is not None:
            click.echo("\nThe model card (README.md):\n")
            click.echo(preview.card)
        return
    from ..hub.push import push as run_push

    report = run_push(
        folder,
        repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        token=token,
    )
    if as_json:
        echo_json(report)
    elif not quiet:
        echo_push(report.to_dict())


def _check_order(folder: str, repo_id: str) -> None:
    """FOLDER must be a folder; `push me/x merged/` (hf upload's REPO_ID PATH order) is named as such."""
    if Path(folder).is_dir():
        return
    if Path(repo_id).is_dir():
        raise click.UsageError(
            f"{folder!r} is not a folder but {repo_id!r} is: the order is FOLDER REPO_ID "
            f"(hf upload takes REPO_ID PATH); run: rslora-tools push {repo_id} {folder}"
        )
    raise click.UsageError(f"FOLDER {folder!r} does not exist")
