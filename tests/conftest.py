from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

from peft_oracle import make_gpt2, make_llama  # noqa: E402

# The oracle is PEFT on one torch thread: rslora-tools computes each tensor on one intra-op thread, so that its bytes
# are the same on every machine, and PEFT's own merge of a small fp32 convolution differs by one ulp between one
# and two threads (docs/peft-rules.md, "Rounding").
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_unexpected_errors(monkeypatch):
    """Every input the tests feed the CLI ends in a known message: "unexpected ..." (an unmapped exception) fails."""
    from click.testing import CliRunner

    real = CliRunner.invoke

    def invoke(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        assert "Error: unexpected" not in result.output, result.output
        return result

    monkeypatch.setattr(CliRunner, "invoke", invoke)


def pytest_collection_modifyitems(config, items):
    """Markers by subject: every test that serves a fake Hub is `hub`; the folders gpu/ and the llama.cpp tests
    carry their own (`gpu`, `llama_cpp`); `slow` is set by hand on the tests that take seconds each."""
    for item in items:
        if "fake_hub" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.hub)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A loopback server speaking the Hub's HTTP API, with the real huggingface_hub client pointed at it (its own
    cache, a token, online, no Xet); the test uploads what it needs with `fake_hub.upload_local_folder`."""
    from fake_hub import FakeHub, use_fake_hub

    server = FakeHub().start()
    use_fake_hub(monkeypatch, server, tmp_path / "hf-home")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path):
    """Make a real file system of a given size (tmpfs, e.g. "24k"): needs root; skipped where mounting is not
    allowed."""
    import subprocess

    mounts = []

    def make(size: str) -> Path:
        mount = tmp_path / f"disk-{len(mounts)}"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(mount)
        return mount

    yield make
    for mount in mounts:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.fixture(scope="session")
def llama_fp32(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-fp32"), torch.float32)


@pytest.fixture(scope="session")
def llama_bf16(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-bf16"), torch.bfloat16)


@pytest.fixture(scope="session")
def llama_fp16(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-fp16"), torch.float16)


@pytest.fixture(scope="session")
def llama_sharded(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-sharded"), torch.bfloat16, max_shard_size="20KB")


@pytest.fixture(scope="session")
def llama_tied(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama-tied"), torch.bfloat16, tie=True)


@pytest.fixture(scope="session")
def gpt2_bf16(tmp_path_factory) -> Path:
    return make_gpt2(tmp_path_factory.mktemp("gpt2-bf16"), torch.bfloat16)


@pytest.fixture
def bases(llama_fp32, llama_bf16, llama_fp16) -> dict[str, Path]:
    return {"fp32": llama_fp32, "bf16": llama_bf16, "fp16": llama_fp16}
