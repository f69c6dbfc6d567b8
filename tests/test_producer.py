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
import torch.nn.functional as F

from monosem.buffer import ActivationBuffer
from monosem.config import Config
from monosem.configfile import load_config, save_config
from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.lm import LM, load_lm, save_lm
from monosem.producer import keep_positions, producer_device
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
    cfg.train_sae.batch_size = 50
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


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def mlp_acts_float64(lm_dir: Path, tokens: np.ndarray) -> torch.Tensor:
    """The hook layer's MLP post-activation [N, T, d_mlp], written out in float64 from the saved weights
    (embeddings, pre-LN causal attention, MLP), independent of monosem.lm's modules."""
    lm = load_lm(lm_dir)
    w = {k: v.double() for k, v in lm.state_dict().items()}
    tok = torch.from_numpy(tokens.astype(np.int64))
    N, L, H = *tok.shape, lm.cfg.n_head
    x = w["wte.weight"][tok] + w["wpe.weight"][:L]                         # [N, T, C]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(lm.hook + 1):
        p = lambda name: w[f"blocks.{i}.{name}"]  # noqa: E731
        h = layer_norm(x, p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = (h @ p("attn.c_attn.weight").T + p("attn.c_attn.bias")).chunk(3, dim=-1)
        q, k, v = (t.reshape(N, L, H, -1).transpose(1, 2) for t in (q, k, v))   # [N, H, T, hd]
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(N, L, -1)
        x = x + y @ p("attn.c_proj.weight").T + p("attn.c_proj.bias")
        pre = layer_norm(x, p("ln_2.weight"), p("ln_2.bias")) @ p("mlp.W_in.weight").T + p("mlp.W_in.bias")
        acts = F.gelu(pre) if lm.cfg.activation == "gelu" else pre.clamp(min=0)   # [N, T, d_mlp]
        x = x + acts @ p("mlp.W_out.weight").T + p("mlp.W_out.bias")
    return acts


def test_one_epoch_every_activation_once_equal_to_float64_lm(run):
    cfg, contexts = run
    with make_buffer(cfg, loop=False) as buf:
        batches = list(buf.batches(50))
    x, ids = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert sorted(ids.tolist()) == list(range(N_CTX * T))
    ref = mlp_acts_float64(cfg.lm_dir, contexts)                            # [N, T, d_mlp] float64
    torch.testing.assert_close(x.double(), ref[ids // T, ids % T], rtol=1e-5, atol=1e-6)


def test_subsampled_path_equals_float64_lm_at_the_positions_the_ids_name(run):
    cfg, contexts = run
    k = 5
    cfg = load_config(cfg.run_dir / "config.toml", [f"--buffer.tokens_per_context={k}"])
    with make_buffer(cfg, loop=False) as buf:
        batches = list(buf.batches(50))
    x, ids = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    ctx, pos = ids // T, ids % T
    assert len(set(ids.tolist())) == len(ids) == N_CTX * k                 # each once
    assert torch.bincount(ctx, minlength=N_CTX).tolist() == [k] * N_CTX      # k distinct per context
    subsets = {tuple(sorted(pos[ctx == c].tolist())) for c in range(N_CTX)}
    assert len(subsets) > N_CTX // 2                                          # not the same k everywhere
    ref = mlp_acts_float64(cfg.lm_dir, contexts)                             # [N, T, d_mlp] float64
    assert not torch.allclose(ref[:, 0], ref[:, 1])                          # positions are told apart
    torch.testing.assert_close(x.double(), ref[ctx, pos], rtol=1e-5, atol=1e-6)


def test_keep_positions_draws_k_distinct_uniform_positions():
    n, L, k = 24000, 16, 5
    subsets = [keep_positions(7, c, L, k).tolist() for c in range(n)]
    assert all(len(set(s)) == k and s == sorted(s) and 0 <= s[0] and s[-1] < L for s in subsets)
    # one position: Binomial(n, k/L) counts; chi-square over the L positions, variance-corrected
    counts = np.bincount(np.concatenate(subsets), minlength=L)
    e, q = n * k / L, k / L
    assert ((counts - e) ** 2 / (e * (1 - q))).sum() < 60            # 15 dof: p < 1e-6 past 60
    # pairs: every one of the C(L, 2) pairs equally likely (rules out e.g. runs of k neighbours)
    pairs = np.zeros((L, L))
    for s in subsets:
        pairs[np.ix_(s, s)] += 1
    pair_counts, e2 = pairs[np.triu_indices(L, 1)], n * k * (k - 1) / (L * (L - 1))
    assert ((pair_counts - e2) ** 2 / e2).sum() < 250                # 119 dof: p < 1e-10 past 250
    assert keep_positions(8, 0, L, k).tolist() != subsets[0] or keep_positions(8, 1, L, k).tolist() != subsets[1]
    assert keep_positions(7, 3, L, 0).tolist() == list(range(L)) == keep_positions(7, 3, L, L).tolist()


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
    assert len(set(ids.tolist())) == len(ids)
    assert torch.bincount(ids // T, minlength=N_CTX).tolist() == [5] * N_CTX
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


def test_corrupt_shard_is_one_line_naming_the_shard(run, tmp_path):
    cfg, _ = run
    shutil.copytree(cfg.run_dir, tmp_path / "p")
    bad = tmp_path / "p" / "data" / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[:700])  # truncated
    cfg = load_config(tmp_path / "p" / "config.toml", [f"--run.root={tmp_path}"])
    buf = make_buffer(cfg, loop=False)
    with pytest.raises(MonosemError) as e:
        list(buf.batches(50))
    assert str(bad) in str(e.value) and "truncated or corrupt" in str(e.value)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
    assert not buf.proc.is_alive() and buf.proc.exitcode == 1


def test_producer_is_named_in_proc_comm(run):
    cfg, _ = run
    with make_buffer(cfg) as buf:
        buf.next_batch(50)  # data has flowed: the producer named itself first thing
        assert Path(f"/proc/{buf.proc.pid}/comm").read_text().strip() == "monosem-prod-0"


def test_sigkilled_producer_is_noticed_within_timeout_s(run):
    cfg, _ = run
    buf = make_buffer(cfg)
    buf.next_batch(50)
    os.kill(buf.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(MonosemError, match="killed by signal 9"):
        for _ in range(1000):  # the pool and ring drain, then the consumer must notice
            buf.next_batch(50)
    noticed_s = time.monotonic() - t0
    assert noticed_s < cfg.buffer.timeout_s + 1.0, f"noticed after {noticed_s:.2f} s"


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


def test_producer_device_is_the_local_rank_gpu(monkeypatch):
    assert producer_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert producer_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)       # the mapping, without a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert producer_device("auto") == "cuda:1" and producer_device("cpu") == "cpu"
