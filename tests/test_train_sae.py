"""train-sae end to end on real shards, a real LM and real producer processes.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_train_sae.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from monosem.checkpoint import latest_checkpoint, load_checkpoint
from monosem.configfile import load_config
from monosem.errors import MonosemError
from monosem.metrics import read_histograms, read_images, read_scalars
from monosem.train_sae import train

from tinyrun import REPO, env1, launch_sae, make_sae_root, sae_cfg, sae_command, sae_overrides  # tests/tinyrun.py

TAGS = ["train/loss", "train/mse", "train/l1", "train/l0", "train/fvu", "train/lr",
        "features/dead_frac", "features/ultralow_frac", "features/resampled", "eval/loss_recovered",
        "perf/vectors_per_s", "perf/tokens_per_s", "buffer/fill", "buffer/producer_wait_s",
        "buffer/consumer_wait_s", "buffer/shuffle_quality"]
overrides, run_cfg, launch = sae_overrides, sae_cfg, launch_sae


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Token shards + a (random, frozen) LM shared by every run in this file."""
    return make_sae_root(tmp_path_factory.mktemp("sae"))


def final_weights(cfg, name: str = "sae") -> dict:
    ck = latest_checkpoint(cfg.sae_dir)
    from safetensors.torch import load_file

    return load_file(str(ck / name / "model.safetensors"))


def test_sweep_metrics_and_checkpoints(root):
    cfg = run_cfg(root, "sweep", "--sweep.l1_coeff=[1e-3,3e-3]")
    m = train(cfg)
    names = ["sae-n256-l1_0.001", "sae-n256-l1_0.003"]
    for name in names:
        tb = cfg.sae_dir / "tb" / name
        scalars = read_scalars(tb)
        missing = [t for t in TAGS if t not in scalars]
        assert not missing, f"{name}: tags missing from TensorBoard: {missing}"
        assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
        assert scalars["features/resampled"][0][0] == 10
        hist = read_histograms(tb)["features/log10_density"]
        assert sum(hist[-1][1]["bucket"]) == 256
        # the picture at each evaluation (every 10 steps) and the last step, not at every log step
        assert [step for step, *_ in read_images(tb)["features/density_png"]] == [10, 20]
        meta = json.loads((latest_checkpoint(cfg.sae_dir) / name / "cfg.json").read_text())
        assert meta["l1_coeff"] in (1e-3, 3e-3) and meta["d_in"] == 64 and meta["lm_identity"]
        assert meta["loss_convention"]
        assert f"{name}/train/loss" in m
    ck = load_checkpoint(cfg.sae_dir)
    assert ck.step == 20 and ck.state["saes"] == names and ck.has_object("rank0")
    # the two SAEs saw identical batches but differ in λ, so they differ
    a, b = (final_weights(cfg, n)["W_enc"] for n in names)
    assert not torch.equal(a, b)


