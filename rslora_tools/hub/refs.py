"""How Hub inputs are written: `org/name[@rev]` and `hf://org/name[@rev][/subfolder]`."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError


@dataclass
class HubRef:
    repo_id: str
    revision: str | None
    subfolder: str = ""


def parse_ref(spec: str, revision: str | None = None) -> HubRef | None:
    """`hf://org/name[@rev][/sub]` or `org/name[@rev]` as a HubRef; None when it is neither."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HFValidationError

    if spec.startswith("hf://"):
        try:
            uri = parse_hf_uri(spec)
        except (ValueError, HFValidationError) as e:
            raise InputError(f"{spec}: not a valid hf:// URI ({e})") from e
        if uri.type != "model":
            raise InputError(f"{spec}: only model repos can be used (this is a {uri.type} repo)")
        return HubRef(uri.id, _one_revision(spec, uri.revision, revision), (uri.path_in_repo or "").strip("/"))
    repo_id, _, at = spec.partition("@")
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if repo_id.count("/") != 1:
        return None
    return HubRef(repo_id, _one_revision(spec, at or None, revision))


def _one_revision(spec: str, in_spec: str | None, option: str | None) -> str | None:
    if in_spec and option and in_spec != option:
        raise InputError(f"{spec}: the revision is given twice ({in_spec!r} and [[revision={option!r}]])")
    return in_spec or option
