"""What many tests share: the CLI run in-process, the fixture paths, a child process's peak memory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
BASE, ADAPTER = FIXTURES / "tiny-llama", FIXTURES / "tiny-llama-rslora"


def cli_run(*args: object, code: int | None = 0, env: dict | None = None, catch_exceptions: bool = True) -> Result:
    """`rslora-tools ARGS...` in this process; its exit code must be `code` (None: any, the caller checks)."""
    from rslora_tools.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=catch_exceptions)
    if code is not None:
        assert result.exit_code == code, result.output
    return result


def peak_rss_mb(args: list) -> float:
    """Run the CLI in a child process; its peak resident memory in MB.

    Read from /proc (VmHWM, which starts afresh at exec), not from getrusage, whose maximum
    includes the moments before exec when the child was a copy of this big test process.
    """
    code = (
        "import re, sys; from rslora_tools.cli import main; sys.argv = ['rslora-tools', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def edit_tensors(path: Path, edit) -> None:
    """Rewrite one safetensors file with its tensors changed by `edit(tensors)` (in place)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def merged(tmp_path: Path, name: str = "out") -> Path:
    """The fixture adapter merged into the fixture base, in tmp_path/name."""
    cli_run("merge", BASE, ADAPTER, tmp_path / name)
    return tmp_path / name


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its sha256 and modification time (to prove an input untouched)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
