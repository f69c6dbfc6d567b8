"""Resampling under data parallelism: a real 2-process torchrun (gloo, CPU) that runs the trainer's own
`trainee.resample_dead` equals the same function in one process on the union rank0 ++ rank1 of the two
reservoirs (chosen inputs, new weights, reset Adam state), and both ranks stay identical after it.

    OMP_NUM_THREADS=1 python -m pytest -q -x tests/test_resample_dist.py

The launch (tests/resample_ranks.py) trains a sweep of two SAEs for a few steps on rank-dependent data,
fills each rank's Reservoir (rank 0 overflows its capacity, rank 1 does not, so the lengths differ),
plants dead features (some dead on one rank only: alive overall through the max over ranks) and dumps
the state before and after resampling. The single-process reference starts from the dumped state.
"""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monosem import dist, resample, trainee, zero
from monosem.configfile import load_config

from monosem.sae import SAE

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["--sweep.l1_coeff=[1e-3,3e-3]", "--train_sae.batch_size=64", "--train_sae.dead_window=2",
             "--train_sae.resample_pool=256", "--train_sae.resample_steps=[4]", "--dist.timeout_s=60",
             "--run.seed=3"]
ROW_DIM = {"W_enc": 0, "b_enc": 0, "W_dec": 1}  # the axis along which a feature owns a slice


def make_cfg(root: Path):
    return load_config(REPO / "configs" / "tiny.toml", OVERRIDES + [f"--run.root={root}"])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(cfg, [rank0 dump, rank1 dump]) from one real 2-process launch."""
    base = tmp_path_factory.mktemp("resample_dist")
    (base / "tmp").mkdir()
    args = OVERRIDES + [f"--run.root={base / 'runs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(base / "tmp")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "resample_ranks.py"), str(base), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(base / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return make_cfg(base / "runs"), ranks


def param_names(cfg) -> list[str]:
    """Parameter names in the order of the optimizer's param group (build_trainees: model.parameters())."""
    return [n for n, _ in SAE(cfg.sae).named_parameters()]


def adam_moments(opt_state: dict, names: list[str]) -> dict[tuple[str, str], torch.Tensor]:
    return {(name, key): opt_state["state"][i][key] for i, name in enumerate(names)
            for key in ("exp_avg", "exp_avg_sq")}


def union_reservoir(ranks: list[dict]) -> torch.Tensor:
    return torch.cat([r["reservoir"] for r in ranks])                  # [N0 + N1, d_in], all-gather order


@pytest.fixture(scope="module")
def reference(launched, tmp_path_factory):
    """{name: what resample_dead does in this plain (world-1) process}: the trainees come from
    build_trainees, start from rank 0's pre-resampling dump, with last_fired = the max over the ranks'
    and one reservoir holding the union rank0 ++ rank1 (the all-gather order)."""
    _, ranks = launched
    cfg = make_cfg(tmp_path_factory.mktemp("reference"))  # its own run root (TensorBoard files)
    union = union_reservoir(ranks)
    seen: dict = {}
    choose, gather = resample.choose_inputs, dist.gather_chosen

    def choose_spy(losses, *args, **kwargs):
        seen[seen["current"]].update(all_losses=losses.clone(), idx=choose(losses, *args, **kwargs))
        return seen[seen["current"]]["idx"]

    def gather_spy(*args, **kwargs):
        seen[seen["current"]]["inputs"] = gather(*args, **kwargs)
        return seen[seen["current"]]["inputs"]

    accelerator = dist.make_accelerator(cfg)
    assert accelerator.num_processes == 1 and not dist.is_distributed()
    trainees = trainee.build_trainees(cfg, accelerator, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resample, "choose_inputs", choose_spy)
        mp.setattr(dist, "gather_chosen", gather_spy)
        for t in trainees:
            pre = [r["trainees"][t.name]["pre"] for r in ranks]
            t.sae.load_state_dict(pre[0]["sae"])
            # Adam keeps the tensors it is given: resampling would zero rows of the module-scoped dump
            zero.load_optimizer_state_(t.model, t.opt, copy.deepcopy(pre[0]["opt"]))
            t.last_fired.copy_(torch.maximum(pre[0]["last_fired"], pre[1]["last_fired"]))
            t.fire_counts.fill_(1)
            t.last = {"l0": (ranks[0]["trainees"][t.name]["l0"] + ranks[1]["trainees"][t.name]["l0"]) / 2}
            reservoir = resample.Reservoir(len(union), cfg.sae.d_in)
            reservoir.add(union)
            seen["current"], seen[t.name] = t.name, {}
            seen[t.name]["n_resampled"] = trainee.resample_dead(t, reservoir, ranks[0]["step"], cfg)
            seen[t.name]["post"] = {"sae": zero.model_state_dict(t.model),
                                    "opt": copy.deepcopy(zero.optimizer_state_dict(t.opt, t.model)),
                                    "last_fired": t.last_fired.clone(), "fire_counts": t.fire_counts.clone()}
    for t in trainees:
        t.writer.close()
    del trainees, t
    dist.teardown(accelerator)
    return seen


