"""`monosem export CONFIG`: a trained SAE in the SAELens layout, loadable by the usual interpretability tools.

    monosem export configs/quickstart.toml     # -> runs/quickstart/export/sae/{cfg.json, sae_weights.safetensors}
    sae, cfg = load_saelens("runs/quickstart/export/sae")    # back into a monosem SAE (round trip)

The layout (SAELens' `SAE.load_from_disk` / `save_model`): `sae_weights.safetensors` holds
    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]   (float32)
so that f = relu((x - b_dec) @ W_enc + b_enc) with apply_b_dec_to_input (else x @ W_enc + b_enc), and
x̂ = f @ W_dec + b_dec: our matrices transposed (ours: W_enc [n_features, d_in], W_dec [d_in, n_features]).
The input scale of anthropic-2024-04 is folded into the weights (W_enc·s, W_dec/s, b_dec/s), so the
export needs no activation normalisation ("normalize_activations": "none") and reconstructs in LM units.
cfg.json carries SAELens' fields both at the top level (older releases read them there) and in
`metadata` (newer ones), hook_name `blocks.<layer>.mlp.hook_post` (TransformerLens' name of the MLP
post-activation, which our SAEs read), and a `monosem` block (recipe, λ, step, LM identity).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from monosem.checkpoint import load_sae
from monosem.config import Config, SAEConfig
from monosem.errors import MonosemError
from monosem.files import atomic_dir

WEIGHTS, CFG = "sae_weights.safetensors", "cfg.json"


def saelens_tensors(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our SAE's weights in SAELens' names and orientation, the input scale folded in (float32)."""
    s = sae.scale.detach().double()
    W_enc, W_dec = sae.W_enc.detach().double(), sae.W_dec.detach().double()
    return {"W_enc": (W_enc * s).T.float().contiguous(),                       # [d_in, d_sae]
            "b_enc": sae.b_enc.detach().float().clone(),                        # [d_sae]
            "W_dec": (W_dec / s).T.float().contiguous(),                       # [d_sae, d_in]
            "b_dec": (sae.b_dec.detach().double() / s).float()}                # [d_in]


def saelens_cfg(sae: torch.nn.Module, meta: dict, cfg: Config, hook_layer: int, ctx_len: int) -> dict:
    topk = sae.recipe == "topk"
    info = {"model_name": f"monosem-{cfg.run.name}", "hook_name": f"blocks.{hook_layer}.mlp.hook_post",
            "hook_layer": hook_layer, "hook_head_index": None, "context_size": ctx_len,
            "prepend_bos": False, "dataset_path": cfg.data.source, "sae_lens_training_version": None}
    return {"architecture": "topk" if topk else "standard", "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.n_features, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": bool(sae.pre_bias), "normalize_activations": "none",
            "reshape_activations": "none", "finetuning_scaling_factor": False,
            "activation_fn_str": "topk" if topk else "relu",
            "activation_fn_kwargs": {"k": sae.cfg.k} if topk else {},
            **({"k": sae.cfg.k} if topk else {}), **info, "metadata": info,
            "monosem": {"recipe": sae.recipe, "l1_coeff": sae.cfg.l1_coeff, "step": meta.get("step"),
                        "name": meta.get("name"), "lm_identity": meta.get("lm_identity"),
                        "input_scale_folded": float(sae.scale),
                        "loss_convention": meta.get("loss_convention")}}


def export(cfg: Config) -> Path:
    """Write cfg's SAE (export.sae in train_sae.out's latest checkpoint) as SAELens; return the folder."""
    from safetensors.torch import save_file

    from monosem.lm import read_lm_config

    sae, meta = load_sae(cfg.sae_dir, cfg.export.sae or None)
    lm_meta = read_lm_config(cfg.lm_dir)
    n_layer = int(lm_meta["lm"]["n_layer"])
    hook_layer = int(meta.get("hook_layer", lm_meta["lm"].get("hook_layer", -1))) % n_layer
    name = meta.get("name", "sae")
    out = Path(cfg.export.out) if cfg.export.out else cfg.run_dir / "export" / name
    with atomic_dir(out) as tmp:
        save_file(saelens_tensors(sae), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CFG).write_text(json.dumps(saelens_cfg(sae, meta, cfg, hook_layer,
                                                      int(lm_meta["ctx_len"])), indent=2) + "\n")
    print(f"SAELens export: {out}  (from sae_lens import SAE; SAE.load_from_disk({str(out)!r}))")
    return out


def load_saelens(folder: str | Path) -> tuple[torch.nn.Module, dict]:
    """A SAELens folder (standard or topk ReLU SAE) as a monosem SAE in eval mode, and its cfg.json."""
    from safetensors.torch import load_file

    from monosem.sae import SAE

    folder = Path(folder)
    try:
        meta = json.loads((folder / CFG).read_text())
        t = load_file(str(folder / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not JSON / safetensors
        raise MonosemError(f"{folder}: not a SAELens SAE folder ({CFG} + {WEIGHTS}): {e}") from e
    recipe = (meta.get("monosem") or {}).get("recipe")
    if recipe is None:
        recipe = ("topk" if meta.get("architecture") == "topk" else
                  "anthropic-2023" if meta.get("apply_b_dec_to_input", True) else "anthropic-2024-04")
    d_in, d_sae = int(meta["d_in"]), int(meta["d_sae"])
    if tuple(t["W_enc"].shape) != (d_in, d_sae) or tuple(t["W_dec"].shape) != (d_sae, d_in):
        raise MonosemError(f"{folder / WEIGHTS}: W_enc {tuple(t['W_enc'].shape)} / W_dec "
                           f"{tuple(t['W_dec'].shape)} do not match d_in {d_in}, d_sae {d_sae}")
    k = int(meta.get("k") or meta.get("activation_fn_kwargs", {}).get("k", 32))
    sae = SAE(SAEConfig(recipe=recipe, d_in=d_in, n_features=d_sae, k=min(k, d_sae)))
    sae.load_state_dict({"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"],
                         "W_dec": t["W_dec"].T.contiguous(), "b_dec": t["b_dec"],
                         "scale": torch.ones(())})
    return sae.eval(), meta
