"""Train the LM on the token shards: AdamW, warmup + cosine, data parallel, exactly resumable.

    monosem train-lm configs/tiny.toml [--resume]                 # one process
    python -m monosem train-lm configs/tiny.toml --train_lm.steps=100
    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 -m monosem train-lm configs/tiny.toml

Writes `<run_dir>/lm/step-N/` (model.safetensors + config.json, loadable with `monosem.lm.load_lm`;
optimizer.pt, rank<r>.pt with each rank's stream and RNG state, state.json), `<run_dir>/lm/latest`,
TensorBoard logs in `<run_dir>/lm/tb` and the final metrics in `<run_dir>/lm/metrics.json`. SIGTERM or
Ctrl-C checkpoints at the next step and exits 0; `--resume` continues bit-identically.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from monosem import checkpoint, dist, zero
from monosem.checkpoint import latest_checkpoint, write_parts
from monosem.config import Config, TrainLMConfig
from monosem.errors import MonosemError
from monosem.files import write_json_atomic
from monosem.lm import LM, model_tensors, save_lm, weights_identity
from monosem.loop import Run
from monosem.stream import TokenStream


def lr_at(step: int, tc: TrainLMConfig) -> float:
    """Linear warmup to tc.lr, then cosine decay to tc.min_lr at tc.steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model: LM, tc: TrainLMConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95))


@torch.no_grad()
def val_loss(model: torch.nn.Module, cfg: Config, device: torch.device) -> float:
    """Mean next-token loss over eval_batches batches of the val split per rank, averaged over ranks.
    A fresh stream each time: every evaluation sees the same contexts."""
    stream = TokenStream.from_config(cfg, "val", dist.rank(), dist.world_size(), loop=True)
    batches = stream.batches(cfg.train_lm.batch_size)
    total = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, tokens]
    model.eval()
    for _, (tokens, _ids) in zip(range(cfg.train_lm.eval_batches), batches):
        tokens = tokens.to(device)
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        n = tokens[:, 1:].numel()
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    batches.close()
    model.train()
    total = dist.all_reduce_sum(total)
    return (total[0] / total[1]).item()


def unigram_entropy(cfg: Config) -> float:
    """Entropy (nats) of the empirical unigram distribution of the val split's tokens: the loss of
    the best context-free predictor, the baseline an LM must beat."""
    stream = TokenStream.from_config(cfg, "val", dist.rank(), dist.world_size(), loop=False)
    counts = torch.zeros(cfg.lm.vocab_size, dtype=torch.int64)
    for tokens, _ids in stream.batches(256):
        counts += torch.bincount(tokens.flatten(), minlength=cfg.lm.vocab_size)
    counts = dist.all_reduce_sum(counts)
    if counts.sum() == 0:
        raise MonosemError(f"the val split in {cfg.data_dir} holds no tokens")
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(cfg: Config, step: int, model: LM, optimizer, stream: TokenStream, metrics: dict) -> Path:
    """Checkpoint step `step` (every rank): its stream and RNG state in rank<r>.pt, the weights and
    AdamW state from rank 0."""
    opt_state = zero.optimizer_state_dict(optimizer)

    def write_main(tmp: Path) -> None:
        write_parts(tmp, objects={"optimizer": opt_state})
        save_lm(model, cfg, tmp)  # model.safetensors + config.json: load_lm reads any step folder

    return checkpoint.save(cfg.lm_dir, step, rank_state={"stream": stream.state_dict(), "rng": rng_state()},
                           write_main=write_main, state={"metrics": metrics}, config=cfg,
                           keep_last=cfg.train_lm.keep_last)


def setup(cfg: Config, ckpt: checkpoint.Checkpoint | None):
    """Model, optimizer, train stream, metrics and this rank's saved RNG (fresh, or from ckpt)."""
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    model = LM(cfg.lm, cfg.data.ctx_len)
    optimizer = make_optimizer(model, cfg.train_lm)
    stream = TokenStream.from_config(cfg, "train", dist.rank(), dist.world_size())
    if ckpt is None:
        return model, optimizer, stream, {}, None
    model.load_state_dict(ckpt.tensors())
    optimizer.load_state_dict(ckpt.load_object("optimizer"))
    mine = ckpt.rank_state(dist.rank())
    stream.load_state_dict(mine["stream"])
    return model, optimizer, stream, ckpt.state.get("metrics", {}), mine["rng"]


