"""The shared training skeleton's parts on their own: the run lock, the resume checks, the stop flag.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_loop.py
"""
import json
import os
import signal
import socket
import subprocess

import pytest
import torch

from monosem.checkpoint import save_checkpoint
from monosem.errors import MonosemError
from monosem.loop import Run, RunLock, StopFlag


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    a, b = RunLock(tmp_path, "train-sae"), RunLock(tmp_path, "train-sae")
    a.acquire()
    with pytest.raises(MonosemError, match=rf"in use by another train-sae process \(pid {os.getpid()} on "
                                           rf"host {socket.gethostname()}"):
        b.acquire()
    a.release()
    b.acquire()  # free again
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    b.release()
    assert not (tmp_path / "LOCK").exists()


def test_stale_lock_of_a_dead_pid_is_taken_over_but_not_another_hosts(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = RunLock(tmp_path, "train-lm")
    lock.acquire()
    assert f"dead pid {dead.pid}" in capsys.readouterr().err
    lock.release()
    (tmp_path / "LOCK").write_text(json.dumps({"pid": dead.pid, "host": "elsewhere"}))
    with pytest.raises(MonosemError, match="on host elsewhere.*remove .*LOCK"):
        RunLock(tmp_path, "train-lm").acquire()


def test_resume_checks(tmp_path):
    save_checkpoint(tmp_path, 10, tensors={"w": torch.zeros(1)}, state={"world_size": 1, "lm_identity": "aaa"})
    with pytest.raises(MonosemError, match="already holds checkpoints.*--resume"):
        with Run(tmp_path, "train-sae", total=20, resume=False):
            pass
    assert not (tmp_path / "LOCK").exists()  # a refused start leaves no lock behind
    with pytest.raises(MonosemError, match="lm_identity aaa, but the LM on disk now has lm_identity bbb"):
        with Run(tmp_path, "train-sae", total=20, resume=True, expect={"lm_identity": ("bbb", "the LM")}):
            pass
    with Run(tmp_path, "train-sae", total=20, resume=True, expect={"lm_identity": ("aaa", "the LM")}) as run:
        assert run.step == 10 and not run.finished and (tmp_path / "LOCK").exists()
    with Run(tmp_path, "train-sae", total=10, resume=True) as run:
        assert run.finished
    save_checkpoint(tmp_path, 20, tensors={}, state={"world_size": 3})
    with pytest.raises(MonosemError, match="written by 3 processes.*now 1"):
        with Run(tmp_path, "train-sae", total=30, resume=True):
            pass


def test_check_refuses_non_finite_losses_and_sees_signals(tmp_path):
    with Run(tmp_path, "train-sae", total=5, resume=False) as run:
        assert run.check(1, {"sae": 1.0}) is False
        os.kill(os.getpid(), signal.SIGTERM)  # the flag, not the default handler: the test goes on
        assert run.check(2, {"sae": 1.0}) is True
        with pytest.raises(MonosemError, match=r"loss is not finite at step 3 \({'sae': nan}"):
            run.check(3, {"sae": float("nan")})
    assert signal.getsignal(signal.SIGTERM) is not StopFlag._handle


def test_writer_purges_after_the_checkpoint_step(tmp_path):
    from monosem.metrics import read_scalars

    with Run(tmp_path, "train-sae", total=30, resume=False) as run:
        w = run.writer(tmp_path / "tb" / "sae")
        for s in (5, 10, 15):
            w.scalars(s, {"train/loss": float(s)})
    save_checkpoint(tmp_path, 10, tensors={}, state={"world_size": 1})  # killed after logging 15
    with Run(tmp_path, "train-sae", total=30, resume=True) as run:
        w = run.writer(tmp_path / "tb" / "sae")
        for s in (15, 20):
            w.scalars(s, {"train/loss": float(s) + 0.5})
    events = read_scalars(tmp_path / "tb" / "sae")["train/loss"]
    assert events == [(5, 5.0), (10, 10.0), (15, 15.5), (20, 20.5)]


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, capsys):
    """One warning line naming the field when /proc/cpuinfo lists no bf16 instructions; none when it
    does, and none for a GPU."""
    from monosem import dist

    plain, bf16 = tmp_path / "cpuinfo", tmp_path / "cpuinfo-bf16"
    plain.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    bf16.write_text("flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    assert dist.warn_emulated_bf16(torch.device("cpu"), "train_sae.bf16", str(plain))
    err = capsys.readouterr().err
    assert err.startswith("monosem: warning: train_sae.bf16 = true") and err.count("\n") == 1, err
    assert not dist.warn_emulated_bf16(torch.device("cpu"), "train_sae.bf16", str(bf16))
    assert not dist.warn_emulated_bf16(torch.device("cuda", 0), "train_lm.bf16", str(plain))
    assert capsys.readouterr().err == ""
