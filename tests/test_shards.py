"""Corpus sources and token shards: real files, real tars read back with webdataset.

    OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider tests/test_shards.py
"""
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from monosem.configfile import load_config
from monosem.corpus import local_documents, stdlib_documents, stdlib_files
from monosem.errors import MonosemError
from monosem.prepare import prepare, val_mask
from monosem.shards import read_manifest, shard_paths, verify_shards, write_shards
from monosem.tokenizer import EOT, get_tokenizer


def make_cfg(data_dir: Path, **data):
    data = {"max_tokens": 50_000, "ctx_len": 32, "contexts_per_shard": 128, "val_fraction": 0.1,
            "num_threads": 1, **data}
    overrides = [f"--data.{k}={v}" for k, v in data.items()]
    return load_config(None, [f"--data.dir={data_dir}", *overrides])


def all_tokens(data_dir: Path) -> np.ndarray:
    """Every context of both splits read back with webdataset, in ctx_id order: [N * T]."""
    import webdataset as wds

    urls = [str(p) for s in ("train", "val") for p in shard_paths(data_dir, s)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    samples = {int(s["__key__"]): s["tokens.npy"] for s in ds}
    assert sorted(samples) == list(range(len(samples)))  # ctx_ids unique and dense
    assert all(a.dtype == np.uint16 for a in samples.values())
    return np.concatenate([samples[i] for i in range(len(samples))])


def shas(manifest: dict) -> list[str]:
    return [e["sha256"] for s in manifest["splits"].values() for e in s["shards"]]


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("stdlib") / "data"
    prepare(make_cfg(d))
    return d


def test_stdlib_manifest_and_tokens(stdlib_dir):
    m = read_manifest(stdlib_dir)
    n = 50_000 // 32
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (m["format"], m["tokenizer"], m["n_vocab"], m["eot"], m["ctx_len"]) == (
        "monosem-shards/1", "r50k_base", 50257, 50256, 32)
    assert train["contexts"] + val["contexts"] == n and val["contexts"] == math.ceil(n * 0.1)
    for split in (train, val):
        sizes = [e["contexts"] for e in split["shards"]]
        assert all(s == 128 for s in sizes[:-1]) and 0 < sizes[-1] <= 128
        assert sum(sizes) == split["contexts"] and split["tokens"] == 32 * split["contexts"]
    assert m["data_config"]["max_tokens"] == 50_000 and "tiktoken" in m["versions"]
    assert m["skipped_files"] == 0
    assert (stdlib_dir / "config.toml").is_file()
    assert not [p for p in stdlib_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    # the packed stream is the stdlib files in order, each followed by eot
    tokens, enc = all_tokens(stdlib_dir), get_tokenizer()
    assert len(tokens) == 32 * n
    pieces = np.split(tokens, np.flatnonzero(tokens == EOT) + 1)
    assert len(pieces) > 2
    for piece, doc in zip(pieces[:-1], stdlib_documents()):
        assert enc.decode(piece[:-1].tolist()) == doc
    *_, last = zip(pieces, stdlib_documents())
    assert doc_startswith(enc.decode_bytes(last[0].tolist()), last[1])


def doc_startswith(prefix: bytes, doc: str) -> bool:
    return doc.encode("utf-8").startswith(prefix)


def test_deterministic_skip_and_other_config(stdlib_dir, tmp_path, capsys):
    again = tmp_path / "again"
    assert shas(prepare(make_cfg(again))) == shas(read_manifest(stdlib_dir))
    mtimes = {p: p.stat().st_mtime_ns for p in again.iterdir()}
    capsys.readouterr()
    prepare(make_cfg(again, num_threads=2))  # num_threads does not change the shards
    assert "skipping" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes
    with pytest.raises(MonosemError) as e:
        prepare(make_cfg(again, ctx_len=16, val_fraction=0.2))
    assert "data.ctx_len" in str(e.value) and "data.val_fraction" in str(e.value)
    assert str(again) in str(e.value) and "max_tokens" not in str(e.value)
    assert {p: p.stat().st_mtime_ns for p in again.iterdir()} == mtimes  # never overwritten


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_named(stdlib_dir, tmp_path, damage):
    d = tmp_path / "d"
    d.mkdir()
    for p in stdlib_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    shard = d / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-512]))
    else:
        shard.unlink()
    with pytest.raises(MonosemError, match="train-000002.tar"):
        prepare(make_cfg(d))  # data.dir differs from the manifest's: ignored for the check
    with pytest.raises(MonosemError, match="delete") as e:
        verify_shards(d)
    assert str(e.value).startswith(f"shard {shard}: ") and "\n" not in str(e.value)


