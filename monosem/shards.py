"""The on-disk token shard format (monosem-shards/1): writing, reading and checking shards.

`<data_dir>/{train,val}-NNNNNN.tar` holds one sample per context, the member
`<ctx_id:010d>.tokens.npy` = np.save of a little-endian uint16 [ctx_len] array (the USTAR layout
webdataset's TarWriter writes, so `wds.WebDataset(urls).decode()` reads it too); `manifest.json`
lists every shard with its counts and sha256. `monosem prepare` (monosem/prepare.py) makes them.

    entries = write_shards(contexts, ctx_ids, "out", "train", contexts_per_shard=1024)
    write_json_atomic("out/manifest.json", make_manifest(ctx_len, {"train": entries, "val": []}))
    m = read_manifest("out"); paths = shard_paths("out", "train"); verify_shards("out")
    tokens, ctx_ids = load_shard(paths[0], m["ctx_len"], m["splits"]["train"]["shards"][0])

Every error about a shard is a ShardError whose message starts with `shard <path>` on one line.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from monosem.errors import MonosemError
from monosem.files import open_atomic
from monosem.tokenizer import EOT, N_VOCAB, NAME as TOKENIZER

FORMAT = "monosem-shards/1"
SPLITS = ("train", "val")
MEMBER = re.compile(r"(\d{10})\.tokens\.npy")
REQUIRED_KEYS = ("ctx_len", "eot", "splits", "data_config")


class ShardError(MonosemError):
    """A shard is missing, truncated, corrupt or disagrees with the manifest; the message's first
    line starts with `shard <path>`."""


def shard_error(path: Path, problem: object, member: str | None = None) -> ShardError:
    """The one-line ShardError for `path` (exception texts can hold newlines: folded)."""
    where = f", member {member}" if member is not None else ""
    return ShardError(f"shard {path}{where}: " + " ".join(str(problem).split()))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.lru_cache
def npy_header(ctx_len: int) -> bytes:
    """np.save's header for a uint16 [ctx_len] array: the same for every context of a shard."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(ctx_len, "<u2"), allow_pickle=False)
    return buf.getvalue()[: -2 * ctx_len]


# ---- writing ------------------------------------------------------------------------------------

