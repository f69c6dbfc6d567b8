"""DeepSpeed ZeRO for the SAE, for real: 2-process CPU (gloo) runs of train-sae under ZeRO-2 and ZeRO-3
against DDP on the same config and seed, with a resampling inside (and a ZeRO-3 resume), and monosem.dist's
weight / optimizer-state helpers under ZeRO 1/2/3 against a float64 single-process reference.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_deepspeed.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monosem import dist, resample
from monosem import sae as sae_lib
from monosem.checkpoint import latest_checkpoint, load_checkpoint
from monosem.config import Config, SAEConfig
from monosem.configfile import load_config
from monosem.errors import MonosemError
from monosem.metrics import read_scalars

from tinyrun import make_tiny_run  # tests/tinyrun.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ds_edit  # noqa: E402 - the 2-process helper; its constants define the reference below

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STEPS, RESAMPLE_AT = 14, 10


def overrides(root: Path, name: str, *extra: str) -> list[str]:
    # a high λ and LR, a dead window of 2 steps: a few features are dead at the resampling (step 10)
    return [f"--run.root={root}", f"--run.name={name}", f"--data.dir={root / 'data'}",
            "--data.max_tokens=60000", "--data.contexts_per_shard=128", f"--train_sae.steps={STEPS}",
            "--train_sae.log_every=7", "--train_sae.eval_every=7", "--train_sae.ckpt_every=7",
            f"--train_sae.resample_steps=[{RESAMPLE_AT}]", "--train_sae.dead_window=2",
            "--train_sae.batch_size=128", "--train_sae.lr=1e-2", "--train_sae.warmup_steps=5",
            "--train_sae.grad_clip=0.05", "--sae.l1_coeff=0.02", "--buffer.pool_size=1024",
            "--buffer.slot_vectors=128", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Token shards + a (random, frozen) LM shared by every run in this file; launcher environment."""
    root = tmp_path_factory.mktemp("ds")
    make_tiny_run(overrides(root, "base"))
    return root


def launch_env(root: Path, **extra: str) -> dict:
    # launchers leave torchelastic_* folders in TMPDIR; nothing may be JIT-built into the extensions dir
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TMPDIR": str(root),
            "TORCH_EXTENSIONS_DIR": str(root / "torch_extensions"), **extra}


def run(cmd: list[str], env: dict, timeout: int = 300) -> str:
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r.stdout + r.stderr


def train_sae(root: Path, launcher: list[str], name: str, *extra: str, **env: str):
    """train-sae in 2 real processes; returns the run's config."""
    lm = root / name / "lm"
    if not lm.exists():
        lm.parent.mkdir(parents=True, exist_ok=True)
        lm.symlink_to(root / "base" / "lm")
    args = overrides(root, name, *extra)
    run([*launcher, "-m", "monosem", "train-sae", str(REPO / "configs/tiny.toml"), *args],
        launch_env(root, **env))
    return load_config(REPO / "configs/tiny.toml", [a for a in args if a != "--resume"])


def final(cfg) -> tuple[dict, dict, dict]:
    """(weights, optimizer state, state.json) of the run's latest checkpoint."""
    from safetensors.torch import load_file

    ck = latest_checkpoint(cfg.sae_dir)
    return (load_file(str(ck / "sae" / "model.safetensors")),
            torch.load(ck / "sae" / "optimizer.pt", weights_only=True), load_checkpoint(ck).state)


def assert_runs_match(ddp_cfg, cfg) -> None:
    """Same weights and Adam state as DDP within float tolerance, and the same resampling."""
    (w0, o0, s0), (w1, o1, s1) = final(ddp_cfg), final(cfg)
    assert s0["step"] == s1["step"] == STEPS and w0.keys() == w1.keys()
    for k in w0:
        assert w0[k].shape == w1[k].shape, k          # full weights, not a rank's partition
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-5 * w0[k].abs().max().item(), msg=k)
    assert sorted(o0["state"]) == sorted(o1["state"]) == [0, 1, 2, 3]
    for i, st in o0["state"].items():
        for key, v in st.items():
            scale = max(v.abs().max().item(), 1e-30)
            torch.testing.assert_close(o1["state"][i][key].to(v.dtype), v, rtol=0, atol=1e-5 * scale,
                                       msg=f"optimizer state {i} {key}")
    r0 = read_scalars(ddp_cfg.sae_dir / "tb" / "sae")["features/resampled"]
    r1 = read_scalars(cfg.sae_dir / "tb" / "sae")["features/resampled"]
    assert r0 == r1 and r0[0][0] == RESAMPLE_AT and 0 < r0[0][1] < 256, (r0, r1)


