"""Ring + shuffle pool with a real spawned producer process running SyntheticSource (no LM).

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_buffer.py
"""
import gc
import io
import multiprocessing
import os
import re
import resource
import time

import pytest
import torch

import monosem.buffer
from monosem.buffer import STATE_FORMAT, ActivationBuffer
from monosem.config import Config, ConfigError
from monosem.errors import MonosemError
from monosem.pool import shuffle_stats
from monosem.producer import SyntheticSource, synthetic_vectors
from monosem.segment import DTYPES, SLOTS, VECTORS, WAITING, Staging, check_room

D, T = 16, 8


def make_cfg(**buffer) -> Config:
    cfg = Config()
    cfg.sae.d_in, cfg.data.ctx_len = D, T
    cfg.buffer.slot_vectors, cfg.buffer.n_slots, cfg.buffer.pool_size = 32, 3, 128
    cfg.buffer.timeout_s = 2.0
    cfg.train_sae.batch_size = 40
    for k, v in buffer.items():
        setattr(cfg.buffer, k, v)
    return cfg


def source(cfg: Config, n_contexts: int | None) -> SyntheticSource:
    return SyntheticSource(D, T, cfg.buffer.tokens_per_context, n_contexts, seed=cfg.run.seed)


def my_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"monosem_{os.getpid()}_")]


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert my_segments() == []
    assert multiprocessing.active_children() == []


def check_every_context_once(ids: torch.Tensor, n_contexts: int, k: int) -> None:
    """ids hold, for each of the n contexts, k distinct positions (all T if k is 0), each once. Derived
    from the source's contract, not from the function that picks the positions."""
    assert len(set(ids.tolist())) == len(ids)                                     # nothing twice
    per_ctx = torch.bincount(ids // T, minlength=n_contexts)
    assert per_ctx.tolist() == [k or T] * n_contexts                                # nothing lost


def drain(buf: ActivationBuffer, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, ids) for x, ids in buf.batches(batch_size)]


@pytest.mark.parametrize("dtype,k,spare,device", [("fp32", 0, 1.0, None), ("bf16", 5, 1.0, "cpu"),
                                                  ("fp16", 0, 1.0, None), ("fp32", 0, 0.0, "cpu")])
def test_every_vector_exactly_once_with_its_own_values(dtype, k, spare, device):
    cfg, n_ctx, B = make_cfg(dtype=dtype, tokens_per_context=k, spare_fraction=spare), 61, 40
    with ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, n_ctx), loop=False) as buf:
        batches = list(buf.batches(B, device))
        with pytest.raises(StopIteration):
            buf.next_batch(B)
        moved = buf.stats()["vectors_moved"]
    assert moved > 0 or spare > 0                               # no spare block: rows must move
    ids = torch.cat([i for _, i in batches])
    check_every_context_once(ids, n_ctx, k)
    assert all(len(i) == B for _, i in batches[:-1]) and 0 < len(batches[-1][1]) <= B
    for x, i in batches:
        assert len(set(i.tolist())) == len(i)                    # without replacement
        assert x.dtype == torch.float32 and x.shape == (len(i), D)
        assert torch.equal(x, synthetic_vectors(i, D).to(DTYPES[dtype]).float())


def test_shuffle_quality_near_uniform_and_order_is_seeded():
    cfg, B = make_cfg(), 40
    with ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, 400), loop=False) as buf:
        quality = []
        for _ in buf.batches(B):
            quality.append(buf.stats()["shuffle_quality"])
    mean = sum(quality) / len(quality)
    assert 0.8 < mean < 1.2, quality
    # a batch of consecutive stream vectors (no shuffling) is far from uniform
    pool = torch.arange(128) // T
    assert shuffle_stats(pool[:B], pool)["shuffle_quality"] > 3


def test_shuffle_stats_match_monte_carlo_reference():
    sizes = [1, 1, 2, 3, 5, 8, 13, 21]
    pool_ctx = torch.cat([torch.full((m,), c) for c, m in enumerate(sizes)])     # N = 54
    B, draws, g = 10, 20000, torch.Generator().manual_seed(1)
    shared = same = 0.0
    for _ in range(draws):
        ctx = pool_ctx[torch.randperm(len(pool_ctx), generator=g)[:B]].tolist()
        counts = {c: ctx.count(c) for c in ctx}
        shared += sum(counts[c] > 1 for c in ctx) / B
        same += sum(counts[c] - 1 for c in ctx) / B
    s = shuffle_stats(pool_ctx[:B], pool_ctx)
    assert s["shuffle_shared_frac_expected"] == pytest.approx(shared / draws, abs=0.01)
    assert s["shuffle_same_ctx_expected"] == pytest.approx(same / draws, abs=0.02)


