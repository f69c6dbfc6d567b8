"""GPT-2 BPE (tiktoken `r50k_base`: 50,257 ids, eot 50256) that works offline.

The ranks file (835 kB, sha256 below) is looked for in this order: `$MONOSEM_TOKENIZER_FILE`;
the monosem cache `$MONOSEM_CACHE/r50k_base.tiktoken` (default ~/.cache/monosem); tiktoken's own
download; the copy inside the PyPI sdist openai-whisper==20250625 (fetched with pip). What is
fetched is verified and stored in the monosem cache. Setup step (fetch, verify, cache):

    python -m monosem.tokenizer
    from monosem.tokenizer import get_tokenizer; get_tokenizer().encode_ordinary("Hello world")
"""
from __future__ import annotations

import base64
import functools
import hashlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken

from monosem.errors import MonosemError
from monosem.files import write_bytes_atomic

NAME = "r50k_base"
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
N_VOCAB = 50257
EOT = 50256
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
WHISPER = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
PIP_CMD = f"pip download --no-deps --no-binary :all: {WHISPER} -d DIR"
CONNECT_TIMEOUT_S = 3.0
BATCH_CHARS, BATCH_DOCS = 4 << 20, 4096  # most text / documents per tokenizer call


def cache_path() -> Path:
    """Where the verified ranks file is kept: `$MONOSEM_CACHE/r50k_base.tiktoken`."""
    root = os.environ.get("MONOSEM_CACHE") or Path.home() / ".cache" / "monosem"
    return Path(root) / f"{NAME}.tiktoken"


def _sha_ok(data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == SHA256


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Can a TCP connection to the URL's host (or the proxy that would carry it) open quickly?"""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname, p.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_tiktoken() -> bytes | None:
    """tiktoken's own download (or its cache); None when its host cannot be reached quickly."""
    from tiktoken.load import read_file_cached

    old = socket.getdefaulttimeout()
    try:
        if not reachable(TIKTOKEN_URL):
            # a cache hit still works offline; otherwise give up at once instead of hanging
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
            cache = cache if cache is not None else os.path.join(tempfile.gettempdir(),
                                                                 "data-gym-cache")
            key = hashlib.sha1(TIKTOKEN_URL.encode()).hexdigest()
            if not cache or not os.path.exists(os.path.join(cache, key)):
                return None
        socket.setdefaulttimeout(30)  # requests inside tiktoken sets no timeout of its own
        return read_file_cached(TIKTOKEN_URL, expected_hash=SHA256)
    except Exception:  # noqa: BLE001 - any failure here just means: try the next source
        return None
    finally:
        socket.setdefaulttimeout(old)


def _from_pip(timeout_s: float = 180.0) -> bytes | None:
    """The ranks file inside the openai-whisper sdist from the package registry (via pip)."""
    with tempfile.TemporaryDirectory(prefix="monosem-tok-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--retries", "0", "--timeout", "15", "--quiet", WHISPER, "-d", tmp]
        try:
            subprocess.run(cmd, check=True, timeout=timeout_s, capture_output=True,
                           stdin=subprocess.DEVNULL)
        except (subprocess.SubprocessError, OSError):
            return None
        for sdist in Path(tmp).glob("*.tar.gz"):
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    if member.isfile() and member.name.endswith("/" + WHISPER_MEMBER):
                        data = tar.extractfile(member).read()
                        return data if _sha_ok(data) else None
    return None


def _read_env_file() -> bytes | None:
    env = os.environ.get("MONOSEM_TOKENIZER_FILE")
    if not env:
        return None
    path = Path(env)
    if not path.is_file():
        raise MonosemError(f"MONOSEM_TOKENIZER_FILE={env}: no such file")
    data = path.read_bytes()
    if not _sha_ok(data):
        raise MonosemError(f"tokenizer file {path} (from MONOSEM_TOKENIZER_FILE) has sha256 "
                           f"{hashlib.sha256(data).hexdigest()}, expected {SHA256} "
                           f"(the r50k_base / GPT-2 ranks file); it is corrupt or another file")
    return data


def ranks_bytes() -> bytes:
    """The verified r50k_base ranks file, from the first source that has it (see module doc)."""
    data = _read_env_file()
    if data is not None:
        return data
    cached = cache_path()
    if cached.is_file():
        data = cached.read_bytes()
        if _sha_ok(data):
            return data
    data = _from_tiktoken() or _from_pip()
    if data is None:
        raise MonosemError(
            f"the GPT-2 tokenizer ranks file ({NAME}.tiktoken, sha256 {SHA256}) is not available "
            f"and could not be downloaded (tiktoken's host and the package registry are "
            f"unreachable). Provide it: run `{PIP_CMD}`, take {WHISPER_MEMBER} out of the "
            f"sdist, and either set MONOSEM_TOKENIZER_FILE=<that file> or copy it to {cached} "
            f"(then `python -m monosem.tokenizer` checks it).")
    write_bytes_atomic(cached, data)
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """The tiktoken ranks format: one `<base64 token> <rank>` per line (as load_tiktoken_bpe,
    which would also copy a local file into tiktoken's cache)."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The r50k_base Encoding (cached per process)."""
    import tiktoken_ext.openai_public as op

    enc = tiktoken.Encoding(name=NAME, pat_str=op.r50k_pat_str,
                            mergeable_ranks=_parse_ranks(ranks_bytes()),
                            special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=N_VOCAB)
    assert enc.n_vocab == N_VOCAB and enc.eot_token == EOT
    return enc


def _doc_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Lists of documents of growing size (64 kB of text doubling to BATCH_CHARS), so that a
    consumer that stops early (data.max_tokens) has not tokenized far more than it keeps."""
    batch, chars, target = [], 0, 1 << 16
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= target or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars, target = [], 0, min(2 * target, BATCH_CHARS)
    if batch:
        yield batch


def encode_documents(docs: Iterable[str],
                     num_threads: int = 2) -> Iterator[tuple[int, np.ndarray]]:
    """(documents in the batch, their uint16 ids with eot after each document), batch by batch;
    the batch is tokenized by `num_threads` threads (tiktoken releases the GIL)."""
    enc, eot = get_tokenizer(), np.array([EOT], dtype=np.uint16)
    for batch in _doc_batches(docs):
        ids = enc.encode_ordinary_batch(batch, num_threads=num_threads)
        yield len(batch), np.concatenate([a for d in ids for a in (np.array(d, np.uint16), eot)])


def main() -> None:
    """Setup step: fetch + verify + cache the ranks file, print where it is."""
    enc = get_tokenizer()
    env = os.environ.get("MONOSEM_TOKENIZER_FILE")
    where = f"{env} (MONOSEM_TOKENIZER_FILE)" if env else str(cache_path())
    print(f"tokenizer {NAME} ok: n_vocab {enc.n_vocab}, eot {enc.eot_token}, "
          f"ranks file {where} (sha256 {SHA256[:12]}...)")


if __name__ == "__main__":
    try:
        main()
    except MonosemError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
