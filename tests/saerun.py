"""Runs for the analysis tests: a corpus with planted text, an LM with a one-token detector, and an SAE
checkpoint (in the train-sae layout) whose feature PLANTED fires exactly on that token.

    from saerun import make_planted_run, save_sae
    cfg, token_id = make_planted_run(tmp_path)      # shards + LM + SAE checkpoint under tmp_path
"""
import json
from pathlib import Path

import torch

from monosem.checkpoint import commit, staging_dir, write_parts
from monosem.config import Config, SAEConfig
from monosem.configfile import load_config
from monosem.lm import LM, lm_identity, save_lm
from monosem.prepare import prepare
from monosem.sae import SAE
from monosem.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parent.parent
XSS = "<script>alert(1)</script>"
LINE = "    s = '&amp; " + XSS + "'  # escaped?\n"
PLANTED, N_FEATURES, N_DEAD = 5, 32, 8   # features N_FEATURES - N_DEAD .. are dead


def save_sae(cfg: Config, sae: SAE, step: int = 1, name: str = "sae") -> Path:
    """Commit `sae` as step-N/<name>/ under cfg.sae_dir, as train-sae writes it."""
    tmp = staging_dir(cfg.sae_dir, step)
    write_parts(tmp / name, tensors=sae.state_dict())
    meta = {**sae.cfg_json(), "name": name, "step": step, "hook": "mlp_post",
            "hook_layer": cfg.lm.hook_layer, "lm_identity": lm_identity(cfg.lm_dir)}
    (tmp / name / "cfg.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_parts(tmp, state={"step": step, "saes": [name]})
    return commit(cfg.sae_dir, step)


def corpus(folder: Path) -> str:
    """Some stdlib source text with LINE planted every 12 lines; returns the glob."""
    import textwrap

    stdlib, parts = Path(textwrap.__file__).parent, []
    for name in ("json/decoder.py", "textwrap.py", "fnmatch.py"):
        lines = (stdlib / name).read_text().splitlines(keepends=True)
        for i in range(0, len(lines), 12):
            parts += lines[i:i + 12] + [LINE]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "planted.txt").write_text("".join(parts))
    return str(folder / "*.txt")


@torch.no_grad()
def detector_lm(cfg: Config, token: int) -> LM:
    """A random LM whose attention output and positions are zeroed (the MLP sees the token alone), and
    whose MLP hidden unit 0 fires on `token` only: its input row is LN(embedding of token)."""
    torch.manual_seed(0)
    lm = LM(cfg.lm, cfg.data.ctx_len)
    block = lm.blocks[0]
    block.attn.c_proj.weight.zero_()
    block.attn.c_proj.bias.zero_()
    lm.wpe.weight.zero_()
    normed = block.ln_2(lm.wte.weight)                       # [vocab, d_model]: what the MLP reads
    w = normed[token]
    score = normed @ w                                       # [vocab]
    others = torch.cat([score[:token], score[token + 1:]])
    assert score[token] > others.max() + 1.0, "no margin for the detector"
    block.mlp.W_in.weight[0] = w
    block.mlp.W_in.bias[0] = -(score[token] + others.max()) / 2
    return lm


def planted_sae(d_in: int) -> SAE:
    """Feature PLANTED reads hidden unit 0 (the detector); others random, the last N_DEAD dead."""
    sae = SAE(SAEConfig(d_in=d_in, n_features=N_FEATURES), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.fill_(0.0)  # the random features fire on many tokens
        sae.W_enc[PLANTED].zero_()
        sae.W_enc[PLANTED, 0] = 1.0
        sae.b_enc[PLANTED] = 0.0
        sae.W_dec[:, PLANTED] = 0.0
        sae.W_dec[0, PLANTED] = 1.0
        sae.b_enc[N_FEATURES - N_DEAD:] = -1e4
    return sae


def make_planted_run(root: Path, *extra: str) -> tuple[Config, int]:
    """Shards of the planted corpus, the detector LM, the planted SAE; -> (config, planted token id)."""
    cfg = load_config(REPO / "configs/tiny.toml", [
        f"--run.root={root}", "--run.name=planted", f"--data.source={corpus(root / 'corpus')}",
        "--data.max_tokens=0", "--data.val_fraction=0.3", "--data.contexts_per_shard=64",
        "--analyze.window_after=8", "--analyze.batch_contexts=8", *extra])
    prepare(cfg)
    token = get_tokenizer().encode_ordinary(XSS)[3]
    assert get_tokenizer().decode([token]) == "alert"
    save_lm(detector_lm(cfg, token), cfg, cfg.lm_dir)
    save_sae(cfg, planted_sae(cfg.lm.d_mlp))
    return cfg, token
