"""A tiny run for trainer tests: real token shards of the stdlib corpus + a random-weight frozen LM, and
helpers to train SAEs on it in this process or in real `monosem` processes.

    from tinyrun import make_tiny_run, sae_overrides, sae_cfg, launch_sae
    cfg = make_tiny_run(["--run.root=/tmp/x", "--data.max_tokens=60000"])
"""
import os
import subprocess
import sys
from pathlib import Path

import torch

from monosem.config import Config
from monosem.configfile import load_config
from monosem.lm import LM, save_lm
from monosem.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.toml"


def make_tiny_run(overrides: list[str]) -> Config:
    """configs/tiny.toml + overrides: prepare the shards and save a seeded random LM; return the config."""
    cfg = load_config(TINY, overrides)
    prepare(cfg)
    torch.manual_seed(0)
    save_lm(LM(cfg.lm, cfg.data.ctx_len), cfg, cfg.lm_dir)
    return cfg


def sae_overrides(root: Path, name: str, *extra: str) -> list[str]:
    """A 20-step SAE run named `name` under root, sharing root/data."""
    return [f"--run.root={root}", f"--run.name={name}", f"--data.dir={root / 'data'}",
            "--data.max_tokens=60000", "--data.contexts_per_shard=128", "--train_sae.steps=20",
            "--train_sae.log_every=5", "--train_sae.eval_every=10", "--train_sae.ckpt_every=10",
            "--train_sae.resample_steps=[10]", "--train_sae.dead_window=5", "--train_sae.batch_size=128",
            "--buffer.pool_size=1024", "--buffer.slot_vectors=128", *extra]


def make_sae_root(root: Path) -> Path:
    """Token shards + a (random, frozen) LM in root/base, shared by every run under root."""
    make_tiny_run(sae_overrides(root, "base"))
    return root


def sae_cfg(root: Path, name: str, *extra: str) -> Config:
    """Config whose run folder is root/name, sharing root's data and (a link to) its LM."""
    cfg = load_config(TINY, sae_overrides(root, name, *extra))
    lm = root / name / "lm"
    if not lm.exists():
        lm.parent.mkdir(parents=True, exist_ok=True)
        lm.symlink_to(root / "base" / "lm")
    return cfg


def sae_command(root: Path, name: str, *extra: str, nproc: int = 1) -> list[str]:
    """`python -m monosem train-sae ...` (accelerate launch for nproc > 1) for run root/name."""
    sae_cfg(root, name)
    args = [str(TINY), *sae_overrides(root, name, *extra)]
    if nproc == 1:
        return [sys.executable, "-m", "monosem", "train-sae", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--main_process_port", "0", "-m", "monosem", "train-sae", *args]


def env1() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch_sae(root: Path, name: str, *extra: str, nproc: int = 1, timeout: int = 240,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run train-sae in real processes; raise with its output if check and it failed."""
    r = subprocess.run(sae_command(root, name, *extra, nproc=nproc), capture_output=True, text=True,
                       timeout=timeout, env=env1())
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r