def train_lm(cfg: Config, resume: bool = False) -> dict:
    """Train for cfg.train_lm.steps steps; return the final metrics (train_loss, val_loss,
    unigram_entropy, lm_identity, rank_identities, ...) on every rank."""
    accelerator = dist.make_accelerator(cfg, mixed_precision="bf16" if cfg.train_lm.bf16 else "no")
    if cfg.train_lm.bf16:
        dist.warn_emulated_bf16(accelerator.device, "train_lm.bf16")
    with dist.guard(accelerator):  # a failing rank stops every rank within seconds
        with Run(cfg.lm_dir, "train-lm", total=cfg.train_lm.steps, resume=resume) as run:
            if run.finished:
                return _already_done(cfg, run)
            raw, optimizer, stream, metrics, rng = setup(cfg, run.checkpoint)
            model, optimizer = accelerator.prepare(raw, optimizer)  # the stream is never prepared
            if rng is not None:  # after prepare, in case preparing draws random numbers
                set_rng_state(rng)
            if "unigram_entropy" not in metrics:  # else: from the checkpoint, the same on every rank
                metrics["unigram_entropy"] = unigram_entropy(cfg)
            writer = run.writer(cfg.lm_dir / "tb")
            metrics = _loop(cfg, run, accelerator, raw, model, optimizer, stream, metrics, writer)
            model = optimizer = None  # the DDP wrapper holds the process group: drop it before teardown
    if dist.is_main():
        write_json_atomic(cfg.lm_dir / "metrics.json", metrics)
        _report(cfg, metrics)
    return metrics


def _already_done(cfg: Config, run: Run) -> dict:
    print(f"monosem: the LM in {cfg.lm_dir} is already trained to step {run.step} (train_lm.steps = "
          f"{cfg.train_lm.steps}): nothing to do; raise --train_lm.steps to train further")
    return run.checkpoint.state.get("metrics", {})


def _loop(cfg, run: Run, accelerator, raw: LM, model, optimizer, stream, metrics, writer) -> dict:
    """The training loop; `model` is the prepared (maybe DDP-wrapped) `raw`."""
    tc, device, step = cfg.train_lm, accelerator.device, run.step
    batches = stream.batches(tc.batch_size)
    window = torch.zeros(2, dtype=torch.float64)  # [sum of step losses, steps] since the last log
    t0, bar = time.perf_counter(), run.progress()
    writer.scalars(step, {"val/unigram_entropy": metrics["unigram_entropy"]})
    while step < tc.steps:
        lr = lr_at(step, tc)
        loss = _forward_backward(accelerator, model, next(batches)[0].to(device))
        stop = run.check(step + 1, {"loss": loss}, f"train_lm.lr = {tc.lr:g}")  # before the optimizer
        _optimizer_step(accelerator, model, optimizer, lr, tc.grad_clip)
        step += 1
        window += torch.tensor([loss, 1.0], dtype=torch.float64)
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            window = dist.all_reduce_sum(window)  # [.., steps x ranks]
            train_loss = (window[0] / window[1]).item()
            tokens = window[1].item() * tc.batch_size * (cfg.data.ctx_len - 1)  # all ranks
            tokens_per_s = tokens / (time.perf_counter() - t0)
            metrics.update(step=step, train_loss=train_loss, lr=lr)
            writer.scalars(step, {"train/loss": train_loss, "train/lr": lr, "perf/tokens_per_s": tokens_per_s})
            bar.set_postfix_str(f"loss {train_loss:.3f} lr {lr:.2e} tok/s {tokens_per_s:.0f}")
            window, t0 = torch.zeros(2, dtype=torch.float64), time.perf_counter()
        if step % tc.eval_every == 0 or step == tc.steps:
            metrics["val_loss"] = val_loss(model, cfg, device)
            writer.scalars(step, {"val/loss": metrics["val_loss"]})
        if step % tc.ckpt_every == 0 or step == tc.steps or stop:
            save(cfg, step, raw, optimizer, stream, metrics)
        writer.flush()
        if stop:
            run.stopped(step)
            break
    batches.close()
    identities = dist.gather_objects(weights_identity(model_tensors(raw)))
    return {**metrics, "step": step, "lm_identity": identities[dist.rank()], "rank_identities": identities,
            "lm_path": str(latest_checkpoint(cfg.lm_dir))}


def _forward_backward(accelerator, model, tokens: torch.Tensor) -> float:
    """Next-token loss over tokens [B, T] and its gradients; returns this rank's loss."""
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    accelerator.backward(loss)
    return loss.item()


def _optimizer_step(accelerator, model, optimizer, lr: float, grad_clip: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    if grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _report(cfg: Config, m: dict) -> None:
    print(f"LM: step {m.get('step')}, train loss {m.get('train_loss', float('nan')):.4f}, val loss "
          f"{m.get('val_loss', float('nan')):.4f} nats (unigram entropy of the val split "
          f"{m['unigram_entropy']:.4f})")
    print(f"LM weights: {m.get('lm_path')} (identity {m.get('lm_identity', '')[:16]}...)")
    print(f"metrics: {cfg.lm_dir / 'metrics.json'}")
    print(f"TensorBoard: tensorboard --logdir {cfg.lm_dir / 'tb'} --host 127.0.0.1")
