"""2-process DeepSpeed ZeRO check of monosem.dist's engine-independent helpers, driven by
tests/test_deepspeed.py (writes OUT/rank<r>.pt; the test compares it to its own float64 reference):

    OMP_NUM_THREADS=1 accelerate launch --use_deepspeed --zero_stage 3 --num_processes 2 \\
        --main_process_port 0 tests/ds_edit.py OUT 3 [SRC.pt]

Without SRC: 3 steps of an anthropic-2023 SAE on a global batch split over the ranks (decoder
renormalised through zero.edit_params_), a resampling through zero.edit_params_ +
resample.resample_params_, one more step. With SRC ({"weights", "opt_state"}): a resumed engine
(weights loaded before prepare, Adam state through zero.load_optimizer_state_), one step. Then the full
weights / Adam state gathered by zero.model_state_dict / optimizer_state_dict. (One DeepSpeed engine per
process: a second ZeRO engine in the same process fails in its first backward.)
"""
import sys
from pathlib import Path

import torch

from monosem import dist, resample, zero
from monosem import sae as sae_lib
from monosem.config import Config, SAEConfig

D_IN, N_FEAT, B, LR, LAM = 16, 64, 8, 1e-2, 1e-3
DEAD = torch.tensor([1, 5, 9, 40, 63])


def data(step: int) -> torch.Tensor:
    """The global batch [2B, d_in] of a step (every rank draws it; each trains on its half)."""
    return torch.randn(2 * B, D_IN, generator=torch.Generator().manual_seed(100 + step)) + 0.5


def build(accelerator, weights: dict | None = None):
    torch.manual_seed(0)
    sae = sae_lib.SAE(SAEConfig(d_in=D_IN, n_features=N_FEAT, l1_coeff=LAM))
    if weights is not None:
        sae.load_state_dict(weights)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    return accelerator.prepare(sae, opt)


def step(accelerator, model, opt, x: torch.Tensor) -> float:
    half = x[dist.rank() * B:(dist.rank() + 1) * B]
    out = model(half)
    accelerator.backward(out.loss)   # under DeepSpeed: backward + step + zero_grad
    opt.step()
    opt.zero_grad()
    zero.edit_params_(model, opt, ["W_dec"], lambda p, s: sae_lib.normalize_columns_(p["W_dec"]),
                      states=False)
    return out.loss.item()


def setup(out_dir: str, stage: int):
    cfg = Config()
    cfg.sae = SAEConfig(d_in=D_IN, n_features=N_FEAT)
    cfg.train_sae.batch_size, cfg.dist.deepspeed_stage, cfg.dist.timeout_s = B, stage, 60
    accelerator = dist.make_accelerator(cfg, deepspeed=True)
    # partition every parameter under ZeRO-3 (the default threshold keeps tiny ones whole)
    accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"][
        "stage3_param_persistence_threshold"] = 0
    return accelerator


def train(accelerator, model, opt) -> dict:
    before_step = zero.optimizer_state_dict(opt, model)      # no Adam state yet
    losses = [step(accelerator, model, opt, data(s)) for s in range(3)]
    inputs = data(99)[: len(DEAD)]
    zero.edit_params_(model, opt, list(resample.RESAMPLED_PARAMS),
                      lambda p, s: resample.resample_params_(p, s, DEAD, inputs))
    resampled = zero.optimizer_state_dict(opt, model)
    losses.append(step(accelerator, model, opt, data(3)))
    return {"before_step": before_step, "resampled": resampled, "losses": losses}


def resume(accelerator, model, opt, src: dict) -> dict:
    zero.load_optimizer_state_(model, opt, src["opt_state"])
    reloaded = zero.optimizer_state_dict(opt, model)
    return {"reloaded": reloaded, "losses": [step(accelerator, model, opt, data(4))]}


def main(out_dir: str, stage: int, src_path: str | None) -> None:
    accelerator = setup(out_dir, stage)
    src = torch.load(src_path, weights_only=True) if src_path else None
    model, opt = build(accelerator, src["weights"] if src else None)
    assert zero.zero_stage(model) == stage and accelerator.num_processes == 2
    record = resume(accelerator, model, opt, src) if src else train(accelerator, model, opt)
    record |= {"weights": zero.model_state_dict(model), "opt_state": zero.optimizer_state_dict(opt, model),
               "stage": zero.zero_stage(model), "world": accelerator.num_processes}
    with zero.gathered_params(model) as module:     # the forward's own copy, gathered
        record["forward_copy"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.save(record, Path(out_dir) / f"rank{dist.rank()}.pt")
    del model, opt
    dist.teardown(accelerator)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