def wait_until(cond, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def test_backpressure_both_ways_and_fill_rule():
    cfg = make_cfg()
    buf = ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, None))
    h = buf.shared.header
    wait_until(lambda: h[SLOTS] == 3 and h[WAITING] == 1, "producer fills the ring and waits")
    time.sleep(0.3)
    assert h[SLOTS] == 3 and h[VECTORS] == 3 * 32          # a full ring blocks the producer
    assert buf.stats()["ring_fill"] == 1.0 and buf.stats()["fill"] == 0.0
    x, ids = buf.next_batch(40)                              # pool tops up while it has room for a slot
    assert buf.pool.n == 128 - 40 and len(ids) == 40
    wait_until(lambda: h[SLOTS] == 3 + 4 and h[WAITING] == 1, "producer refills the freed slots")
    s = buf.stats()
    assert s["producer_wait_s"] > 0 and s["consumer_wait_s"] > 0 and s["vectors_delivered"] == 40
    with pytest.raises(ConfigError, match="pool_size"):
        buf.next_batch(128 - 32 + 1)
    proc = buf.proc
    del buf, h, s                                            # the finalizer stops it without close()
    gc.collect()
    assert not proc.is_alive() and my_segments() == []


@pytest.mark.parametrize("spare", [1.0, 0.0])  # 0: rows move, and the resumed layout differs
def test_resume_continues_bit_identically(spare):
    cfg = make_cfg(dtype="bf16", tokens_per_context=5, pool_size=96, spare_fraction=spare)
    n_ctx, B, cut = 150, 24, 7
    with ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, n_ctx), loop=False) as buf:
        full, state = [], None
        for batch in buf.batches(B):
            full.append(batch)
            if len(full) == cut:      # snapshot mid-run; the slots left in the ring are discarded
                f = io.BytesIO()
                torch.save(buf.state_dict(), f)
                state = torch.load(io.BytesIO(f.getvalue()), weights_only=True)
    assert 0 < len(state["pool"]["ids"]) and state["pool"]["acts"].dtype == torch.bfloat16
    with ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, n_ctx), loop=False,
                          state=state) as buf:
        rest = drain(buf, B)
        moved = buf.stats()["vectors_moved"]
    assert moved > 0 or spare > 0
    assert len(rest) == len(full) - cut
    for (x, i), (x2, i2) in zip(full[cut:], rest):
        assert torch.equal(i, i2) and torch.equal(x, x2)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="buffer.slot_vectors"):
        ActivationBuffer(make_cfg(slot_vectors=T - 1, pool_size=64), rank=0, world_size=1,
                         source=source(make_cfg(), 1))
    with pytest.raises(ConfigError, match="buffer.pool_size"):
        ActivationBuffer(make_cfg(pool_size=40), rank=0, world_size=1, source=source(make_cfg(), 1))
    huge = make_cfg(pool_size=2**26)  # 2^26 x 512 x 4 B = 128 GiB of shared memory
    huge.sae.d_in = 512
    with pytest.raises(MonosemError, match="/dev/shm"):
        ActivationBuffer(huge, rank=0, world_size=1, source=SyntheticSource(512, T, n_contexts=1))
    state = {"format": STATE_FORMAT, "dtype": "fp16", "d_in": D}
    with pytest.raises(ConfigError, match="buffer.dtype"):
        ActivationBuffer(make_cfg(), rank=0, world_size=1, source=source(make_cfg(), 1), state=state)


def test_huge_pool_size_is_refused_before_anything_is_allocated(monkeypatch):
    class NoPool(monosem.buffer.Pool):
        def __init__(self, *args):
            raise AssertionError("the pool's bookkeeping was allocated before the room check")

    class NoSegment(monosem.buffer.SharedPool):
        def __init__(self, *args):
            raise AssertionError("the segment was created before the room check")
    monkeypatch.setattr(monosem.buffer, "Pool", NoPool)
    monkeypatch.setattr(monosem.buffer, "SharedPool", NoSegment)
    cfg = make_cfg(pool_size=1_000_000_000)   # ~2e9 rows: 150 GB of segment, 24 GB of bookkeeping
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                    # KiB, peak so far
    with pytest.raises(MonosemError) as e:
        ActivationBuffer(cfg, rank=0, world_size=1, source=source(cfg, 1))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100 * 1024
    msg = str(e.value)
    assert "buffer.pool_size = 1000000000" in msg and "/dev/shm has" in msg
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    needed, shown_free = (int(m.replace(",", "")) for m in re.findall(r"([\d,]+) bytes \(", msg))
    assert needed > 1e11 and abs(shown_free - free) < 2**30


