"""A tiny run for trainer tests: real token shards of the stdlib corpus + a random-weight frozen LM.

    from tinyrun import make_tiny_run
    cfg = make_tiny_run(["--run.root=/tmp/x", "--data.max_tokens=60000"])
"""
from pathlib import Path

import torch

from monosem.config import Config
from monosem.configfile import load_config
from monosem.lm import LM, save_lm
from monosem.shards import prepare

REPO = Path(__file__).resolve().parent.parent


def make_tiny_run(overrides: list[str]) -> Config:
    """configs/tiny.toml + overrides: prepare the shards and save a seeded random LM; return the config."""
    cfg = load_config(REPO / "configs/tiny.toml", overrides)
    prepare(cfg)
    torch.manual_seed(0)
    save_lm(LM(cfg.lm, cfg.data.ctx_len), cfg, cfg.lm_dir)
    return cfg
