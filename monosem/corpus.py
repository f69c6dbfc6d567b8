"""Document sources for `prepare`: each yields text documents in a fixed, reproducible order.

`data.source` is `stdlib` (the Python standard library's .py files), local files (a glob or
comma-separated globs of .txt = one document per file, .jsonl = one per line, .parquet = one per
row; read through `datasets`), or `hf:<name>` (a Hugging Face hub dataset, streamed).

    from monosem.corpus import iter_documents
    for doc in iter_documents(cfg.data): ...
"""
from __future__ import annotations

import glob
import itertools
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from monosem.config import DataConfig
from monosem.errors import MonosemError
from monosem.tokenizer import reachable

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def iter_documents(data: DataConfig) -> Iterator[str]:
    """The documents of `data.source`, in a deterministic order."""
    source = data.source.strip()
    if source == "stdlib":
        return stdlib_documents(data.include_tests)
    if source.startswith("hf:"):
        return hub_documents(source[3:], data.hf_config, data.hf_split, data.text_field)
    return local_documents(source, data.text_field)


# ---- stdlib ---------------------------------------------------------------------------------

def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The standard library's .py files (never site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune: site-packages holds 10k+ files
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    if not files:
        raise MonosemError(f"data.source=stdlib: no .py files under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(include_tests: bool = False) -> Iterator[str]:
    # a few stdlib test files are deliberately not UTF-8
    return (p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_files(include_tests))


# ---- local files ----------------------------------------------------------------------------

def local_files(source: str) -> list[Path]:
    """Files matched by the comma-separated globs, sorted, each glob required to match."""
    files: set[str] = set()
    for pattern in (p.strip() for p in source.split(",")):
        if not pattern:
            continue
        matched = [m for m in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(m)]
        if not matched:
            raise MonosemError(f"data.source: the glob {pattern!r} matches no file")
        for m in matched:
            if Path(m).suffix.lower() not in LOADERS:
                raise MonosemError(f"data.source: {m} is not a .txt, .jsonl or .parquet file "
                                   f"(matched by {pattern!r})")
        files.update(matched)
    if not files:
        raise MonosemError(f"data.source {source!r} names no glob")
    return sorted(Path(f) for f in files)


def local_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Documents of local files through `datasets` (streaming: files of any size). The globs are
    checked now, the files are read when iterated."""
    return _local_documents(local_files(source), source, text_field)


def _local_documents(files: list[Path], source: str, text_field: str) -> Iterator[str]:
    """File by file in sorted path order; a run of .txt files is one `datasets` load (per-file
    loads would dominate for many small files), a table file is one load, so errors name it."""
    def is_txt(f: Path) -> bool:
        return LOADERS[f.suffix.lower()] == "text"

    for txt, group in itertools.groupby(files, key=is_txt):
        group = list(group)
        if txt:
            where = f"the .txt files {group[0]} ... {group[-1]}"
            ds = _load("text", group, where, sample_by="document", encoding_errors="replace")
            yield from _texts(ds, "text", where)
            continue
        for f in group:
            yield from _texts(_load(LOADERS[f.suffix.lower()], [f], str(f)), text_field, str(f))


def _load(loader: str, files: list[Path], where: str, **kwargs: object) -> Iterable[dict]:
    import datasets

    try:
        return datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train",
                                     streaming=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; name the file
        raise MonosemError(f"{where}: cannot be read as {loader}: {type(e).__name__}: {e}") from e


def _texts(rows: Iterable[dict], text_field: str, where: str) -> Iterator[str]:
    """The `text_field` of every row; MonosemError naming `where` (and the field) on bad rows."""
    it = iter(rows)
    for i in itertools.count():
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types; name the file
            raise MonosemError(f"{where}: cannot be read after {i} rows: "
                               f"{type(e).__name__}: {e}") from e
        text = row.get(text_field)
        if not isinstance(text, str):
            what = "has no field" if text is None else f"has a {type(text).__name__} in field"
            raise MonosemError(f"{where}: row {i} {what} {text_field!r} (fields: "
                               f"{', '.join(row)}); set data.text_field")
        yield text


# ---- hub datasets ---------------------------------------------------------------------------

def hub_documents(name: str, config: str = "", split: str = "train",
                  text_field: str = "text") -> Iterator[str]:
    """Stream a Hugging Face hub dataset. Fails within seconds, naming it, when the hub is out of
    reach (huggingface_hub would otherwise retry for ~25 s)."""
    if not name:
        raise MonosemError("data.source 'hf:' names no dataset (use hf:<owner>/<name>)")
    import datasets
    import huggingface_hub.constants as hub

    # the offline switches are read when datasets is imported: ask it, not os.environ
    offline = datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
    if not offline and not reachable(hub.ENDPOINT):
        raise MonosemError(f"hub dataset {name!r}: the hub ({hub.ENDPOINT}) is unreachable from "
                           f"here; use local files (data.source = a glob), data.source=stdlib, "
                           f"or HF_HUB_OFFLINE=1 to read a copy in the local Hugging Face cache")
    try:
        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - offline mode raises ConnectionError, others vary
        raise MonosemError(f"hub dataset {name!r} (config {config or None!r}, split {split!r}) "
                           f"could not be loaded: {type(e).__name__}: {e}") from e
    return _texts(ds, text_field, f"hub dataset {name!r}")