@pytest.fixture(scope="module")
def ddp(root):
    return train_sae(root, [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"],
                     "ddp")


def test_zero2_via_launch_yaml_matches_ddp(root, ddp):
    cfg = train_sae(root, [*ACCELERATE, "--config_file", "launch/accelerate-deepspeed-cpu2.yaml"], "zero2",
                    "--dist.deepspeed_stage=2")
    assert final(cfg)[2]["zero_stage"] == 2 and final(ddp)[2]["zero_stage"] == 0
    assert_runs_match(ddp, cfg)
    # nothing JIT-compiled (shm_comm skipped on CPU, torch Adam instead of fused_adam)
    ext = root / "torch_extensions"
    assert not ext.exists() or not any(ext.rglob("*.so")), list(ext.rglob("*"))


def test_zero3_partitioned_and_resumed_under_torchrun_matches_ddp(root, ddp):
    # every parameter partitioned (the shipped JSON keeps tensors < 1e5 elements whole)
    ds_cfg = json.loads((REPO / "launch/deepspeed-zero3.json").read_text())
    ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_json = root / "zero3-partition-all.json"
    ds_json.write_text(json.dumps(ds_cfg))
    half = train_sae(root, [*ACCELERATE, "--config_file", "launch/accelerate-deepspeed-cpu2.yaml",
                            "--deepspeed_config_file", str(ds_json)], "zero3",
                     "--dist.deepspeed_stage=3", "--train_sae.steps=7")
    weights, opt_state, state = final(half)
    assert state["step"] == 7 and state["zero_stage"] == 3 and weights["W_dec"].shape == (64, 256)
    assert opt_state["state"][0]["exp_avg"].shape == (256, 64)
    # resume from the ZeRO-3 checkpoint under plain torchrun; the resampling (step 10) happens after it
    cfg = train_sae(root, TORCHRUN, "zero3", "--dist.deepspeed_stage=3", "--resume",
                    ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ds_json))
    assert final(cfg)[2]["zero_stage"] == 3
    assert_runs_match(ddp, cfg)


def reference() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """ds_edit's run in one process, float64, on the whole global batch."""
    torch.manual_seed(0)
    sae = sae_lib.SAE(SAEConfig(d_in=ds_edit.D_IN, n_features=ds_edit.N_FEAT, l1_coeff=ds_edit.LAM)).double()
    opt = torch.optim.Adam(sae.parameters(), lr=ds_edit.LR)
    return sae, opt


def ref_step(sae, opt, step: int) -> None:
    sae(ds_edit.data(step).double()).loss.backward()
    opt.step()
    opt.zero_grad()
    sae.normalize_decoder()


