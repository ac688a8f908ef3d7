"""OUT can never destroy an input, and is always a complete folder (old or new), whatever signal comes when."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ADAPTER, BASE, cli_run

from rslora_tools.formats import output

NORM = "model.norm.weight"  # untouched by the adapter


def digest(folder: Path) -> dict[str, str]:
    """Each file's sha256; rslora_tools.json without the command line it records (OUT's name differs by run)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(_without_command(p)).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _without_command(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name != "rslora_tools.json":
        return data
    record = json.loads(data)
    record.pop("command", None)
    return json.dumps(record, sort_keys=True).encode()


# --- OUT against the real locations of the input files -----------------------------------------------------


def test_out_holding_the_real_weights_of_a_linked_base_is_refused(tmp_path):
    """model.safetensors is a link into folder S; OUT = S --overwrite would delete the base's weights."""
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(BASE / "model.safetensors", store / "weights.safetensors")
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(BASE / "config.json", base / "config.json")
    (base / "model.safetensors").symlink_to(store / "weights.safetensors")
    before = digest(store)
    result = cli_run("merge", base, ADAPTER, store, "--overwrite", code=1)
    assert "is stored there" in result.output and "would delete it" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert digest(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "store"]


def hub_cache_layout(tmp_path: Path) -> tuple[Path, Path]:
    """models--org--base/{blobs/<sha>, snapshots/<rev>/<file> -> ../../blobs/<sha>} as huggingface_hub keeps it."""
    repo = tmp_path / "hub" / "models--org--base"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (BASE / name).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / sha)
    return snapshot, blobs


def test_out_as_the_hub_cache_blobs_of_the_base_is_refused(tmp_path):
    snapshot, blobs = hub_cache_layout(tmp_path)
    before = digest(blobs)
    result = cli_run("merge", snapshot, ADAPTER, blobs, "--overwrite", code=1)
    assert "is stored there" in result.output
    assert digest(blobs) == before
    cli_run("merge", snapshot, ADAPTER, tmp_path / "out")  # the same base merges fine elsewhere


