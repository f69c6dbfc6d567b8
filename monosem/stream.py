"""Token stream: the WebDataset token shards of one split as an endless, exactly resumable stream.

Shards are split disjointly by rank x loader worker after a per-epoch shard permutation that every
rank computes alike; contexts inside a shard follow a seeded permutation per (epoch, shard). So the
state is a small JSON dict: per worker (epoch, shard position, offset) plus whose turn is next.
A corrupt shard raises (or, with on_corrupt="skip", warns with) monosem.shards' one-line
ShardError, which starts with `shard <path>`, even when it was met in a loader worker.

    stream = TokenStream("runs/tiny/data", "train", rank=0, world_size=1, seed=0)
    for tokens, ctx_ids in stream.batches(16):   # int64 [16, T], int64 [16]
        state = stream.state_dict()               # later: TokenStream(...).load_state_dict(state)
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from monosem.errors import MonosemError
from monosem.shards import ShardError, load_shard, read_manifest, shard_paths

if TYPE_CHECKING:
    from monosem.config import Config

STATE_FORMAT = "monosem-stream/1"
BLOCK = 64  # contexts per item handed from a loader worker (one per item is IPC-bound)
State = tuple[int, int, int]  # (epoch, position in the worker's shard list, offset in the shard)


def _identity(item: object) -> object:  # DataLoader collate_fn: keep numpy arrays as they are
    return item


class ShardReader(IterableDataset):
    """The shard plan of one rank and the reading itself; runs in-process or in DataLoader workers.

    Yields events (worker, kind, payload, state before, state after): kind "ctx" with a block of
    contexts (uint16 [k, T], ctx_ids [k]), kind "bad" with the error message of a corrupt shard,
    or kind "fatal" (its message) when every shard in a row was corrupt.
    Blocks end at multiples of BLOCK inside a shard, so a resumed stream cuts them the same way.
    """

    def __init__(self, paths: list[Path], entries: list[dict], ctx_len: int, *, rank: int,
                 world_size: int, n_workers: int, seed: int, shuffle_shards: bool,
                 shuffle_contexts: bool, loop: bool):
        self.paths, self.entries, self.ctx_len = paths, entries, ctx_len
        self.rank, self.world_size, self.n_workers = rank, world_size, n_workers
        self.seed = seed % 2**64  # SeedSequence wants non-negative entropy
        self.shuffle_shards, self.shuffle_contexts = shuffle_shards, shuffle_contexts
        self.loop = loop
        self.start_worker, self.states = 0, [(0, 0, 0)] * n_workers  # set before each iteration

    def worker_shards(self, epoch: int, worker: int) -> list[int]:
        """Manifest indices of the shards this rank's `worker` reads in `epoch`, in order."""
        n = len(self.paths)
        order = np.arange(n)
        if self.shuffle_shards:  # same permutation on every rank, so the split stays disjoint
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n)
        return order[self.rank::self.world_size][worker::self.n_workers].tolist()

    def context_order(self, epoch: int, shard: int, n: int) -> np.ndarray:
        if not self.shuffle_contexts:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 1, shard]).permutation(n)

    def events(self, worker: int, state: State) -> Iterator[tuple]:
        """Events of this rank's `worker` from `state` on (endless if looping)."""
        (epoch, pos, offset), n_bad = state, 0  # n_bad: corrupt shards in a row
        while True:
            shards = self.worker_shards(epoch, worker)
            for pos in range(pos, len(shards)):
                shard, done = shards[pos], self._next_shard(epoch, pos, len(shards))
                try:
                    tokens, ids = load_shard(self.paths[shard], self.ctx_len, self.entries[shard])
                except ShardError as e:
                    n_bad += 1
                    if n_bad > len(self.paths):  # skipping forever would be a silent hang
                        # an event, not a raise: DataLoader would put its own line first
                        msg = (f"{e}; the last {n_bad} shards rank {self.rank} worker {worker} "
                               f"read were all corrupt")
                        yield worker, "fatal", msg, (epoch, pos, offset), done
                        return
                    yield worker, "bad", str(e), (epoch, pos, offset), done
                    offset = 0
                    continue
                order = self.context_order(epoch, shard, len(ids))
                lo = offset
                while lo < len(ids):  # a resumed offset inside a block gives that block's rest
                    hi = min(len(ids), (lo // BLOCK + 1) * BLOCK)
                    rows, after = order[lo:hi], (epoch, pos, hi) if hi < len(ids) else done
                    yield worker, "ctx", (tokens[rows], ids[rows]), (epoch, pos, lo), after
                    lo = hi
                n_bad, offset = 0 if len(ids) else n_bad, 0
            if not self.loop:
                return
            epoch, pos, offset = epoch + 1, 0, 0

    def _next_shard(self, epoch: int, pos: int, n_shards: int) -> State:
        """The state once the shard at `pos` is done: next shard, or next epoch if looping."""
        if pos + 1 < n_shards or not self.loop:
            return epoch, pos + 1, 0
        return epoch + 1, 0, 0

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.start_worker) % self.n_workers
        return self.events(worker, self.states[worker])


class TokenStream:
    """Contexts of one split for one rank: endless (`loop=True`) or one epoch; exactly resumable."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle_shards: bool = True,
                 shuffle_contexts: bool = True, num_workers: int = 0, on_corrupt: str = "error",
                 loop: bool = True):
        if on_corrupt not in ("error", "skip"):
            raise MonosemError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if not 0 <= rank < world_size or num_workers < 0:
            raise MonosemError(f"bad rank {rank} / world_size {world_size} / num_workers "
                               f"{num_workers}")
        manifest, paths = read_manifest(data_dir), shard_paths(data_dir, split)  # errors name them
        entries = manifest["splits"][split]["shards"]
        n_readers = world_size * max(1, num_workers)
        if len(paths) < n_readers:
            raise MonosemError(
                f"split {split!r} in {data_dir} has {len(paths)} shards, fewer than world_size "
                f"{world_size} x num_workers {max(1, num_workers)} = {n_readers} readers; every "
                f"rank and worker needs a shard (lower data.contexts_per_shard or "
                f"stream.num_workers)")
        self.data_dir, self.split, self.ctx_len = Path(data_dir), split, int(manifest["ctx_len"])
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.on_corrupt, self.loop = seed, on_corrupt, loop
        self.reader = ShardReader(paths, entries, self.ctx_len, rank=rank, world_size=world_size,
                                  n_workers=max(1, num_workers), seed=seed,
                                  shuffle_shards=shuffle_shards, shuffle_contexts=shuffle_contexts,
                                  loop=loop)
        self._states: list[State] = [(0, 0, 0)] * max(1, num_workers)  # after the last delivered
        self._next_worker = 0  # whose turn it is in the DataLoader's round robin
        self._skipped = 0

    @classmethod
    def from_config(cls, cfg: Config, split: str = "train", rank: int = 0, world_size: int = 1,
                    loop: bool = True) -> "TokenStream":
        s = cfg.stream
        return cls(cfg.data_dir, split, rank=rank, world_size=world_size, seed=cfg.run.seed,
                   shuffle_shards=s.shuffle_shards, shuffle_contexts=s.shuffle_contexts,
                   num_workers=s.num_workers, on_corrupt=s.on_corrupt, loop=loop)

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far (on_corrupt='skip')."""
        return self._skipped

    @property
    def epoch(self) -> int:
        """The earliest epoch any worker of this rank is still in."""
        return min(e for e, _, _ in self._states)

    def _events(self) -> Iterator[tuple]:
        if self.num_workers == 0:
            yield from self.reader.events(0, self._states[0])
            return
        # DataLoader worker i plays logical worker (i + start) % n: its strict round robin
        # then resumes exactly where the last delivered context left it.
        self.reader.start_worker, self.reader.states = self._next_worker, list(self._states)
        it = iter(DataLoader(self.reader, batch_size=None, num_workers=self.num_workers,
                             collate_fn=_identity))
        try:
            yield from it
        finally:
            del it  # shuts the worker processes down

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        """One context at a time: (uint16 [T], ctx_id); state_dict() is right after it."""
        events, n = self._events(), len(self._states)
        try:
            for worker, kind, payload, (epoch, pos, offset), after in events:
                if kind == "fatal":
                    raise ShardError(payload)
                if kind == "bad":
                    if self.on_corrupt == "error":
                        raise ShardError(payload)
                    self._skipped += 1
                    warnings.warn(f"skipping {payload}", RuntimeWarning, stacklevel=2)
                    self._states[worker], self._next_worker = after, (worker + 1) % n
                    continue
                tokens, ctx_ids = payload  # [k, T], [k]
                for j in range(len(ctx_ids)):
                    last = j + 1 == len(ctx_ids)  # mid-block, this worker keeps the turn
                    self._states[worker] = after if last else (epoch, pos, offset + j + 1)
                    self._next_worker = (worker + 1) % n if last else worker
                    yield tokens[j], int(ctx_ids[j])
        finally:
            events.close()  # stops the DataLoader workers now, not when the traceback dies

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens int64 [B, T], ctx_ids int64 [B]); with loop=False the last batch may be short."""
        if batch_size <= 0:
            raise MonosemError(f"batch_size must be > 0, got {batch_size}")
        contexts = iter(self)
        try:
            while True:
                chunk = [c for _, c in zip(range(batch_size), contexts)]  # pulls no extra context
                if not chunk:
                    return
                tokens = torch.from_numpy(np.stack([t for t, _ in chunk]).astype(np.int64))
                yield tokens, torch.tensor([i for _, i in chunk], dtype=torch.int64)  # [B, T], [B]
                if len(chunk) < batch_size:
                    return
        finally:
            contexts.close()

    def state_dict(self) -> dict:
        """JSON-serialisable position right after the last context yielded."""
        return {**self._identity(), "next_worker": self._next_worker,
                "workers": [{"epoch": e, "shard": p, "offset": o} for e, p, o in self._states]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (a state_dict() of a stream with the same data and settings)."""
        for key, want in self._identity().items():
            if state.get(key) != want:
                raise MonosemError(f"stream state {key}={state.get(key)!r} does not match this "
                                   f"stream's {key}={want!r}")
        try:
            workers = [(int(w["epoch"]), int(w["shard"]), int(w["offset"]))
                       for w in state["workers"]]
            next_worker = int(state["next_worker"])
        except (KeyError, TypeError, ValueError) as e:
            raise MonosemError(f"stream state is malformed ({e!r}): {state}") from None
        if len(workers) != len(self._states) or not 0 <= next_worker < len(workers):
            raise MonosemError(f"stream state has {len(workers)} workers / next_worker "
                               f"{next_worker}, this stream has {len(self._states)}")
        self._states, self._next_worker = workers, next_worker

    def _identity(self) -> dict:
        r = self.reader
        return {"format": STATE_FORMAT, "split": self.split, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.num_workers, "seed": self.seed,
                "shuffle_shards": r.shuffle_shards, "shuffle_contexts": r.shuffle_contexts,
                "n_shards": len(r.paths), "block": BLOCK}
