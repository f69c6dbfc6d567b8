"""The language model: a nanoGPT-style transformer (the paper's: 1 layer, d_model 128, 4 heads, d_mlp 512, ReLU).

Pre-LayerNorm blocks, learned positional embeddings, causal attention, weight-tied head. Two extra doors:
`mlp_acts` stops at the hook layer's MLP post-activation (what the SAE reads; the 50k-wide head is never
computed), and `forward(..., mlp_fn=f)` replaces that activation by f(activation) (splicing).

    lm = load_lm("runs/tiny/lm")                     # latest checkpoint of a `monosem train-lm` run
    acts = lm.mlp_acts(tokens)                       # [B, T, d_mlp]
    logits, loss = lm(tokens, targets, mlp_fn=lambda h: sae(h).x_hat)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from monosem.config import Config, ConfigError, LMConfig
from monosem.configfile import to_dict
from monosem.errors import MonosemError
from monosem.files import write_bytes_atomic, write_json_atomic

FORMAT = "monosem-lm/1"
MlpFn = Callable[[torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hd = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hd).transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.W_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.W_out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = nn.GELU() if cfg.activation == "gelu" else nn.ReLU()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.W_in(x))  # [B, T, d_mlp]: the post-activation the SAE reads


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def pre_mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (residual after attention [B, T, d_model], MLP post-activation [B, T, d_mlp])."""
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x, self.mlp.hidden(self.ln_2(x))

    def forward(self, x: torch.Tensor, mlp_fn: MlpFn | None = None) -> torch.Tensor:
        x, h = self.pre_mlp(x)
        if mlp_fn is not None:
            h = mlp_fn(h)
        return x + self.drop(self.mlp.W_out(h))


class LM(nn.Module):
    def __init__(self, cfg: LMConfig, ctx_len: int):
        super().__init__()
        if not -cfg.n_layer <= cfg.hook_layer < cfg.n_layer:
            raise ConfigError(f"lm.hook_layer = {cfg.hook_layer} is outside the {cfg.n_layer} layer(s)")
        self.cfg, self.ctx_len = cfg, ctx_len
        self.hook = cfg.hook_layer % cfg.n_layer
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(ctx_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("c_proj.weight", "W_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.ctx_len:
            raise MonosemError(f"sequence of {T} tokens is longer than the LM's ctx_len {self.ctx_len}")
        pos = torch.arange(T, device=tokens.device)
        return self.drop(self.wte(tokens) + self.wpe(pos))  # [B, T, d_model]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                mlp_fn: MlpFn | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, T, vocab], mean cross-entropy if targets (-1 = ignored); mlp_fn replaces the
        hook layer's MLP post-activation."""
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, mlp_fn if i == self.hook else None)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head: [B, T, vocab]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def mlp_acts(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, d_mlp] post-activation of the hook layer's MLP; later blocks and the head never run."""
        x = self.embed(tokens)
        for block in self.blocks[: self.hook]:
            x = block(x)
        return self.blocks[self.hook].pre_mlp(x)[1]


# ---- weights on disk: model.safetensors + config.json ---------------------------------------

def model_tensors(model: LM) -> dict[str, torch.Tensor]:
    """The weights as a flat dict of contiguous CPU float tensors (the tied head is stored once)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def weights_identity(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: the LM identity SAE checkpoints refer to."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    import safetensors

    import monosem
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "monosem": monosem.__version__}


def save_lm(model: LM, cfg: Config, folder: str | Path) -> str:
    """Write `folder/model.safetensors` + `folder/config.json`; return the LM identity (sha256)."""
    from safetensors.torch import save

    folder = Path(folder)
    tensors = model_tensors(model)
    identity = weights_identity(tensors)
    write_bytes_atomic(folder / "model.safetensors", save(tensors))
    write_json_atomic(folder / "config.json", {
        "format": FORMAT, "identity": identity, "lm": dataclasses.asdict(model.cfg),
        "ctx_len": model.ctx_len, "run": cfg.run.name, "config": to_dict(cfg), "versions": _versions()})
    return identity


def resolve_lm_path(path: str | Path) -> Path:
    """A step folder holding config.json, or an LM run folder (-> its latest checkpoint)."""
    from monosem.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is not None and (latest / "config.json").is_file():
        return latest
    raise MonosemError(f"no trained LM at {path} (expected config.json + model.safetensors there or in "
                       "its latest step-N folder); run `monosem train-lm CONFIG` first")


def read_lm_config(path: str | Path) -> dict:
    folder = resolve_lm_path(path)
    try:
        meta = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MonosemError(f"unreadable LM config {folder / 'config.json'}: {e}") from e
    if meta.get("format") != FORMAT:
        raise MonosemError(f"{folder / 'config.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return {**meta, "path": str(folder)}


def lm_identity(path: str | Path) -> str:
    """The sha256 identity recorded with the LM at `path` (step folder or LM run folder)."""
    return read_lm_config(path)["identity"]


def load_lm(path: str | Path, device: str | torch.device = "cpu") -> LM:
    """Load a trained LM (frozen, eval mode); the weights are checked against the recorded identity."""
    from safetensors.torch import load_file

    meta = read_lm_config(path)
    folder = Path(meta["path"])
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as e:
        raise MonosemError(f"unreadable LM weights {folder / 'model.safetensors'}: {e}") from e
    if weights_identity(tensors) != meta["identity"]:
        raise MonosemError(f"{folder / 'model.safetensors'} does not match the identity in config.json "
                           "(corrupt or replaced weights)")
    model = LM(LMConfig(**meta["lm"]), int(meta["ctx_len"]))
    model.load_state_dict(tensors)
    model.requires_grad_(False)
    return model.to(device).eval()