def test_convert_refuses_an_out_holding_a_linked_adapter_file(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(ADAPTER / "adapter_config.json", adapter / "adapter_config.json")
    shutil.copy(ADAPTER / "adapter_model.safetensors", store / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(store / "adapter_model.safetensors")
    before = digest(store)
    result = cli_run("convert", adapter, store, "--to-classic", "--overwrite", code=1)
    assert "is stored there" in result.output
    assert digest(store) == before


# --- OUT given as a symbolic link ------------------------------------------------------------------------


def test_out_as_a_link_to_a_folder_writes_into_the_target(tmp_path):
    target = tmp_path / "big-disk" / "merged"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    (target / "rslora_tools.json").write_text('{"tool": "rslora-tools"}')  # an earlier output
    link = tmp_path / "out"
    link.symlink_to(target)
    cli_run("merge", BASE, ADAPTER, link, "--overwrite")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "model.safetensors").is_file() and not (target / "old.txt").exists()
    leftovers = [p.name for p in tmp_path.rglob(".*rslora-tools*")]
    assert leftovers == []
    cli_run("merge", BASE, ADAPTER, tmp_path / "plain")
    assert digest(target) == digest(tmp_path / "plain") | {}


def test_out_as_a_dangling_link_is_refused(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    result = cli_run("merge", BASE, ADAPTER, link, code=1)
    assert "does not exist" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_merge_into_a_new_nested_path_removes_the_folders_it_created(tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(ADAPTER, bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 7)
    cli_run("merge", BASE, bad, tmp_path / "a" / "b" / "out", code=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- the swap: OUT is always the complete old or the complete new folder ----------------------------------


@pytest.fixture
def old_and_new(tmp_path) -> tuple[Path, dict, dict]:
    """OUT holding an earlier output, the digest of that, and the digest a merge writes."""
    cli_run("merge", BASE, ADAPTER, tmp_path / "reference")
    new = digest(tmp_path / "reference")
    shutil.rmtree(tmp_path / "reference")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an older merge")
    (out / "notes.txt").write_text("old")
    (out / "rslora_tools.json").write_text('{"tool": "rslora-tools"}')  # an earlier output: --overwrite replaces it
    return out, digest(out), new


def assert_old_or_new(out: Path, old: dict, new: dict, message: str, code: int) -> str:
    """OUT is one of the two complete folders, the message says which, and nothing hidden is left."""
    now = digest(out)
    assert now in (old, new), sorted(now)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    if now == new:
        assert code == 0 or "it holds the new output" in message, message
        return "new"
    assert code != 0 and "nothing was written" in message, message
    return "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("when", ["before", "between", "after"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_each_step_of_the_swap(old_and_new, monkeypatch, exchange, when, sig):
    """The signal is sent to this process at the step named; the swap finishes, and the message is true."""
    out, old, new = old_and_new
    real_exchange, real_rename = output._exchange, Path.rename
    renames = {"n": 0}

    def kill() -> None:
        os.kill(os.getpid(), sig)

    def fake_exchange(a, b):
        if not exchange:
            return False
        if when == "before":
            kill()
        done = real_exchange(a, b)
        if when in ("between", "after"):
            kill()
        return done

    def rename(self, target):
        renames["n"] += 1
        if not exchange and (when, renames["n"]) in (("before", 1), ("between", 2)):
            kill()
        result = real_rename(self, target)
        if not exchange and when == "after" and renames["n"] == 2:
            kill()
        return result

    monkeypatch.setattr(output, "_exchange", fake_exchange)
    monkeypatch.setattr(Path, "rename", rename)
    result = cli_run("merge", BASE, ADAPTER, out, "--overwrite", code=None)
    assert assert_old_or_new(out, old, new, result.output, result.exit_code) == "new"
    assert result.exit_code == 130 and "it holds the new output" in result.output


@pytest.fixture
def python_sigint():
    """SIGINT with Python's own handler (KeyboardInterrupt), as a shell gives the command: a process started in the
    background by a non-interactive shell (`cmd &`, as CI scripts do) inherits SIGINT ignored, and the signal sent
    here would then be lost. The CLI's `main` installs its own handler; the tests call the commands in-process."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_signals_from_another_thread_while_writing_and_while_swapping(old_and_new, monkeypatch, python_sigint):
    """Another thread signals while the output is written (OUT keeps the old folder) or right after the swap
    (OUT holds the new one): each moment is reached by an event, not a timer, so a busy machine cannot move it."""
    out, old, new = old_and_new
    real_exchange, real_make_parents = output._exchange, output._make_parents
    moment = {"now": ""}
    reached, fired = threading.Event(), threading.Event()

    def signaller() -> None:
        reached.wait(30)
        os.kill(os.getpid(), signal.SIGINT)
        fired.set()

    def at(name: str) -> None:
        if moment["now"] == name:
            reached.set()
            fired.wait(30)  # the signal arrives here, in this thread
            time.sleep(0.01)

    def writing(folder):
        created = real_make_parents(folder)
        at("writing")
        return created

    def swapping(a, b):
        done = real_exchange(a, b)
        at("swap")
        return done

    monkeypatch.setattr(output, "_make_parents", writing)
    monkeypatch.setattr(output, "_exchange", swapping)
    for name, expected in [("writing", "old"), ("swap", "new")] * 3:
        moment["now"] = name
        reached.clear()
        fired.clear()
        thread = threading.Thread(target=signaller)
        thread.start()
        result = cli_run("merge", BASE, ADAPTER, out, "--overwrite", code=None)
        thread.join(30)
        assert fired.is_set()
        assert assert_old_or_new(out, old, new, result.output, result.exit_code) == expected
        if digest(out) == new:  # start the next round from the old folder again
            shutil.rmtree(out)
            out.mkdir()
            (out / "model.safetensors").write_bytes(b"an older merge")
            (out / "notes.txt").write_text("old")
            (out / "rslora_tools.json").write_text('{"tool": "rslora-tools"}')


_SLOW_SWAP = """
import sys, time
from rslora_tools.formats import output
real = output._exchange
def slow(a, b):
    time.sleep(0.1)
    done = real(a, b)
    time.sleep(0.1)
    return done
output._exchange = slow
from rslora_tools.cli import main
sys.argv = ["rslora-tools", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_signals_from_another_process_at_random_times(old_and_new):
    """A separate process is signalled at random moments of a merge whose swap is slowed down; OUT stays whole."""
    out, old, new = old_and_new
    rng = random.Random(1)
    outcomes = []
    for i in range(16):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_SWAP, "merge", str(BASE), str(ADAPTER), str(out), "--overwrite", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and not any(".rslora-tools-" in p.name for p in out.parent.iterdir()):
            assert time.monotonic() < deadline
            time.sleep(0.002)  # the merge has started writing (its signal handlers are in place)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        outcomes.append(assert_old_or_new(out, old, new, err, proc.returncode))
        if digest(out) == new:
            shutil.rmtree(out)
            out.mkdir()
            (out / "model.safetensors").write_bytes(b"an older merge")
            (out / "notes.txt").write_text("old")
            (out / "rslora_tools.json").write_text('{"tool": "rslora-tools"}')
    assert len(outcomes) == 16


def test_an_interrupt_after_the_output_is_in_place_says_so(tmp_path, monkeypatch):
    """Ctrl-C while the report is printed: OUT is complete, and the message must not say "nothing was written"."""
    from rslora_tools.cli import merge as cli_module

    def interrupted(report):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_print_merge", interrupted)
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out", code=130)
    assert "it holds the new output" in result.output and "nothing was written" not in result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()
    monkeypatch.undo()
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out2", "--dry-run")  # a later command starts afresh
    assert result.exit_code == 0


@pytest.fixture(scope="module")
def torch_merge(tmp_path_factory) -> tuple[Path, Path]:
    """A base and a DoRA adapter whose merge runs through torch on the worker threads (about a second)."""
    import torch
    from peft import LoraConfig
    from peft_oracle import make_adapter, make_llama

    root = tmp_path_factory.mktemp("torch-merge")
    base = make_llama(
        root / "base", torch.float32, hidden_size=512, intermediate_size=1024, num_hidden_layers=8, vocab_size=4096
    )
    adapter = make_adapter(
        base, root / "adapter", LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    )
    return base, adapter


@pytest.mark.slow
def test_two_sigterms_in_quick_succession_end_in_one_clean_interrupted_exit(torch_merge, tmp_path):
    """The second SIGTERM cuts short the wait for the workers; the process must still exit 1 with its one message,
    never abort under a thread torch runs ("terminate called without an active exception", exit -6). Before the
    fix about one run in three aborted when signalled this way."""
    base, adapter = torch_merge
    rng = random.Random(2)
    outcomes: dict[int, list[str]] = {}
    for _ in range(20):
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "rslora_tools", "merge", str(base), str(adapter), str(out), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and not any(".rslora-tools-" in p.name for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        outcomes.setdefault(proc.returncode, []).append(err.strip())
        if out.exists():
            shutil.rmtree(out)
    assert set(outcomes) <= {0, 130}, {code: errs[:1] for code, errs in outcomes.items()}
    assert all(err == "Error: interrupted; nothing was written" for err in outcomes.get(130, [])), outcomes[130]
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_run_are_removed_and_mentioned(tmp_path):
    leftover = tmp_path / ".out.rslora-tools-tmp-999999999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a shard")
    result = cli_run("merge", BASE, ADAPTER, tmp_path / "out")
    assert "removed .out.rslora-tools-tmp-999999999" in result.output
    assert not leftover.exists() and (tmp_path / "out" / "model.safetensors").is_file()
    mine = tmp_path / f".out2.rslora-tools-tmp-{os.getppid()}"  # a live process's: left alone
    mine.mkdir()
    cli_run("merge", BASE, ADAPTER, tmp_path / "out2")
    assert mine.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "module",
    [
        "rslora_tools.cli.app",
        "click",
        "rslora_tools.cli.merge",
        "rslora_tools.cli.verify",
        "rslora_tools.commands.inspect",
    ],
)
def test_ctrl_c_in_the_first_fraction_of_a_second_is_one_line_and_exit_130(module):
    """A Ctrl-C while the console script loads the commands (before the command's own handler is installed)
    printed a KeyboardInterrupt traceback. The signal comes as `module` is imported. (One while the interpreter
    itself starts, before any of the package's code runs, is Python's own to report.)"""
    import subprocess
    import sys

    code = (
        "import importlib.abc, os, signal, sys\n"
        # SIGINT as a terminal's shell starts the command (a background job of a non-interactive shell, as a CI
        # script may run the tests, inherits it ignored)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class Fire(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {module!r}:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Fire())\n"
        f"sys.argv = ['rslora-tools', 'inspect', {str(ADAPTER)!r}]\n"
        "from rslora_tools.cli import main\nmain()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 130 and done.stderr.strip().splitlines() == ["Error: interrupted; nothing was written"]