def test_interrupted_run_leftovers_are_replaced(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "train-000099.tar").write_bytes(b"stale")          # no manifest: an unfinished prepare
    (d / ".train-000000.tar.abc.tmp").write_bytes(b"half")
    m = prepare(make_cfg(d, max_tokens=4096))
    names = {e["name"] for s in m["splits"].values() for e in s["shards"]}
    assert {p.name for p in d.iterdir()} == names | {"manifest.json", "config.toml"}


def test_local_sources_txt_jsonl_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "b.txt").write_text("First document.\nIt has two lines.\n")
    (src / "d.txt").write_text("Third: a lone txt file after the jsonl.")
    with open(src / "c.jsonl", "w") as f:
        for t in ["Second, row one.", "Second, row two ünïcode."]:
            f.write(json.dumps({"id": 1, "body": t}) + "\n")
    pq.write_table(pa.table({"body": ["Parquet row A.", "Parquet row B."], "n": [1, 2]}),
                   src / "e.parquet")
    docs = ["First document.\nIt has two lines.\n", "Second, row one.", "Second, row two ünïcode.",
            "Third: a lone txt file after the jsonl.", "Parquet row A.", "Parquet row B."]
    source = f"{src}/*.parquet, {src}/*.txt,{src}/c.jsonl"
    assert list(local_documents(source, "body")) == docs
    enc = get_tokenizer()
    expected = [t for doc in docs for t in enc.encode_ordinary(doc) + [EOT]]
    m = prepare(make_cfg(tmp_path / "data", source=source, text_field="body", ctx_len=4,
                         max_tokens=0, val_fraction=0.0, contexts_per_shard=5))
    n = len(expected) // 4
    assert m["splits"]["train"]["contexts"] == n and m["splits"]["val"]["shards"] == []
    assert all_tokens(tmp_path / "data").tolist() == expected[: 4 * n]


def test_bad_local_sources_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(MonosemError) as e:
        prepare(make_cfg(tmp_path / "d1", source=f"{tmp_path}/*.jsonl"))
    assert str(tmp_path / "a.jsonl") in str(e.value) and "'text'" in str(e.value)
    assert "content" in str(e.value)
    with pytest.raises(MonosemError, match="nothing-here"):
        prepare(make_cfg(tmp_path / "d2",
                         source=f"{tmp_path}/*.jsonl,{tmp_path}/nothing-here/*.txt"))
    assert not (tmp_path / "d2" / "manifest.json").exists()
    with pytest.raises(MonosemError, match="not one context"):
        prepare(make_cfg(tmp_path / "d3", max_tokens=16))


def test_hub_dataset_offline_named(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: datasets' own offline refusal, turned into a MonosemError
    with pytest.raises(MonosemError, match="someone/no-such-corpus"):
        prepare(make_cfg(tmp_path / "d", source="hf:someone/no-such-corpus"))


def test_hub_unreachable_fails_fast_without_offline_vars(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NO_PROXY", "no_proxy")}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    code = ("from monosem.corpus import hub_documents\n"
            "from monosem.errors import MonosemError\n"
            "try: hub_documents('someone/no-such-corpus')\n"
            "except MonosemError as e: print(e)\n")
    # the timeout is a hang guard (huggingface_hub alone retries for ~25 s)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=20)
    assert "someone/no-such-corpus" in out.stdout and "unreachable" in out.stdout, out.stderr


def test_stdlib_files_skip_site_packages_and_tests():
    few, many = stdlib_files(False), stdlib_files(True)
    assert 0 < len(few) < len(many) and set(few) < set(many)
    assert not any(part in ("site-packages", "dist-packages") for p in many for part in p.parts)
    assert not any(part in ("test", "tests", "idle_test") for p in few for part in p.parts)
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in few]
    assert rel == sorted(rel) and "json/decoder.py" in rel and "test/__init__.py" not in rel


def test_val_mask_spreads_exactly():
    ids = np.arange(1000)
    for f in (0.0, 0.02, 0.1, 1 / 3, 0.5):
        mask = val_mask(ids, f)
        for n in (1, 7, 50, 1000):
            assert mask[:n].sum() == math.ceil(n * f - 1e-9)
    assert val_mask(ids, 0.02)[0] and val_mask(ids, 0.02).sum() == 20


def test_low_level_api_errors(tmp_path):
    ctx = np.arange(12, dtype=np.uint16).reshape(3, 4)
    entries = write_shards(ctx, np.array([5, 9, 11]), tmp_path, "val", 2)
    assert [(e["name"], e["contexts"], e["tokens"]) for e in entries] == [
        ("val-000000.tar", 2, 8), ("val-000001.tar", 1, 4)]
    with pytest.raises(MonosemError, match="uint16"):
        write_shards(ctx.astype(np.int32), np.arange(3), tmp_path, "train", 2)
    with pytest.raises(MonosemError, match=str(tmp_path / "manifest.json")):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(MonosemError, match="not a valid manifest"):
        read_manifest(tmp_path)
