"""LM training tests on a real (tiny) shard set: 2-process data parallel, exact resume, beating unigrams;
and the dist helpers under a real 2-process torchrun.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_train_lm.py
"""
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch

from monosem.checkpoint import load_checkpoint
from monosem.configfile import load_config, to_toml
from monosem.errors import MonosemError
from monosem.files import write_text_atomic
from monosem.lm import lm_identity, load_lm
from monosem.train_lm import lr_at, train_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 25  # resume test: N steps, then N more


def structured_text(seed: int, n_sentences: int) -> str:
    """Sentences that follow a fixed successor map: many word types (high unigram entropy), but
    each next word is predictable from the previous one, so a 1-layer LM soon beats unigrams."""
    rng = random.Random(seed)
    words = ("the a cat dog bird fish sat ran flew swam on under over near mat log tree pond quickly "
             "slowly today again red blue green big small old new hot cold").split()
    succ = {w: words[(i * 7 + 3) % len(words)] for i, w in enumerate(words)}
    sentences = []
    for _ in range(n_sentences):
        w = rng.choice(words)
        chain = [w] + [w := succ[w] for _ in range(rng.randint(3, 7))]
        sentences.append(" ".join(chain) + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from monosem.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (root / f"doc{i}.txt").write_text(structured_text(i, 1200))
    cfg = load_config(os.path.join(ROOT, "configs/tiny.toml"), [
        f"--run.root={root}", f"--data.source={root}/doc*.txt", "--data.max_tokens=0",
        "--data.ctx_len=16", "--data.contexts_per_shard=64", "--data.val_fraction=0.1"])
    prepare(cfg)
    return cfg.data_dir


def make_cfg(data_dir, root, name, *extra):
    return load_config(os.path.join(ROOT, "configs/tiny.toml"), [
        f"--run.root={root}", f"--run.name={name}", f"--data.dir={data_dir}", "--data.ctx_len=16",
        "--data.contexts_per_shard=64", "--data.val_fraction=0.1", "--data.max_tokens=0",
        "--lm.d_model=32", "--lm.n_head=2", "--lm.d_mlp=64", "--train_lm.batch_size=8",
        "--train_lm.lr=1e-2", "--train_lm.warmup_steps=3", "--train_lm.eval_batches=4", *extra])


def read_scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={SCALARS: 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def val_unigram_entropy(data_dir) -> float:
    """Independent reference: read the val tars directly, count tokens, entropy in float64."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    counts = np.zeros(50304, dtype=np.int64)
    for entry in manifest["splits"]["val"]["shards"]:
        with tarfile.open(data_dir / entry["name"]) as tar:
            for m in tar.getmembers():
                counts += np.bincount(np.load(io.BytesIO(tar.extractfile(m).read())), minlength=50304)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted single-process run of 2N steps, checkpoints every N (both kept)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(data_dir, root, "full", f"--train_lm.steps={2 * N}", f"--train_lm.ckpt_every={N}",
                   f"--train_lm.eval_every={N}", "--train_lm.log_every=3", "--train_lm.keep_last=3")
    metrics = train_lm(cfg)
    return cfg, metrics, load_lm(cfg.lm_dir)


def test_lr_schedule():
    cfg = make_cfg("x", "y", "z", "--train_lm.steps=100", "--train_lm.warmup_steps=10")
    tc = cfg.train_lm
    assert lr_at(0, tc) == pytest.approx(tc.lr / 10) and lr_at(9, tc) == pytest.approx(tc.lr)
    assert lr_at(10, tc) == pytest.approx(tc.lr) and lr_at(100, tc) == pytest.approx(tc.min_lr)
    assert lr_at(55, tc) == pytest.approx((tc.lr + tc.min_lr) / 2)


def test_val_loss_beats_unigram_entropy(full_run, data_dir):
    cfg, metrics, lm = full_run
    assert metrics["unigram_entropy"] == pytest.approx(val_unigram_entropy(data_dir), rel=1e-9)
    assert metrics["val_loss"] < metrics["unigram_entropy"] - 0.2, metrics
    losses = read_scalars(cfg.lm_dir / "tb", "train/loss")
    assert losses[0][0] == 3 and losses[-1][0] == 2 * N and losses[-1][1] < losses[0][1]
    assert [s for s, _ in read_scalars(cfg.lm_dir / "tb", "val/loss")] == [N, 2 * N]
    assert lm_identity(cfg.lm_dir) == metrics["lm_identity"] == metrics["rank_identities"][0]
    assert json.loads((cfg.lm_dir / "metrics.json").read_text())["val_loss"] == metrics["val_loss"]


def test_resume_is_bit_identical(full_run):
    cfg, metrics, lm = full_run
    final = load_checkpoint(cfg.lm_dir)
    assert final.step == 2 * N
    with pytest.raises(MonosemError, match="--resume"):
        train_lm(cfg)  # checkpoints there and no --resume: refuse to mix two runs
    # A run killed between step N and 2N leaves exactly this: step-N complete, `latest` naming it.
    half = cfg.lm_dir / f"step-{N:06d}"
    shutil.rmtree(final.path)
    write_text_atomic(cfg.lm_dir / "latest", half.name + "\n")
    assert lm_identity(cfg.lm_dir) != metrics["lm_identity"]
    resumed = train_lm(cfg, resume=True)
    assert resumed["lm_identity"] == metrics["lm_identity"]
    again = load_lm(cfg.lm_dir)
    for (k, a), (k2, b) in zip(lm.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    redo = load_checkpoint(cfg.lm_dir)
    assert redo.rank_state(0)["stream"] == final.rank_state(0)["stream"]
    assert resumed["val_loss"] == metrics["val_loss"] and resumed["train_loss"] == metrics["train_loss"]
    opt_a, opt_b = final.load_object("optimizer"), redo.load_object("optimizer")
    for i, s in opt_a["state"].items():
        assert all(torch.equal(s[k], opt_b["state"][i][k]) for k in s)


def launch_env(tmp_path):
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}


def test_two_process_data_parallel(data_dir, tmp_path):
    cfg = make_cfg(data_dir, tmp_path / "runs", "ddp", "--train_lm.steps=8", "--train_lm.log_every=2",
                   "--train_lm.eval_every=8", "--train_lm.ckpt_every=4")
    toml = tmp_path / "ddp.toml"
    toml.write_text(to_toml(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "-m", "monosem", "train-lm", str(toml)]
    proc = subprocess.run(cmd, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"LM weights: {cfg.lm_dir / 'step-000008'}" in proc.stdout
    metrics = json.loads((cfg.lm_dir / "metrics.json").read_text())
    ids = metrics["rank_identities"]
    assert len(ids) == 2 and ids[0] == ids[1] == lm_identity(cfg.lm_dir)  # same weights on both ranks
    ck = load_checkpoint(cfg.lm_dir)
    assert ck.state["world_size"] == 2 and [ck.rank_state(r)["stream"]["rank"] for r in (0, 1)] == [0, 1]
    losses = [v for _, v in read_scalars(cfg.lm_dir / "tb", "train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert math.isfinite(metrics["val_loss"])
    # resuming under another world size is refused, naming both sizes
    with pytest.raises(MonosemError, match="2 processes.*now 1"):
        train_lm(cfg, resume=True)


DIST_SCRIPT = textwrap.dedent("""
    import torch
    from monosem import dist
    from monosem.config import Config
    acc = dist.make_accelerator(Config())
    r, w = dist.rank(), dist.world_size()
    assert acc.num_processes == w == 2 and dist.is_main() == (r == 0)
    x = torch.arange(3 * (r + 1) * 2, dtype=torch.float32).reshape(3 * (r + 1), 2) + 100 * r  # [3 or 6, 2]
    cat = dist.all_gather_cat(x)
    want = torch.cat([torch.arange(6.).reshape(3, 2), torch.arange(12.).reshape(6, 2) + 100])
    assert torch.equal(cat, want), cat
    assert dist.all_reduce_sum(torch.tensor([r + 1.0])).item() == 3.0
    assert dist.all_reduce_max(torch.tensor([float(r)])).item() == 1.0
    assert torch.equal(dist.broadcast_(torch.tensor([r + 5]), src=1), torch.tensor([6]))
    assert dist.broadcast_object({"r": r}, src=0) == {"r": 0}
    assert dist.gather_objects(("rank", r)) == [("rank", 0), ("rank", 1)]
    assert dist.any_flags([r == 1, False]) == [True, False]
    assert dist.mean_float(r) == 0.5
    rows = x[:, :1].clone()
    picked = dist.gather_chosen(rows[:, 0], rows, lambda v: torch.argsort(v, descending=True)[:4])
    assert torch.equal(picked, want[:, :1][torch.argsort(want[:, 0], descending=True)[:4]]), picked
    dist.barrier()
    dist.teardown(acc)
    print("DIST-OK", r, flush=True)
""")


def test_dist_helpers_two_processes(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(DIST_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script)]
    proc = subprocess.run(cmd, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DIST-OK 0" in proc.stdout and "DIST-OK 1" in proc.stdout


def test_dist_helpers_single_process_are_identities():
    from monosem import dist

    x = torch.randn(4, 3)
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    assert dist.all_gather_cat(x) is x and dist.all_reduce_sum(x) is x and dist.broadcast_(x) is x
    assert dist.gather_objects({"a": 1}) == [{"a": 1}] and dist.broadcast_object(3) == 3
    assert dist.any_flags([False, True]) == [False, True] and dist.mean_float(2.5) == 2.5
    assert torch.equal(dist.gather_chosen(x[:, 0], x, lambda v: torch.tensor([2, 0])), x[[2, 0]])