def test_bookkeeping_that_does_not_fit_in_memory_is_refused():
    with pytest.raises(MonosemError, match=r"buffer.pool_size = 7 needs 1,152,921,504,606,846,976 bytes "
                                           r".* of host memory for the shuffle pool's bookkeeping"):
        check_room(0, 2**60, pool_size=7)
    check_room(0, 1024, pool_size=7)  # fits: no error


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_staging_gathers_the_drawn_rows_as_float32(dtype):
    acts = torch.randn(50, D).to(DTYPES[dtype])                 # [R, d_in] like the segment
    rows, staging = torch.tensor([7, 3, 49, 0, 3]), Staging()
    x = staging.gather(acts, rows, torch.device("cpu"))
    assert x.dtype == torch.float32 and torch.equal(x, acts[rows].float())
    assert staging.host == [None, None]                          # the host needs no staging copy


def test_unexpected_producer_error_keeps_its_traceback():
    cfg = make_cfg()
    bad = SyntheticSource(D, T, n_contexts=5, dtype="fp64")         # not a storage dtype: KeyError
    buf = ActivationBuffer(cfg, rank=0, world_size=1, source=bad, loop=False)
    with pytest.raises(MonosemError, match=r"(?s)producer of rank 0 failed:\nTraceback.*KeyError: 'fp64'"):
        drain(buf, 40)
    assert not buf.proc.is_alive()


class UnpicklableSource(SyntheticSource):
    def __reduce__(self):
        raise TypeError("this source cannot travel to a spawned process")


def failing_cpu_threads(setting: int) -> int:
    raise RuntimeError("failed while preparing the producer")


@pytest.mark.parametrize("where", ["before the producer exists", "starting it"])
def test_a_buffer_that_fails_to_start_leaves_no_segment(monkeypatch, where):
    """The segment exists from the start of _start: an error before the producer runs must unlink it
    (the autouse fixture checks /dev/shm and child processes)."""
    cfg = make_cfg()
    if where == "starting it":
        src, err = UnpicklableSource(D, T, n_contexts=5), "cannot travel"
    else:
        monkeypatch.setattr(monosem.buffer.dist, "cpu_threads", failing_cpu_threads)
        src, err = source(cfg, 5), "preparing the producer"
    with pytest.raises((TypeError, RuntimeError), match=err):
        ActivationBuffer(cfg, rank=0, world_size=1, source=src, loop=False)
    gc.collect()


class ThreadsSource:
    """Every vector of a context holds the producer's torch thread count when the context was made;
    20 ms per context, so a consumer that asks for a batch waits for it."""

    def __init__(self, n_contexts: int):
        self.n_contexts = n_contexts

    def contexts(self, state: dict | None):
        for i in range(state["next"] if state else 0, self.n_contexts):
            time.sleep(0.02)
            yield torch.full((T, D), float(torch.get_num_threads())), i * T + torch.arange(T), {"next": i + 1}


@pytest.mark.parametrize("wait_threads, trainer_threads, expected", [(2, 0, 2), (1, 0, 1), (0, 1, 1)])
def test_producer_takes_wait_threads_while_the_trainer_waits(wait_threads, trainer_threads, expected):
    """buffer.producer_wait_threads (0: the trainer's threads, train_sae.threads) while the consumer blocks
    on a slot, producer_threads while it does not (here: a pause in which the producer fills the slots
    lent to it)."""
    n = 40
    cfg = make_cfg(producer_threads=1, producer_wait_threads=wait_threads, slot_vectors=4 * T, n_slots=3,
                   pool_size=16 * T)
    cfg.train_sae.threads = trainer_threads
    with ActivationBuffer(cfg, rank=0, world_size=1, source=ThreadsSource(n), loop=False) as buf:
        first = buf.next_batch(2 * T)[0]         # the pool fills while the consumer waits
        time.sleep(0.6)                           # the producer fills its 3 lent slots meanwhile
        rest = torch.cat([x for x, _ in buf.batches(2 * T)])
        counted = buf.stats()["producer_wait_thread_contexts"]
    threads = torch.cat([first, rest])[:, 0]
    assert len(threads) == n * T
    assert (threads == 1).any()                  # made while the consumer slept
    if expected == 2:
        assert (threads == 2).any() and counted > 0
    else:
        assert (threads == 1).all() and counted == 0