def test_launch_is_data_parallel_and_trained(launched):
    cfg, ranks = launched
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert len(ranks[0]["reservoir"]) == 128 and len(ranks[1]["reservoir"]) == 96  # capacity 256 // 2
    names = param_names(cfg)
    for name, _ in trainee.sweep(cfg):
        a, b = (r["trainees"][name]["pre"] for r in ranks)
        for k in a["sae"]:
            assert torch.equal(a["sae"][k], b["sae"][k]), k
        moments = adam_moments(a["opt"], names)
        assert all(m.abs().sum() > 0 for m in moments.values())  # a few real steps: Adam state is live
        for key, m in moments.items():
            assert torch.equal(m, adam_moments(b["opt"], names)[key]), key


def test_dead_features_are_the_max_over_ranks(launched):
    cfg, ranks = launched
    step = ranks[0]["step"]
    for name, _ in trainee.sweep(cfg):
        planted = ranks[0]["trainees"][name]["planted"]
        assert planted["both"] and planted["rank0_only"] and planted["rank1_only"]
        for r in ranks:
            d = r["trainees"][name]
            assert d["n_resampled"] == len(planted["both"])
            expected = d["pre"]["last_fired"].clone()
            expected[planted["both"]] = step    # resampled: a fresh window; the rest stays local
            assert torch.equal(d["post"]["last_fired"], expected)
            assert not d["post"]["fire_counts"].any()


def test_ranks_identical_after_resampling_and_after_the_next_step(launched):
    cfg, ranks = launched
    names = param_names(cfg)
    for name, _ in trainee.sweep(cfg):
        a, b = (r["trainees"][name] for r in ranks)
        assert torch.equal(a["idx"], b["idx"]) and torch.equal(a["all_losses"], b["all_losses"])
        assert torch.equal(a["inputs"], b["inputs"])
        for k in a["post"]["sae"]:
            assert torch.equal(a["post"]["sae"][k], b["post"]["sae"][k]), k
            assert torch.equal(a["after_step"][k], b["after_step"][k]), k
        mb = adam_moments(b["post"]["opt"], names)
        for key, m in adam_moments(a["post"]["opt"], names).items():
            assert torch.equal(m, mb[key]), key


def test_two_processes_equal_one_process_on_the_union(launched, reference):
    cfg, ranks = launched
    names = param_names(cfg)
    n0 = len(ranks[0]["reservoir"])
    for name, _ in trainee.sweep(cfg):
        got = ranks[0]["trainees"][name]
        ref = reference[name]
        assert ref["n_resampled"] == got["n_resampled"]
        torch.testing.assert_close(got["all_losses"], ref["all_losses"], rtol=1e-6, atol=0)
        assert torch.equal(got["idx"], ref["idx"])
        assert torch.equal(got["inputs"], ref["inputs"])
        # the draw really mixes both ranks' reservoirs (rank 1 rows sit after rank 0's n0 rows)
        assert (got["idx"] < n0).any() and (got["idx"] >= n0).any(), got["idx"].tolist()
        for k, v in ref["post"]["sae"].items():
            assert torch.equal(got["post"]["sae"][k], v), k
        got_m = adam_moments(got["post"]["opt"], names)
        for key, m in adam_moments(ref["post"]["opt"], names).items():
            assert torch.equal(got_m[key], m), key
        assert torch.equal(ref["post"]["last_fired"][got["planted"]["both"]],
                           torch.full((len(got["planted"]["both"]),), ranks[0]["step"]))
        assert not ref["post"]["fire_counts"].any()


