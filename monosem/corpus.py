"""Document sources for `prepare`: each yields text documents in a fixed, reproducible order.

`data.source` is `stdlib` (the Python standard library's .py files), local files (a glob or
comma-separated globs of .txt = one document per file, .jsonl = one per line, .parquet = one per
row; read through `datasets`), or `hf:<name>` (a Hugging Face hub dataset, streamed).

A file that should be text (.py, .txt) but looks binary (binary_reason: NUL bytes, control
characters, or mostly bytes that are not UTF-8, in a sample) is skipped, not tokenized: `on_skip`
gets its path and the reason (default: one warning line on stderr). Text that is not valid UTF-8
throughout (a few stdlib files) is kept and read with errors='replace'.

    from monosem.corpus import iter_documents
    for doc in iter_documents(cfg.data): ...
"""
from __future__ import annotations

import glob
import itertools
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Iterator

from monosem.config import DataConfig
from monosem.errors import MonosemError
from monosem.tokenizer import reachable

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HEAD_BYTES, WINDOW_BYTES = 64 << 10, 16 << 10  # sample: the head, plus the middle and the tail
MAX_CONTROL, MAX_NOT_UTF8 = 0.05, 0.50  # fractions of the sample's bytes that mean "binary"
# C0 controls that text does not hold (tab, newlines, form feed and ESC are left out), and DEL
CONTROL = bytes([*range(0x01, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
OnSkip = Callable[[Path, str], None]


def warn_skipped(path: Path, why: str) -> None:
    """The default `on_skip`: one warning line on stderr."""
    print(f"warning: skipping {path}: {why}", file=sys.stderr, flush=True)


def iter_documents(data: DataConfig, on_skip: OnSkip = warn_skipped) -> Iterator[str]:
    """The documents of `data.source`, in a deterministic order; binary files are skipped and
    reported to `on_skip(path, reason)` when the iteration reaches them."""
    source = data.source.strip()
    if source == "stdlib":
        return stdlib_documents(data.include_tests, on_skip)
    if source.startswith("hf:"):
        return hub_documents(source[3:], data.hf_config, data.hf_split, data.text_field)
    return local_documents(source, data.text_field, on_skip)


# ---- binary files in text sources -----------------------------------------------------------

def binary_reason(sample: bytes) -> str | None:
    """Why `sample` (bytes of a file) is not text, or None if it is. Rules, in order: any NUL
    byte (binary formats, UTF-16); over 5% control bytes; over half the bytes not UTF-8. Text in
    a legacy 8-bit encoding stays text (the stdlib's KOI8-R module has 42% non-UTF-8 bytes)."""
    if not sample:
        return None
    if b"\0" in sample:
        return "binary content: NUL bytes (a binary format, or UTF-16 text)"
    control = len(sample) - len(sample.translate(None, CONTROL))
    if control > MAX_CONTROL * len(sample):
        return f"binary content: {control / len(sample):.0%} of the bytes read are control bytes"
    not_utf8 = sample.decode("utf-8", errors="replace").count("\ufffd")
    if not_utf8 > MAX_NOT_UTF8 * len(sample):
        return f"binary content: {not_utf8 / len(sample):.0%} of the bytes read are not UTF-8"
    return None


def file_sample(path: Path) -> bytes:
    """The first HEAD_BYTES of a file, plus WINDOW_BYTES from its middle and its end if larger
    (windows joined by a newline: a UTF-8 sequence cut at a window edge costs one byte)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= HEAD_BYTES + 2 * WINDOW_BYTES:
            return f.read()
        parts = [f.read(HEAD_BYTES)]
        for offset in ((size - WINDOW_BYTES) // 2, size - WINDOW_BYTES):
            f.seek(offset)
            parts.append(f.read(WINDOW_BYTES))
    return b"\n".join(parts)


def _text_files(files: Iterable[Path], on_skip: OnSkip) -> list[Path]:
    """`files` less the binary ones, which go to on_skip."""
    kept = []
    for f in files:
        why = binary_reason(file_sample(f))
        if why:
            on_skip(f, why)
        else:
            kept.append(f)
    return kept


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


def stdlib_documents(include_tests: bool = False,
                     on_skip: OnSkip = warn_skipped) -> Iterator[str]:
    """The stdlib files' text; a few test files are deliberately not UTF-8: read with 'replace'."""
    for path in stdlib_files(include_tests):
        data = path.read_bytes()
        why = binary_reason(data)  # the whole file: it is read whole anyway
        if why:
            on_skip(path, why)
            continue
        yield data.decode("utf-8", errors="replace")


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


def local_documents(source: str, text_field: str = "text",
                    on_skip: OnSkip = warn_skipped) -> Iterator[str]:
    """Documents of local files through `datasets` (streaming: files of any size). The globs are
    checked now, the files are read (binary .txt files skipped) when iterated."""
    return _local_documents(local_files(source), text_field, on_skip)


def _local_documents(files: list[Path], text_field: str, on_skip: OnSkip) -> Iterator[str]:
    """File by file in sorted path order; a run of .txt files is one `datasets` load (per-file
    loads would dominate for many small files), a table file is one load, so errors name it."""
    def is_txt(f: Path) -> bool:
        return LOADERS[f.suffix.lower()] == "text"

    for txt, group in itertools.groupby(files, key=is_txt):
        group = list(group)
        if txt:
            group = _text_files(group, on_skip)
            if not group:
                continue
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
