"""Binary files in text sources: skipped with one warning line and counted, never tokenized.

    OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider tests/test_corpus.py
"""
import struct
import zlib
from pathlib import Path

import numpy as np

from monosem.configfile import load_config
from monosem.corpus import (HEAD_BYTES, binary_reason, file_sample, local_documents,
                            stdlib_documents, stdlib_files)
from monosem.prepare import prepare
from monosem.shards import load_shard, read_manifest, shard_paths
from monosem.tokenizer import EOT, get_tokenizer


def png_bytes(width: int = 16, height: int = 16) -> bytes:
    """A real PNG file (8-bit RGB gradient), as an image library would write it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rgb = [(x * 16 % 256, y * 16 % 256, 128) for y in range(height) for x in range(width)]
    rows = b"".join(b"\0" + bytes(v for px in rgb[y * width:(y + 1) * width] for v in px)
                    for y in range(height))  # per row: filter type 0, then RGB per pixel
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_binary_reason_rules():
    rng = np.random.default_rng(0)
    assert "NUL" in binary_reason(png_bytes())
    assert "NUL" in binary_reason(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "NUL" in binary_reason("UTF-16 text".encode("utf-16"))
    no_nul = rng.integers(1, 256, 4096, dtype=np.uint8).tobytes()  # random, NULs left out
    assert "control" in binary_reason(no_nul)
    high = rng.integers(0x80, 0x100, 4096, dtype=np.uint8).tobytes()  # never valid UTF-8 here
    assert "not UTF-8" in binary_reason(high)
    # mostly legacy 8-bit letters: what reading it with errors='replace' gives is not text
    russian = "Привет, мир\n".encode("koi8-r")
    assert "75% of the bytes read are not UTF-8" in binary_reason(russian)
    for text in (b"", b"plain text\n\tindented\r\n\x0c\x1b[1mbold\x1b[0m",
                 "ünïcödé ✓ текст".encode(),
                 "Café, naïve, déjà vu.\n".encode("latin-1"),  # some legacy 8-bit text: kept
                 'print("Привет")  # a KOI8-R string in code\n'.encode("koi8-r")):
        assert binary_reason(text) is None, text


def test_file_sample_reads_head_middle_and_tail(tmp_path):
    path = tmp_path / "big.txt"
    text = b"a line of plain text\n" * (HEAD_BYTES // 10)
    path.write_bytes(text + png_bytes())  # text for 200 kB, then an image at the very end
    sample = file_sample(path)
    assert sample.startswith(text[:HEAD_BYTES]) and sample.endswith(png_bytes())
    assert len(sample) < path.stat().st_size and "NUL" in binary_reason(sample)
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    assert file_sample(small) == b"x" * 100


def test_stdlib_walk_keeps_text_that_is_not_utf8():
    files = stdlib_files(include_tests=True)
    not_utf8 = []
    for path in files:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(path)
    assert not_utf8  # e.g. test/encoded_modules/module_koi8_r.py: the rule must keep them
    skipped = []
    docs = list(stdlib_documents(True, on_skip=lambda p, why: skipped.append((p, why))))
    assert skipped == [] and len(docs) == len(files)
    index = {p: i for i, p in enumerate(files)}
    for path in not_utf8:
        assert docs[index[path]] == path.read_bytes().decode("utf-8", errors="replace")


def make_sources(src: Path) -> tuple[list[Path], list[str]]:
    """Text and binary .txt files; returns the binary ones and the text documents in order."""
    src.mkdir()
    texts = {"a.txt": "First text file.\n", "c.txt": "Café au lait, in UTF-8.\n",
             "e.txt": "Last text file, after two binary ones.\n"}
    for name, text in texts.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "b.txt").write_bytes(png_bytes())
    (src / "d.txt").write_bytes(np.random.default_rng(1).bytes(360_000))
    return [src / "b.txt", src / "d.txt"], [texts[k] for k in sorted(texts)]


def test_local_documents_skip_binary_txt(tmp_path, capsys):
    binary, texts = make_sources(tmp_path / "src")
    seen = []
    docs = list(local_documents(f"{tmp_path}/src/*.txt", on_skip=lambda p, w: seen.append(p)))
    assert docs == texts and seen == binary
    assert list(local_documents(f"{tmp_path}/src/*.txt")) == texts
    lines = capsys.readouterr().err.splitlines()  # the default: one warning line per file
    assert len(lines) == 2
    for path, line in zip(binary, lines):
        assert line.startswith(f"warning: skipping {path}: binary content: ")


def test_prepare_skips_binary_txt_with_one_warning_line(tmp_path, capsys):
    binary, texts = make_sources(tmp_path / "src")
    data_dir = tmp_path / "data"
    cfg = load_config(None, [f"--data.dir={data_dir}", f"--data.source={tmp_path}/src/*.txt",
                             "--data.max_tokens=0", "--data.ctx_len=4", "--data.val_fraction=0",
                             "--data.contexts_per_shard=3", "--data.num_threads=1"])
    manifest = prepare(cfg)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2
    for path, line in zip(binary, warnings):
        assert line.startswith(f"warning: skipping {path}: binary content")
    assert manifest["skipped_files"] == 2 == read_manifest(data_dir)["skipped_files"]
    assert "(2 binary files skipped)" in out
    # not one token from the binary files: the shards hold exactly the text files' tokens
    enc = get_tokenizer()
    expected = [t for doc in texts for t in enc.encode_ordinary(doc) + [EOT]]
    entries = manifest["splits"]["train"]["shards"]
    ids, tokens = zip(*((i, t) for p, e in zip(shard_paths(data_dir, "train"), entries)
                        for t, i in zip(*load_shard(p, 4, e))))
    got = np.stack(tokens)[np.argsort(ids)].ravel().tolist()
    assert manifest["documents"] == 3 and manifest["corpus_tokens"] == len(expected)
    assert got == expected[: len(expected) // 4 * 4]