def test_resume_is_bit_identical_single_process(root):
    full = run_cfg(root, "full")
    train(full)
    half = run_cfg(root, "half", "--train_sae.steps=10")
    train(half)
    half.train_sae.steps = 20
    train(half, resume=True)
    a, b = final_weights(full), final_weights(half)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_then_resume_matches_uninterrupted(root):
    ref = run_cfg(root, "full")  # written by the previous test, or train it now
    if latest_checkpoint(ref.sae_dir) is None:
        train(ref)
    proc = subprocess.Popen(sae_command(root, "killed", "--train_sae.ckpt_every=5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env1())
    sae_dir = root / "killed" / "sae"
    deadline = time.time() + 120
    while latest_checkpoint(sae_dir) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(sae_dir).step
    assert 5 <= killed_at < 20, killed_at  # the kill landed mid-run
    launch(root, "killed", "--train_sae.ckpt_every=5", "--resume")
    a, b = final_weights(ref), final_weights(run_cfg(root, "killed"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # exactly one TensorBoard event per logged step, although steps after the checkpoint ran twice
    scalars = read_scalars(sae_dir / "tb" / "sae")
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert [s for s, _ in scalars["eval/loss_recovered"]] == [10, 20]


def test_sigterm_checkpoints_and_exits_zero(root):
    proc = subprocess.Popen(sae_command(root, "term", "--train_sae.steps=100000",
                                        "--train_sae.ckpt_every=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env1())
    tb = root / "term" / "sae" / "tb" / "sae"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until it is really training
        if tb.is_dir() and "train/loss" in read_scalars(tb):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    ck = load_checkpoint(root / "term" / "sae")
    assert 5 <= ck.step < 100000 and "stopped by signal" in err


def test_two_processes_identical_params_disjoint_shards(root, tmp_path):
    out = tmp_path / "ids"
    env_args = ["--train_sae.steps=10"]
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", "0", str(REPO / "tests" / "sae_ranks.py"), str(root), str(out),
         *overrides(root, "ddp", *env_args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-5000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["identities"] == ranks[1]["identities"], "SAE parameters differ across ranks"
    ctx0, ctx1 = set(ranks[0]["contexts"]), set(ranks[1]["contexts"])
    assert ctx0 and ctx1 and not ctx0 & ctx1, "ranks consumed the same contexts"
    assert not set(ranks[0]["shards"]) & set(ranks[1]["shards"]), "ranks read the same shards"


def test_two_process_resume_bit_identical(root):
    launch(root, "ddp_full", nproc=2)
    launch(root, "ddp_half", "--train_sae.steps=10", nproc=2)
    launch(root, "ddp_half", "--resume", nproc=2)
    a, b = final_weights(run_cfg(root, "ddp_full")), final_weights(run_cfg(root, "ddp_half"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_inputs_are_clear_errors(root):
    with pytest.raises(MonosemError, match=r"sae.d_in = 32 but the LM .* has d_mlp = 64"):
        train(run_cfg(root, "bad_din", "--sae.d_in=32"))
    cfg = load_config(REPO / "configs/tiny.toml", overrides(root, "no_lm"))
    with pytest.raises(MonosemError, match="no trained LM at .*run `monosem train-lm"):
        train(cfg)


def test_nan_is_an_error_and_last_checkpoint_survives(root):
    cfg = run_cfg(root, "nan", "--train_sae.steps=10")
    train(cfg)
    good = final_weights(cfg)
    cfg.train_sae.steps, cfg.train_sae.lr = 20, 1e38
    with pytest.raises(MonosemError, match="loss is not finite at step"):
        train(cfg, resume=True)
    ck = load_checkpoint(cfg.sae_dir)
    assert ck.step == 10
    after = final_weights(cfg)
    assert all(torch.equal(good[k], after[k]) for k in good)


@pytest.mark.parametrize("recipe,extra", [
    ("anthropic-2023", []),
    ("anthropic-2024-04", ["--train_sae.l1_warmup_steps=5", "--train_sae.decay_start=0.8"]),
    ("topk", ["--sae.k=8"]),
])
def test_each_recipe_trains_through_the_trainer(root, recipe, extra, monkeypatch):
    from monosem.resample import Reservoir

    cfg = run_cfg(root, f"recipe-{recipe}", f"--sae.recipe={recipe}", "--train_sae.eval_every=0",
                  "--train_sae.steps=30", *extra)
    added, add = [], Reservoir.add
    monkeypatch.setattr(Reservoir, "add", lambda self, x: added.append(len(x)) or add(self, x))
    train(cfg)
    # the reservoir is fed only while a resampling is still to come (resample_steps [10]; 2023 only)
    assert added == ([cfg.train_sae.batch_size] * 10 if recipe == "anthropic-2023" else [])
    scalars = read_scalars(cfg.sae_dir / "tb" / "sae")
    mse = [v for _, v in scalars["train/mse"]]
    assert mse[-1] < 0.85 * mse[0], f"{recipe}: reconstruction did not improve: {mse}"
    meta = json.loads((latest_checkpoint(cfg.sae_dir) / "sae" / "cfg.json").read_text())
    assert meta["recipe"] == recipe
    if recipe == "topk":  # exactly k active features per vector, at every logged step
        assert all(v == 8.0 for _, v in scalars["train/l0"])
    if recipe == "anthropic-2024-04":
        lrs = [v for _, v in scalars["train/lr"]]
        assert lrs[-1] < lrs[0], "the LR decays over the last 20%"


@pytest.mark.parametrize("recipe", ["anthropic-2023", "anthropic-2024-04", "topk"])
def test_the_step_logs_the_fvu_of_its_batch(tmp_path, recipe):
    """train/fvu comes from the step's own squared error (trainee.forward_backward): it must equal the
    float64 FVU of the batch and the SAE's reconstruction, in input units (2024-04 scales its inputs)."""
    from types import SimpleNamespace

    import numpy as np

    from monosem import trainee
    from monosem.configfile import load_config

    cfg = load_config(REPO / "configs/tiny.toml", [f"--run.root={tmp_path}", f"--sae.recipe={recipe}",
                                                   "--sae.k=8"])
    acc = SimpleNamespace(device=torch.device("cpu"), prepare=lambda *objs: objs,
                          backward=lambda loss: loss.backward(), clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    t = trainee.build_trainees(cfg, acc, None)[0]
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(256, cfg.sae.d_in, generator=gen)) * 5 + 2  # [B, d_in], a large mean
    trainee.init_from_batch([t], x)
    assert recipe != "anthropic-2024-04" or abs(t.sae.input_scale_value() - 1) > 0.1
    trainee.forward_backward(t, x, 0, cfg)
    with torch.no_grad():
        x_hat = t.sae.reconstruct(x).double().numpy()
    x64 = x.double().numpy()
    ref = ((x64 - x_hat) ** 2).sum() / ((x64 - x64.mean(axis=0)) ** 2).sum()
    assert t.last["fvu"] == pytest.approx(ref, rel=1e-4)


def test_evaluations_after_the_first_run_the_spliced_pass_only(root):
    """The frozen LM's clean and zero-ablated CE are computed once per process: a later evaluation runs
    one LM pass per chunk and reports the same figures a full evaluation gives."""
    import inspect
    from types import SimpleNamespace

    from monosem import metrics, trainee
    from monosem.train_sae import check_lm

    cfg = sae_cfg(root, "evals", "--train_sae.eval_contexts=8")
    acc = SimpleNamespace(device=torch.device("cpu"), prepare=lambda *objs: objs,
                          backward=lambda loss: loss.backward(), clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    trainees = trainee.build_trainees(cfg, acc, None)
    lm, passes = check_lm(cfg, torch.device("cpu")), []
    forward = lm.forward
    lm.forward = lambda *a, **k: passes.append(k.get("mlp_fn")) or forward(*a, **k)
    first = trainee.eval_loss_recovered(trainees, lm, cfg, 1)
    n_first, passes[:] = len(passes), []
    with torch.no_grad():
        trainees[0].sae.W_dec.mul_(0.5)                                  # a different reconstruction
    second = trainee.eval_loss_recovered(trainees, lm, cfg, 2)
    assert n_first == 3 * len(passes) > 0 and None not in passes
    assert second["sae/eval/ce_clean"] == first["sae/eval/ce_clean"]
    assert second["sae/eval/ce_spliced"] != first["sae/eval/ce_spliced"]
    tokens = inspect.unwrap(trainee.eval_loss_recovered).__defaults__[0][(str(cfg.data_dir), 8)]  # its val set
    sae = trainees[0].sae
    with torch.no_grad():
        full = metrics.loss_recovered(lm, tokens, sae.reconstruct)           # every pass, from scratch
    for k, v in full.items():
        assert second[f"sae/eval/{k}"] == pytest.approx(v, rel=1e-6), k
