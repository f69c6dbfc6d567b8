"""The real producer: tiny real tar shards + a tiny saved LM (random weights) in a spawned process,
a real 2-process torchrun launch, and SIGKILL of either side.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_producer.py
"""
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from monosem.buffer import ActivationBuffer
from monosem.config import Config
from monosem.configfile import load_config, save_config
from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.lm import LM, load_lm, save_lm
from monosem.producer import keep_positions
from monosem.shards import write_shards

T, N_CTX, PER_SHARD, D_MLP = 16, 24, 4, 32
REPO = Path(__file__).resolve().parents[1]


def write_data(data_dir: Path, contexts: np.ndarray) -> None:
    """Train shards of `contexts` (ctx_id = row) + one val shard, and their manifest."""
    val = contexts[:2]
    splits = {"train": write_shards(contexts, np.arange(len(contexts)), data_dir, "train", PER_SHARD),
              "val": write_shards(val, np.arange(len(contexts), len(contexts) + 2), data_dir, "val", 2)}
    write_json_atomic(data_dir / "manifest.json", {
        "format": "monosem-shards/1", "tokenizer": "r50k_base", "n_vocab": 50257, "eot": 50256,
        "ctx_len": T, "source": "random", "data_config": {}, "versions": {},
        "splits": {k: {"contexts": sum(e["contexts"] for e in v), "tokens": sum(e["tokens"] for e in v),
                       "shards": v} for k, v in splits.items()}})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, token contexts [N, T]) of a run folder with shards in data/ and an LM in lm/."""
    cfg = Config()
    cfg.run.root, cfg.run.name = str(tmp_path_factory.mktemp("producer")), "p"
    cfg.data.ctx_len = T
    cfg.lm.d_model, cfg.lm.n_head, cfg.lm.d_mlp, cfg.sae.d_in = 16, 2, D_MLP, D_MLP
    b = cfg.buffer
    b.slot_vectors, b.n_slots, b.pool_size, b.producer_batch, b.timeout_s = 64, 3, 192, 3, 2.0
    contexts = np.random.default_rng(0).integers(0, 50257, (N_CTX, T)).astype(np.uint16)
    write_data(cfg.data_dir, contexts)
    torch.manual_seed(0)
    save_lm(LM(cfg.lm, T), cfg, cfg.lm_dir)
    save_config(cfg, cfg.run_dir)
    return cfg, contexts


def segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"monosem_{pid}_")]


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    assert segments(os.getpid()) == []
    assert multiprocessing.active_children() == []


def make_buffer(cfg: Config, **kw) -> ActivationBuffer:
    return ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir, **kw)


def test_one_epoch_every_activation_once_equal_to_float64_lm(run):
    cfg, contexts = run
    with make_buffer(cfg, loop=False) as buf:
        batches = list(buf.batches(50))
    x, ids = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(ids.tolist()) == list(range(N_CTX * T))
    lm64 = load_lm(cfg.lm_dir).double()
    ref = lm64.mlp_acts(torch.from_numpy(contexts.astype(np.int64)))       # [N, T, d_mlp] float64
    torch.testing.assert_close(x.double(), ref[ids // T, ids % T], rtol=1e-5, atol=1e-6)


def test_subsampled_resume_is_bit_identical(run):
    cfg, _ = run
    cfg = load_config(cfg.run_dir / "config.toml", ["--buffer.tokens_per_context=5"])
    cut, B = 4, 20
    with make_buffer(cfg, loop=False) as buf:
        full = []
        for batch in buf.batches(B):
            full.append(batch)
            if len(full) == cut:
                f = io.BytesIO()
                torch.save(buf.state_dict(), f)
    ids = torch.cat([i for _, i in full])
    assert sorted(ids.tolist()) == sorted(c * T + p for c in range(N_CTX)
                                          for p in keep_positions(cfg.run.seed, c, T, 5).tolist())
    state = torch.load(io.BytesIO(f.getvalue()), weights_only=True)
    with make_buffer(cfg, loop=False, state=state) as buf:
        rest = list(buf.batches(B))
    assert len(rest) == len(full) - cut
    for (x, i), (x2, i2) in zip(full[cut:], rest):
        assert torch.equal(i, i2) and torch.equal(x, x2)


def test_two_ranks_read_disjoint_halves_under_torchrun(run, tmp_path):
    cfg, _ = run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(REPO / "tests" / "buffer_ranks.py"), str(cfg.run_dir / "config.toml"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = set(ranks[0]["ids"]), set(ranks[1]["ids"])
    assert all(r["world"] == 2 and r["total"] == N_CTX * T for r in ranks)
    assert len(a) == len(ranks[0]["ids"]) and len(b) == len(ranks[1]["ids"]) and a and b
    assert not a & b and a | b == set(range(N_CTX * T))


def test_producer_exception_reaches_consumer_with_traceback(run, tmp_path):
    cfg, _ = run
    shutil.copytree(cfg.run_dir, tmp_path / "p")
    bad = tmp_path / "p" / "data" / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[:700])  # truncated
    cfg = load_config(tmp_path / "p" / "config.toml", [f"--run.root={tmp_path}"])
    buf = make_buffer(cfg, loop=False)
    with pytest.raises(MonosemError, match=r"(?s)producer of rank 0 failed:.*Traceback.*"
                                           r"ShardError.*train-000002\.tar"):
        list(buf.batches(50))
    assert not buf.proc.is_alive()


def test_sigkilled_producer_is_an_error_not_a_hang(run):
    cfg, _ = run
    buf = make_buffer(cfg)
    buf.next_batch(50)
    os.kill(buf.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(MonosemError, match="killed by signal 9"):
        for _ in range(1000):  # the pool and ring drain, then the consumer must notice
            buf.next_batch(50)
    print(f"SIGKILL noticed after {time.monotonic() - t0:.2f} s (timeout_s {cfg.buffer.timeout_s})")


CONSUMER = """
import sys, time
from monosem.buffer import ActivationBuffer
from monosem.configfile import load_config
cfg = load_config(sys.argv[1])
buf = ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir)
buf.next_batch(50)
print(buf.proc.pid, flush=True)
if sys.argv[2] == "crash":
    raise RuntimeError("the trainer crashes without closing its buffer")
time.sleep(600)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("how", ["sigkill", "crash"])
def test_dead_consumer_stops_its_producer_and_frees_the_segment(run, how):
    cfg, _ = run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, str(cfg.run_dir / "config.toml"), how],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        producer = int(consumer.stdout.readline())
        if how == "sigkill":
            assert segments(consumer.pid) and not gone(producer)
            consumer.send_signal(signal.SIGKILL)
        assert consumer.wait() != 0
        deadline = time.monotonic() + 60
        while not gone(producer) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(producer) and segments(consumer.pid) == []
        err = consumer.communicate(timeout=60)[1]  # also the resource tracker's stderr
        assert "leaked" not in err  # the segment was unlinked by us, not by Python's safety net
        if how == "crash":
            assert "RuntimeError: the trainer crashes" in err
    finally:
        consumer.kill()
        consumer.wait()
