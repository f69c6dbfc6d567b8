"""What goes wrong in real use, and what the user sees: run locks, resume checks, damaged checkpoints,
divergence, signals, finished runs (each on real shards, a real LM and real `monosem` processes).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_failures.py
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from monosem.checkpoint import latest_checkpoint, load_checkpoint
from monosem.cli import main as cli_main
from monosem.lm import LM, lm_identity, save_lm
from monosem.metrics import read_scalars
from monosem.train_sae import train

from tinyrun import TINY, env1, make_sae_root, sae_cfg, sae_command, sae_overrides


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_sae_root(tmp_path_factory.mktemp("fail"))


def cli(capsys, *args: str) -> tuple[int, str]:
    """monosem's CLI in this process -> (exit code, stderr)."""
    capsys.readouterr()
    rc = cli_main(list(args))
    return rc, capsys.readouterr().err


def wait_for(predicate, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the test could act on it"


def test_a_changed_lm_is_refused_on_resume(root, capsys):
    cfg = sae_cfg(root, "lmswap", "--train_sae.steps=10")
    cfg.lm_dir.unlink()  # its own LM, not the shared one
    torch.manual_seed(1)
    save_lm(LM(cfg.lm, cfg.data.ctx_len), cfg, cfg.lm_dir)
    before = lm_identity(cfg.lm_dir)
    train(cfg)
    torch.manual_seed(2)  # the LM is retrained (or replaced) after the SAE was trained on it
    save_lm(LM(cfg.lm, cfg.data.ctx_len), cfg, cfg.lm_dir)
    after = lm_identity(cfg.lm_dir)
    rc, err = cli(capsys, "train-sae", str(TINY), *sae_overrides(root, "lmswap", "--train_sae.steps=20"),
                  "--resume")
    assert rc == 2 and before in err and after in err and "refusing to resume" in err, err
    ck = load_checkpoint(cfg.sae_dir)
    assert ck.step == 10 and ck.state["lm_identity"] == before  # nothing was written


def test_a_second_writer_is_refused_and_the_first_is_untouched(root, capsys):
    first = subprocess.Popen(sae_command(root, "locked", "--train_sae.steps=100000", "--train_sae.ckpt_every=5",
                                         "--sae.l1_coeff=0.001"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env1())
    cfg = sae_cfg(root, "locked")
    wait_for(lambda: latest_checkpoint(cfg.sae_dir) is not None, first)
    for extra in (["--sae.l1_coeff=0.005"], ["--resume"]):  # another λ; or resuming the live run
        rc, err = cli(capsys, "train-sae", str(TINY), *sae_overrides(root, "locked", *extra))
        assert rc == 2 and "in use by another train-sae process" in err and f"pid {first.pid}" in err, err
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    ck = latest_checkpoint(cfg.sae_dir)
    assert json.loads((ck / "sae" / "cfg.json").read_text())["l1_coeff"] == 0.001
    assert not (cfg.sae_dir / "LOCK").exists()
    steps = [s for s, _ in read_scalars(cfg.sae_dir / "tb" / "sae")["train/loss"]]
    assert steps == sorted(set(steps)), "duplicated TensorBoard steps"


def test_a_stale_lock_of_a_dead_process_is_taken_over(root, capsys):
    cfg = sae_cfg(root, "stale", "--train_sae.steps=5", "--train_sae.eval_every=0")
    dead = subprocess.Popen(["true"])
    dead.wait()
    cfg.sae_dir.mkdir(parents=True, exist_ok=True)
    import socket
    (cfg.sae_dir / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    rc, err = cli(capsys, "train-sae", str(TINY), *sae_overrides(root, "stale", "--train_sae.steps=5",
                                                                 "--train_sae.eval_every=0"))
    assert rc == 0 and "stale lock" in err and str(dead.pid) in err, err
    assert load_checkpoint(cfg.sae_dir).step == 5 and not (cfg.sae_dir / "LOCK").exists()


@pytest.mark.parametrize("part", ["sae/model.safetensors", "sae/optimizer.pt", "rank0.pt"])
def test_a_damaged_checkpoint_names_the_file_and_the_good_one(root, capsys, part):
    cfg = sae_cfg(root, "damaged")
    if latest_checkpoint(cfg.sae_dir) is None:
        train(cfg)  # step-000010 and step-000020
    bad = cfg.sae_dir / "step-000020" / part
    saved = bad.read_bytes()
    bad.write_bytes(torch.randint(0, 256, (len(saved),), dtype=torch.uint8).numpy().tobytes())
    try:
        rc, err = cli(capsys, "train-sae", str(TINY), *sae_overrides(root, "damaged", "--train_sae.steps=30"),
                      "--resume")
    finally:
        bad.write_bytes(saved)
    assert rc == 2, err
    assert f"step-000020/{part}" in err and "step-000010 is intact" in err, err
    assert "Traceback" not in err and "weights_only=False" not in err, err


def test_divergence_on_a_fresh_run_is_one_line_and_leaves_nothing(root, capsys):
    args = sae_overrides(root, "diverge", "--train_sae.lr=1e38", "--train_sae.eval_every=0")
    sae_cfg(root, "diverge")
    rc, err = cli(capsys, "train-sae", str(TINY), *args)
    lines = [line for line in err.splitlines() if line.startswith("monosem:")]
    assert rc == 2 and len(lines) == 1 and "train_sae.lr = 1e+38" in lines[0], err
    assert "not finite" in lines[0] or "optimizer step failed" in lines[0], err
    assert "Traceback" not in err
    sae_dir = root / "diverge" / "sae"
    assert not (sae_dir / "tb").exists() and not (sae_dir / "LOCK").exists()
    assert latest_checkpoint(sae_dir) is None


def test_train_lm_checkpoints_on_sigterm_and_a_finished_run_does_nothing(root, tmp_path, capsys):
    args = [str(TINY), f"--run.root={tmp_path}", "--run.name=lmrun", f"--data.dir={root / 'data'}",
            "--data.max_tokens=60000", "--data.contexts_per_shard=128", "--train_lm.steps=100000",
            "--train_lm.log_every=2", "--train_lm.ckpt_every=100000", "--train_lm.eval_every=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "monosem", "train-lm", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env1())
    lm_dir = tmp_path / "lmrun" / "lm"
    wait_for(lambda: (lm_dir / "tb").is_dir() and "train/loss" in read_scalars(lm_dir / "tb"), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in err, err[-3000:]
    step = load_checkpoint(lm_dir).step
    assert 2 <= step < 100000
    events = sorted(p.name for p in (lm_dir / "tb").iterdir())
    rc, err = cli(capsys, "train-lm", *args[:-3], f"--train_lm.steps={step}", "--resume")
    assert rc == 0 and sorted(p.name for p in (lm_dir / "tb").iterdir()) == events
    assert load_checkpoint(lm_dir).step == step


def _shard_of_rank(data_dir, rank: int):
    return sorted(data_dir.glob("train-*.tar"))[rank]


def test_two_ranks_one_truncated_shard_both_exit_fast_naming_it(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    shard = _shard_of_rank(data, 1)  # shard i goes to rank i % 2
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    cmd = sae_command(root, "trunc", f"--data.dir={data}", "--train_sae.steps=1000", nproc=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env1())
    first_error, lines = None, []
    for line in proc.stderr:  # timestamps of the report, as it arrives
        lines.append(line)
        if first_error is None and line.startswith("monosem: error"):
            first_error = time.time()
    proc.wait(timeout=60)
    done = time.time()
    errors = [line for line in lines if line.startswith("monosem: error")]
    assert proc.returncode != 0 and errors, "".join(lines)[-4000:]
    assert shard.name in errors[0], "".join(lines)[-4000:]
    assert done - first_error < 10, f"{done - first_error:.1f} s from the first error to the exit"
    print(f"\ntruncated shard: all ranks out {done - first_error:.1f} s after the first error:\n{errors[0]}")


def _descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_two_ranks_a_killed_producer_stops_both_fast(root):
    cmd = sae_command(root, "prodkill", "--train_sae.steps=100000", "--train_sae.ckpt_every=100000", nproc=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env1())
    tb = root / "prodkill" / "sae" / "tb" / "sae"
    wait_for(lambda: tb.is_dir() and "train/loss" in read_scalars(tb), proc)
    below = _descendants(proc.pid)
    producers = [p for p in below if Path(f"/proc/{p}/comm").read_text().strip() == "monosem-prod-1"]
    assert len(producers) == 1, producers
    os.kill(producers[0], signal.SIGKILL)
    killed = time.time()
    out, err = proc.communicate(timeout=60)
    errors = [line for line in err.splitlines() if line.startswith("monosem: error")]
    assert proc.returncode != 0 and errors and "producer of rank 1" in errors[0], err[-4000:]
    assert time.time() - killed < 10, f"{time.time() - killed:.1f} s from the kill to the exit"
    assert not [f for p in below for f in Path("/dev/shm").glob(f"monosem_{p}_*")], "segments left"
    print(f"\nkilled producer: all ranks out {time.time() - killed:.1f} s after the kill:\n{errors[0]}")
