"""Tokenizer: GPT-2 ids, and every way of finding the ranks file, offline, in real subprocesses.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_tokenizer.py
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from monosem.tokenizer import EOT, SHA256, cache_path, get_tokenizer, reachable

BLOCKED = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture(scope="session")
def ranks_file(tmp_path_factory) -> Path:
    """A private copy of the verified ranks file (fetched by the normal route if needed)."""
    get_tokenizer()
    src = Path(os.environ.get("MONOSEM_TOKENIZER_FILE") or cache_path())
    dst = tmp_path_factory.mktemp("ranks") / "r50k_base.tiktoken"
    shutil.copyfile(src, dst)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == SHA256
    return dst


def offline_env(tmp_path: Path, **extra: str) -> dict:
    """Environment with empty caches and every network route refused (tiktoken host, pip index)."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("PIP_", "MONOSEM_", "TIKTOKEN_", "DATA_GYM"))
           and k.upper() not in ("NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    for name in ("monosem-cache", "tiktoken-cache"):
        (tmp_path / name).mkdir(exist_ok=True)
    env.update(MONOSEM_CACHE=str(tmp_path / "monosem-cache"),
               TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"),
               HTTPS_PROXY=BLOCKED, HTTP_PROXY=BLOCKED, https_proxy=BLOCKED, http_proxy=BLOCKED,
               PIP_INDEX_URL=f"{BLOCKED}/simple", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1")
    env.update(extra)
    return env


SCRIPT = ("from monosem.tokenizer import get_tokenizer; e = get_tokenizer(); "
          "print(e.encode_ordinary('Hello world'), e.eot_token, e.n_vocab)")


def run_py(env: dict, *args: str) -> subprocess.CompletedProcess:
    # the timeout is a hang guard: an offline failure must come back in seconds, not minutes
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_gpt2_ids():
    enc = get_tokenizer()
    assert enc is get_tokenizer()  # cached per process
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.eot_token == EOT == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text and max(ids) < 50256


def test_reachable_sees_a_refusing_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", BLOCKED)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert not reachable("https://example.org/x", timeout=2)


def test_env_file_works_offline(ranks_file, tmp_path):
    env = offline_env(tmp_path, MONOSEM_TOKENIZER_FILE=str(ranks_file))
    out = run_py(env, "-c", SCRIPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[15496, 995] 50256 50257"
    # the direct route needs no cache: nothing was copied anywhere
    assert not any((tmp_path / "monosem-cache").iterdir())
    assert not any((tmp_path / "tiktoken-cache").iterdir())


def test_monosem_cache_works_offline(ranks_file, tmp_path):
    env = offline_env(tmp_path)
    shutil.copyfile(ranks_file, tmp_path / "monosem-cache" / "r50k_base.tiktoken")
    out = run_py(env, "-m", "monosem.tokenizer")
    assert out.returncode == 0, out.stderr
    assert "n_vocab 50257, eot 50256" in out.stdout
    assert str(tmp_path / "monosem-cache" / "r50k_base.tiktoken") in out.stdout


def test_corrupt_env_file_named(ranks_file, tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    data = bytearray(ranks_file.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    out = run_py(offline_env(tmp_path, MONOSEM_TOKENIZER_FILE=str(bad)), "-m", "monosem.tokenizer")
    assert out.returncode == 2
    assert str(bad) in out.stderr and "sha256" in out.stderr and SHA256 in out.stderr
    assert "Traceback" not in out.stderr


def test_nothing_reachable_says_how_to_provide(ranks_file, tmp_path):
    env = offline_env(tmp_path)
    corrupt_cache = tmp_path / "monosem-cache" / "r50k_base.tiktoken"
    corrupt_cache.write_bytes(ranks_file.read_bytes()[:-10])  # a bad cached copy is not used
    out = run_py(env, "-m", "monosem.tokenizer")
    assert out.returncode == 2, out.stdout
    msg = out.stderr
    assert "MONOSEM_TOKENIZER_FILE" in msg and str(corrupt_cache) in msg
    assert "pip download --no-deps --no-binary :all: openai-whisper==20250625" in msg
    assert "whisper/assets/gpt2.tiktoken" in msg and "Traceback" not in msg


def test_setup_step_fetches_and_caches(tmp_path):
    """The real fallback: pip downloads the whisper sdist from the registry (or tiktoken's own
    download works where its host is reachable); the verified file lands in the monosem cache."""
    if not (reachable("https://pypi.org/simple/")
            or reachable("https://openaipublic.blob.core.windows.net/")):
        pytest.skip("neither the package registry nor tiktoken's host is reachable")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONOSEM_", "TIKTOKEN_"))}
    env.update(MONOSEM_CACHE=str(tmp_path / "cache"), TIKTOKEN_CACHE_DIR=str(tmp_path / "tt"))
    out = subprocess.run([sys.executable, "-m", "monosem.tokenizer"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cached = tmp_path / "cache" / "r50k_base.tiktoken"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == SHA256
    # nothing else there: no temp file left behind
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["r50k_base.tiktoken"]
