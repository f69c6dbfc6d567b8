"""Shared test setup: offline hub, one thread per process, a private temp dir for launchers."""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path_factory, monkeypatch):
    """torchrun/accelerate leave torchelastic_* folders in TMPDIR: give them a private one."""
    monkeypatch.setenv("TMPDIR", str(tmp_path_factory.getbasetemp()))
