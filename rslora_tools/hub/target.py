"""Where a push goes (`PushTarget`: `--push-to-hub REPO_ID` and its companions, or `push`'s options), and the rule
that refuses a push into an input's own repo; kept apart from the push itself (hub/push.py) so that reading the
flags loads no Hub client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, OptionError
from ..flags import TOKEN, Flag, option
from .refs import parse_ref


@dataclass(frozen=True)
class PushTarget:
    """Where a push goes: `--push-to-hub REPO_ID` and its companions (or `push`'s options)."""

    repo_id: str
    private: bool = option(
        False, Flag("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
    )
    revision: str | None = option(
        None,
        Flag(  # a branch (created when missing); None: main
            "--revision", metavar="BRANCH", help="Commit to this branch (created if needed) instead of main."
        ),
    )
    create_pr: bool = option(
        False, Flag("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
    )
    commit_message: str | None = option(None, Flag("--commit-message", metavar="TEXT", help="The commit message."))
    token: str | None = option(None, TOKEN)

    def __post_init__(self) -> None:
        ref = parse_ref(self.repo_id)
        if ref is None or ref.revision or ref.subfolder:
            raise OptionError(
                f"{self.repo_id}: not a Hub repo id (org/name); use [[revision]] for a branch", options=("repo_id",)
            )
        object.__setattr__(self, "repo_id", ref.repo_id)

    @property
    def branch(self) -> str:
        return self.revision or "main"

    def refuse_inputs(self, sources: Any) -> None:
        """Refuse a push into the repo of an input named in `sources` (provenance records or hub.resolve.Source dicts).

        Merged weights beside an adapter's `adapter_config.json` make loaders apply the adapter twice; in the
        base's repo they replace the base. A pull request, or a branch other than main and the input's own
        revision, leaves what loaders read by default alone.
        """
        if self.create_pr:
            return
        if self.branch != "main":
            for repo, revision, role in input_repos(sources):
                if repo.lower() == self.repo_id.lower() and (revision or "main") == self.branch:
                    raise InputError(self._into_input(role, repo) + "; push to another branch or open a pull request")
            return
        for repo, _, role in input_repos(sources):
            if repo.lower() == self.repo_id.lower():
                raise InputError(
                    self._into_input(role, repo)
                    + "; push to another repo, or there with [[PushTarget(create_pr=True)]] "
                    "(a pull request) or `[[rslora_tools.push(FOLDER, REPO_ID, revision=BRANCH)]]`"
                )

    def _into_input(self, role: str, repo: str) -> str:
        return (
            f"{self.repo_id}: is the repo of the {role} ({repo}); pushing the output into it would change what "
            f"loaders read as the {role}"
        )


def input_repos(record: Any, role: str = "input") -> Iterator[tuple[str, str | None, str]]:
    """(repo id, revision, role) of every Hub input a provenance record or a sources mapping names."""
    if isinstance(record, dict):
        if isinstance(record.get("repo_id"), str):
            revision = record.get("revision")
            yield record["repo_id"], revision if isinstance(revision, str) else None, role
        for key, value in record.items():
            if key in ("base", "adapter", "adapters", "tuned", "initial", "combined"):
                yield from input_repos(value, "base" if key == "base" else key.rstrip("s"))
    elif isinstance(record, list):
        for item in record:
            yield from input_repos(item, role)