def assert_matches(record: dict, sae, opt) -> None:
    want = opt.state_dict()["state"]
    for i, (name, p) in enumerate(sae.named_parameters()):
        scale = p.abs().max().item()
        torch.testing.assert_close(record["weights"][name].double(), p.detach(), rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(record["forward_copy"][name], record["weights"][name], rtol=0, atol=0)
        got = record["opt_state"]["state"][i]
        assert float(got["step"]) == float(want[i]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            v = want[i][key]
            torch.testing.assert_close(got[key].double(), v, rtol=0, atol=1e-5 * v.abs().max().item())


def assert_identical(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_dist_helpers_under_zero_1_2_3(root):
    """Steps + renormalisation + resampling + gathering under ZeRO-2 and ZeRO-3 (all parameters
    partitioned), then a resume under ZeRO-1 from the ZeRO-3 state: all equal to float64 in one process."""
    out = {}
    for stage, src in ((2, None), (3, None), (1, 3)):
        folder = root / f"edit{stage}"
        folder.mkdir()
        args = [str(folder), str(stage)]
        if src is not None:
            r = out[src][0]
            torch.save({"weights": r["weights"], "opt_state": r["opt_state"]}, root / "src.pt")
            args.append(str(root / "src.pt"))
        run([*ACCELERATE, "--use_deepspeed", "--num_processes", "2", "--zero_stage", str(stage),
             "--main_process_port", "0", str(REPO / "tests/ds_edit.py"), *args], launch_env(root))
        out[stage] = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        for key in ("weights", "opt_state", "forward_copy"):  # identical on both ranks
            assert_identical(out[stage][0][key], out[stage][1][key], key)
        assert out[stage][0]["stage"] == stage and out[stage][0]["world"] == 2

    sae, opt = reference()
    for s in range(3):
        ref_step(sae, opt, s)
    with torch.no_grad():
        resample.resample_(sae, opt.state, ds_edit.DEAD, ds_edit.data(99)[: len(ds_edit.DEAD)].double())
    ref_step(sae, opt, 3)
    for stage in (2, 3):
        r = out[stage][0]
        assert r["before_step"]["state"] == {}       # no Adam state before the first step
        moments = r["resampled"]["state"]             # right after resampling: touched rows zeroed
        dead = ds_edit.DEAD
        for i, rows in ((0, lambda m: m[dead]), (1, lambda m: m[dead]), (2, lambda m: m[:, dead])):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.count_nonzero(rows(moments[i][key])) == 0, (i, key)
                assert torch.count_nonzero(moments[i][key]) > 0, (i, key)
        assert_matches(r, sae, opt)
    ref_step(sae, opt, 4)
    r = out[1][0]                                     # resumed under ZeRO-1 from ZeRO-3's state
    for i, st in r["reloaded"]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, out[3][0]["opt_state"]["state"][i][key]), (i, key)
    assert_matches(r, sae, opt)


@pytest.mark.parametrize("recipe", ["anthropic-2023", "topk"])
def test_decoder_gradient_projected_inside_the_graph(recipe):
    """forward() alone yields W_dec.grad = g - w (w·g)/(w·w) per column (no project_decoder_grad call),
    g being the float64 gradient of the unconstrained map."""
    cfg = SAEConfig(d_in=12, n_features=40, recipe=recipe, k=6, aux_k=8, l1_coeff=0.1)
    sae = sae_lib.SAE(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 40))  # columns of several norms
        sae.b_enc.uniform_(-0.1, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(2))
    dead = torch.arange(40) % 4 == 0
    sae(x, dead_mask=dead).loss.backward()
    ref = sae_lib.SAE(cfg).double()
    ref.load_state_dict(sae.state_dict())
    ref.unit_norm = False  # the same loss without the constraint: the raw gradient
    ref(x.double(), dead_mask=dead).loss.backward()
    w, g = ref.W_dec.detach(), ref.W_dec.grad
    want = g - w * (w * g).sum(0) / (w * w).sum(0)
    assert (g - want).abs().max() > 1e-3 * g.abs().max()  # the projection does something here
    torch.testing.assert_close(sae.W_dec.grad.double(), want, rtol=0, atol=1e-6 * g.abs().max().item())
    for name in ("W_enc", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(sae, name).grad.double(), getattr(ref, name).grad,
                                   rtol=1e-5, atol=1e-7)


def test_bad_deepspeed_configs_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # restored afterwards, whatever happens
    cfg = Config()
    cfg.dist.deepspeed_stage = 2
    cfg.sweep.l1_coeff = [1e-3, 3e-3]
    with pytest.raises(MonosemError, match=r"\[sweep\] of 2 SAEs"):
        dist.make_accelerator(cfg, deepspeed=True)
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "false"  # refused before touching the environment
    cfg.sweep.l1_coeff = []
    cfg.dist.deepspeed_stage = 4
    with pytest.raises(MonosemError, match="dist.deepspeed_stage must be"):
        dist.make_accelerator(cfg, deepspeed=True)
    cfg.dist.deepspeed_stage = 2
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "launch/deepspeed-zero3.json"))
    with pytest.raises(MonosemError, match="deepspeed-zero3.json says ZeRO stage 3"):
        dist.make_accelerator(cfg, deepspeed=True)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(MonosemError, match="--zero_stage"):
        dist.make_accelerator(cfg, deepspeed=True)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "")  # what accelerate's DeepSpeed launcher sets
    cfg.dist.deepspeed_stage = 0
    with pytest.raises(MonosemError, match="launched with DeepSpeed"):
        dist.make_accelerator(cfg)
