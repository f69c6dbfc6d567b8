"""Helper of tests/test_resample_dist.py: one rank of a real 2-process launch that trains a sweep of SAEs a
few steps with the trainer's own functions, plants dead features, resamples them with
`trainee.resample_dead` and dumps everything the single-process reference needs to `OUT/rank<r>.pt`.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/resample_ranks.py OUT [--section.key=value ...]

The chosen indices and rows are recorded by pass-through spies on `resample.choose_inputs` and
`dist.gather_chosen` (they call the real functions and return their results unchanged).
"""
import copy
import sys
from pathlib import Path

import torch

from monosem import dist, resample, trainee, zero
from monosem.configfile import load_config

REPO = Path(__file__).resolve().parents[1]
RESERVOIR_BATCHES = {0: (3, 64), 1: (3, 32)}  # rank -> (batches, rows): rank 0 overflows (Algorithm R),
                                              # rank 1 does not: the ranks' reservoirs differ in length


def synthetic(kind: int, rank: int, i: int, n: int, d_in: int) -> torch.Tensor:
    """Deterministic, rank-dependent, non-negative 'MLP activations' [n, d_in], one law for all ranks."""
    g = torch.Generator().manual_seed(1_000_000 * kind + 1_000 * rank + i)
    return torch.relu(torch.randn(n, d_in, generator=g) + 0.3)


def planted_sets(j: int, n_features: int) -> dict[str, list[int]]:
    """Trainee j's planted features: dead on both ranks / dead on rank 0 only / dead on rank 1 only."""
    both = set(range(j, n_features, 23))
    rank0_only = set(range(j + 5, n_features, 37)) - both
    rank1_only = set(range(j + 11, n_features, 41)) - both - rank0_only
    return {"both": sorted(both), "rank0_only": sorted(rank0_only), "rank1_only": sorted(rank1_only)}


def planted_last_fired(sets: dict, rank: int, step: int, n_features: int) -> torch.Tensor:
    """[n_features] int64 this rank's last_fired: alive everywhere but the planted features.
    A feature counts as alive if any rank saw it fire recently (max over ranks)."""
    last = torch.full((n_features,), step, dtype=torch.int64)
    last[sets["both"]] = 0 if rank == 0 else 1
    last[sets["rank0_only"]] = 0 if rank == 0 else step - 1
    last[sets["rank1_only"]] = step - 1 if rank == 0 else 0
    return last


def snapshot(t: trainee.Trainee) -> dict:
    """Copies (never views) of the SAE weights, the Adam state and the fire counters."""
    return {"sae": zero.model_state_dict(t.model),
            "opt": copy.deepcopy(zero.optimizer_state_dict(t.opt, t.model)),
            "last_fired": t.last_fired.clone(), "fire_counts": t.fire_counts.clone()}


def install_spies(record: dict) -> None:
    """Record what resample_dead chooses, keyed by record["current"] (the trainee's name)."""
    choose, gather = resample.choose_inputs, dist.gather_chosen

    def choose_spy(losses, *args, **kwargs):
        idx = choose(losses, *args, **kwargs)
        record[record["current"]].update(all_losses=losses.clone(), idx=idx.clone())
        return idx

    def gather_spy(*args, **kwargs):
        rows = gather(*args, **kwargs)
        record[record["current"]]["inputs"] = rows.clone()
        return rows

    resample.choose_inputs, dist.gather_chosen = choose_spy, gather_spy


def sae_step(t: trainee.Trainee, x: torch.Tensor, step: int, cfg) -> None:
    """The trainer's step: forward + backward, then Adam + renormalisation."""
    trainee.forward_backward(t, x, step, cfg)
    trainee.optimizer_step(t, step, cfg)


def exercise(cfg, accelerator) -> dict:
    """Train, plant dead features, resample, train one more step; return this rank's dump."""
    ts, rank = cfg.train_sae, dist.rank()
    step = ts.resample_steps[0]
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank, as train() does
    trainees = trainee.build_trainees(cfg, accelerator, None)
    for s in range(step):
        x = synthetic(0, rank, s, ts.batch_size, cfg.sae.d_in)          # [B, d_in]
        if s == 0:
            trainee.init_from_batch(trainees, x)
        for t in trainees:
            sae_step(t, x, s, cfg)
    reservoir = resample.Reservoir(max(1, ts.resample_pool // dist.world_size()), d_in=cfg.sae.d_in,
                                   seed=cfg.run.seed * 7919 + rank)
    n_batches, rows = RESERVOIR_BATCHES[rank]
    for i in range(n_batches):
        reservoir.add(synthetic(1, rank, i, rows, cfg.sae.d_in))
    record: dict = {"current": None}
    install_spies(record)
    dump = {"world": dist.world_size(), "rank": rank, "step": step,
            "reservoir": reservoir.tensor().clone(), "trainees": {}}
    for j, t in enumerate(trainees):
        sets = planted_sets(j, t.cfg.n_features)
        t.last_fired.copy_(planted_last_fired(sets, rank, step, t.cfg.n_features))
        pre, pre_l0 = snapshot(t), t.last["l0"]  # the step's L0 sets a resampled feature's bias
        record["current"] = t.name
        record[t.name] = {}
        n = trainee.resample_dead(t, reservoir, step, cfg)
        post = snapshot(t)
        sae_step(t, synthetic(2, rank, 0, ts.batch_size, cfg.sae.d_in), step, cfg)
        after = zero.model_state_dict(t.model)
        dump["trainees"][t.name] = {"planted": sets, "pre": pre, "post": post, "after_step": after,
                                    "n_resampled": n, "l0": pre_l0, **record[t.name]}
    for t in trainees:
        t.writer.close()
    return dump


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(REPO / "configs" / "tiny.toml", sys.argv[2:])
    accelerator = dist.make_accelerator(cfg)
    if accelerator.num_processes != 2:
        raise SystemExit(f"expected 2 processes, accelerate sees {accelerator.num_processes}")
    dump = exercise(cfg, accelerator)  # the trainees (and their DDP wrappers) die with this call
    tmp = out / f"rank{dist.rank()}.pt.tmp"
    torch.save(dump, tmp)
    tmp.rename(out / f"rank{dist.rank()}.pt")
    dist.teardown(accelerator)


if __name__ == "__main__":
    main()