def write_shard(path: Path, contexts: np.ndarray, ctx_ids: np.ndarray) -> dict:
    """Write one tar (temp name, fsync, rename); return its manifest entry. Plain `tarfile` is
    used because `import webdataset` imports torch (2-4 s)."""
    path = Path(path)
    with open_atomic(path) as f:
        header = npy_header(contexts.shape[1])
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for ctx, cid in zip(contexts, ctx_ids):
                data = header + ctx.astype("<u2", copy=False).tobytes()  # == np.save bytes
                info = tarfile.TarInfo(f"{int(cid):010d}.tokens.npy")
                # fixed mtime/owner: equal contexts give byte-identical tars (same sha256)
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                info.uname = info.gname = "monosem"
                tar.addfile(info, io.BytesIO(data))
    return {"name": path.name, "contexts": int(len(contexts)), "tokens": int(contexts.size),
            "bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_shards(contexts: np.ndarray, ctx_ids: np.ndarray, out_dir: str | Path, split: str,
                 contexts_per_shard: int) -> list[dict]:
    """Write `contexts` [N, T] uint16 with their global `ctx_ids` [N] int64 as
    `<split>-000000.tar`, ... of `contexts_per_shard` contexts each (the last may hold fewer)."""
    contexts, ctx_ids = np.asarray(contexts), np.asarray(ctx_ids)
    if contexts.ndim != 2 or contexts.dtype != np.uint16 or ctx_ids.shape != (len(contexts),):
        raise MonosemError(f"write_shards: need contexts uint16 [N, T] and ctx_ids [N], got "
                           f"{contexts.dtype} {list(contexts.shape)} and {list(ctx_ids.shape)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, len(contexts), contexts_per_shard)):
        end = start + contexts_per_shard
        entries.append(write_shard(out_dir / f"{split}-{i:06d}.tar", contexts[start:end],
                                   ctx_ids[start:end]))
    return entries


# ---- the manifest -------------------------------------------------------------------------------

def make_manifest(ctx_len: int, splits: dict[str, list[dict]], **info: object) -> dict:
    """The manifest of shards whose entries (from write_shard) are given per split; `info` adds
    keys (source, data_config, versions, documents, ...). data_config defaults to {}."""
    return {"format": FORMAT, "tokenizer": TOKENIZER, "n_vocab": N_VOCAB, "eot": EOT,
            "ctx_len": ctx_len, "data_config": {}, **info,
            "splits": {name: {"contexts": sum(e["contexts"] for e in entries),
                              "tokens": sum(e["tokens"] for e in entries), "shards": entries}
                       for name, entries in splits.items()}}


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a shard folder; MonosemError naming the path if missing or invalid."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise MonosemError(f"no token shards: {path} is missing "
                           f"(run `monosem prepare <config>` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MonosemError(f"{path} is not a valid manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise MonosemError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise MonosemError(f"{path}: key(s) {', '.join(missing)} missing")
    return manifest


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    """Paths of the shards of `split`, in manifest order."""
    splits = read_manifest(data_dir)["splits"]
    if split not in splits:
        raise MonosemError(f"{Path(data_dir) / 'manifest.json'}: no split {split!r} "
                           f"(has {', '.join(splits)})")
    return [Path(data_dir) / e["name"] for e in splits[split]["shards"]]


def verify_shards(data_dir: str | Path, manifest: dict | None = None) -> None:
    """Check every shard's size and sha256 against the manifest; ShardError naming the shard."""
    data_dir = Path(data_dir)
    manifest = manifest or read_manifest(data_dir)
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            path, problem = data_dir / entry["name"], None
            if not path.is_file():
                problem = "missing"
            elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
                problem = f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            elif _sha256(path) != entry["sha256"]:
                problem = "does not match its sha256 in the manifest (corrupt)"
            if problem:
                raise shard_error(path, f"{problem}; delete {data_dir}, prepare again")


# ---- reading ------------------------------------------------------------------------------------

def _plain_members(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of each member of a plain ustar archive (what write_shard writes), parsed
    directly (tarfile costs ~80 us a member); None for anything else, which tarfile then judges."""
    members, off = [], 0
    while off + 512 <= len(data):
        header = data[off:off + 512]
        if not any(header):
            return members  # end-of-archive block
        try:
            size = int(header[124:136].strip(b"\0 "), 8)
            checksum = int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            return None
        if (header[156:157] not in (b"0", b"\0") or any(header[345:500])  # plain file, short name
                or off + 512 + size > len(data)
                or checksum != sum(header[:148]) + 256 + sum(header[156:])):
            return None
        members.append((header[:100].rstrip(b"\0").decode("utf-8", "replace"),
                        data[off + 512:off + 512 + size]))
        off += 512 + -(-size // 512) * 512
    return None


def _tar_members(path: Path, data: bytes) -> list[tuple[str, bytes]]:
    """Members via tarfile, for archives the fast parser declines; errors name the member."""
    members, member = [], None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise shard_error(path, f"member {member.name!r} is not a file")
                members.append((member.name, tar.extractfile(member).read()))
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        name = member.name if member is not None else None
        raise shard_error(path, f"truncated or corrupt ({e})", name) from None
    return members


def _npy_tokens(path: Path, name: str, raw: bytes, ctx_len: int) -> np.ndarray:
    """One member's uint16 [ctx_len] tokens; ShardError naming the member if it is not that."""
    header = npy_header(ctx_len)
    if len(raw) == len(header) + 2 * ctx_len and raw.startswith(header):  # the usual case, fast
        return np.frombuffer(raw, "<u2", offset=len(header)).astype(np.uint16, copy=False)
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise shard_error(path, f"not a valid .npy ({e})", name) from None
    if arr.dtype != np.uint16 or arr.shape != (ctx_len,):
        raise shard_error(path, f"{arr.dtype} {list(arr.shape)}, manifest wants uint16 "
                                f"[{ctx_len}]", name)
    return arr


def load_shard(path: Path, ctx_len: int, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """Read one tar shard whole, checked against its manifest entry -> uint16 [n, T], int64 [n]
    in ctx_id order; ShardError naming the shard (and member) if it is unreadable or corrupt."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise shard_error(path, f"cannot read it ({e})") from None
    members = _plain_members(data) or _tar_members(path, data)  # tarfile judges the unusual
    tokens, ids = [], []
    for name, raw in members:
        match = MEMBER.fullmatch(name)
        if not match:
            raise shard_error(path, f"unexpected member {name!r} (want <ctx_id:010d>.tokens.npy)")
        tokens.append(_npy_tokens(path, name, raw, ctx_len))
        ids.append(int(match.group(1)))
    if len(tokens) != entry["contexts"]:
        raise shard_error(path, f"holds {len(tokens)} contexts, manifest says "
                                f"{entry['contexts']} (truncated?)")
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise shard_error(path, "sha256 differs from the manifest (corrupt or replaced)")
    ids_arr = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids_arr, kind="stable")  # context order independent of the tar's order
    return np.stack(tokens)[order] if tokens else np.zeros((0, ctx_len), np.uint16), ids_arr[order]