def test_resampled_state_matches_a_float64_reference(launched):
    cfg, ranks = launched
    names = param_names(cfg)
    union64 = union_reservoir(ranks).double()                          # [N, d_in]
    for name, scfg in trainee.sweep(cfg):
        d = ranks[0]["trainees"][name]
        pre = {k: v.double() for k, v in d["pre"]["sae"].items()}
        post = d["post"]["sae"]
        dead = torch.tensor(d["planted"]["both"])                       # ascending, as dead.nonzero()
        alive = torch.ones(scfg.n_features, dtype=torch.bool)
        alive[dead] = False
        # gathered losses: the training loss of each union row, rank order (mse mean over d_in + λ·L1)
        f = torch.relu((union64 - pre["b_dec"]) @ pre["W_enc"].T + pre["b_enc"])
        x_hat = f @ pre["W_dec"].T + pre["b_dec"]
        loss = (x_hat - union64).pow(2).mean(1) + scfg.l1_coeff * f.sum(1)
        torch.testing.assert_close(d["all_losses"].double(), loss, rtol=1e-5, atol=1e-7)
        # chosen rows and new weights
        chosen = union64[d["idx"]]                                      # [n_dead, d_in]
        torch.testing.assert_close(d["inputs"].double(), chosen, rtol=0, atol=0)
        direction = chosen / chosen.norm(dim=1, keepdim=True)
        ref_norm = 0.2 * pre["W_enc"][alive].norm(dim=1).mean()
        torch.testing.assert_close(post["W_dec"][:, dead].double(), direction.T, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(post["W_enc"][dead].double(), direction * ref_norm,
                                   rtol=1e-6, atol=1e-7)
        # b_enc: each new feature fires on the alive features' mean density (this step's L0 averaged
        # over ranks / alive features) of the bias sample (here the whole union, in rank order)
        density = (d["l0"] + ranks[1]["trainees"][name]["l0"]) / 2 / int(alive.sum())
        assert 0 < density < 1
        k = math.ceil(density * len(union64))
        pre_new = (union64 - pre["b_dec"]) @ post["W_enc"][dead].double().T     # [N, n_dead]
        b_ref = -pre_new.sort(dim=0, descending=True).values[k - 1]
        torch.testing.assert_close(post["b_enc"][dead].double(), b_ref, rtol=1e-5, atol=1e-6)
        assert post["b_enc"][dead].all()  # set, not left at the paper's 0
        # everything else untouched, bit for bit
        for k, dim in ROW_DIM.items():
            keep = alive.nonzero().squeeze(1)
            assert torch.equal(post[k].index_select(dim, keep), d["pre"]["sae"][k].index_select(dim, keep))
        assert torch.equal(post["b_dec"], d["pre"]["sae"]["b_dec"])
        # Adam moments: the resampled rows start from zero, the others are as they were
        before, after = adam_moments(d["pre"]["opt"], names), adam_moments(d["post"]["opt"], names)
        for (pname, key), m in after.items():
            if pname not in ROW_DIM:
                assert torch.equal(m, before[pname, key]), (pname, key)
                continue
            dim, keep = ROW_DIM[pname], alive.nonzero().squeeze(1)
            assert not m.index_select(dim, dead).any(), (pname, key)
            assert before[pname, key].index_select(dim, dead).abs().sum() > 0  # the reset did something
            assert torch.equal(m.index_select(dim, keep), before[pname, key].index_select(dim, keep))
