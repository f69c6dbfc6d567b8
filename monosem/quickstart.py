"""`monosem quickstart`: the whole pipeline on the embedded corpus, sized for a few minutes on 2 cores.

    monosem quickstart                          # configs/quickstart.toml, everything under runs/quickstart/
    monosem quickstart configs/tiny.toml        # seconds, for a smoke test
    monosem quickstart                          # again: finished stages are skipped, stopped ones resume

Stages: prepare (Python standard library -> token shards), train-lm (the frozen 1-layer LM), train-sae
(SAE on its streamed MLP activations), analyze (the feature browser in runs/<name>/report/). Each stage skips work already done and resumes work that was
stopped (from its latest checkpoint); at the end it prints where
everything went, the headline figures and the TensorBoard command.
"""
from __future__ import annotations

import time

from monosem.checkpoint import latest_checkpoint, load_state
from monosem.config import Config
from monosem.configfile import save_config
from monosem.metrics import last_scalars


def _stage(title: str) -> float:
    print(f"\n== {title} ==", flush=True)
    return time.perf_counter()


def quickstart(cfg: Config, resume: bool = False) -> dict:
    """Run prepare -> train-lm -> train-sae; return the headline figures."""
    from monosem.analyze import analyze
    from monosem.prepare import prepare
    from monosem.train_lm import train_lm
    from monosem.train_sae import train

    t0 = time.perf_counter()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.run_dir)
    t = _stage(f"prepare: {cfg.data.source} -> {cfg.data_dir}")
    manifest = prepare(cfg)
    times = {"prepare_s": time.perf_counter() - t}

    t = _stage(f"train-lm -> {cfg.lm_dir}")
    lm_ckpt = latest_checkpoint(cfg.lm_dir)
    lm_state = load_state(lm_ckpt) if lm_ckpt is not None else {}
    if lm_state.get("step", 0) >= cfg.train_lm.steps:
        lm_metrics = lm_state.get("metrics", {})
        print(f"LM already trained ({lm_ckpt}); skipping")
    else:
        lm_metrics = train_lm(cfg, resume=resume or lm_ckpt is not None)
    times["train_lm_s"] = time.perf_counter() - t

    t = _stage(f"train-sae -> {cfg.sae_dir}")
    sae_ckpt = latest_checkpoint(cfg.sae_dir)
    if sae_ckpt is not None and load_state(sae_ckpt).get("step", 0) >= cfg.train_sae.steps:
        print(f"SAE already trained ({sae_ckpt}); skipping")
        sae_metrics = last_scalars(cfg.sae_dir / "tb")
    else:
        sae_metrics = train(cfg, resume=resume or sae_ckpt is not None)
    times["train_sae_s"] = time.perf_counter() - t

    t = _stage(f"analyze -> {cfg.run_dir / 'report'}")
    report = analyze(cfg)
    times["analyze_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0

    out = {"tokens": manifest["splits"]["train"]["tokens"], **lm_metrics, **sae_metrics, **times,
           "report": str(report)}
    _summary(cfg, out)
    return out


def _summary(cfg: Config, m: dict) -> None:
    f = lambda k: m.get(k, float("nan"))  # noqa: E731
    print("\n== quickstart done ==")
    print(f"run folder      {cfg.run_dir}  (config.toml, data/, lm/, sae/)")
    print(f"corpus          {m['tokens']:,} training tokens in {cfg.data_dir}")
    print(f"LM val loss     {f('val_loss'):.3f} nats (unigram entropy of the val split: "
          f"{f('unigram_entropy'):.3f})")
    for key in sorted(k for k in m if k.endswith("/train/l0")):
        name = key.split("/")[0]
        print(f"SAE {name:11s} L0 {f(key):.1f}  FVU {f(f'{name}/train/fvu'):.3f}  "
              f"loss recovered {f(f'{name}/eval/loss_recovered'):.3f}  dead "
              f"{f(f'{name}/features/dead_frac'):.3f}  ultralow {f(f'{name}/features/ultralow_frac'):.3f}")
    print(f"wall time       {f('total_s'):.0f} s (prepare {f('prepare_s'):.0f}, train-lm "
          f"{f('train_lm_s'):.0f}, train-sae {f('train_sae_s'):.0f}, analyze {f('analyze_s'):.0f})")
    print(f"feature browser {m['report']}  (open it from disk)")
    print(f"TensorBoard     tensorboard --logdir {cfg.run_dir} --host 127.0.0.1")
