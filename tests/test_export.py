"""`monosem export`: the SAELens layout (names, shapes, orientation, cfg.json) and a round trip.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_export.py
"""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from monosem.checkpoint import load_sae
from monosem.config import SAEConfig
from monosem.export import load_saelens
from monosem.sae import SAE

from saerun import REPO, make_planted_run, save_sae  # tests/saerun.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_planted_run(tmp_path_factory.mktemp("export"))[0]


def saelens_forward(t: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens' standard / topk SAE maths on the exported tensors, in float64."""
    W_enc, b_enc, W_dec, b_dec = (t[k].double() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.double()
    pre = (x - b_dec if cfg["apply_b_dec_to_input"] else x) @ W_enc + b_enc    # [N, d_sae]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    else:
        f = torch.relu(pre)
    return f @ W_dec + b_dec


def export_cli(cfg, *extra):
    cmd = [sys.executable, "-m", "monosem", "export", str(REPO / "configs/tiny.toml"),
           f"--run.root={cfg.run.root}", f"--run.name={cfg.run.name}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_layout_and_round_trip(run):
    export_cli(run)
    out = run.run_dir / "export" / "sae"
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    t = load_file(str(out / "sae_weights.safetensors"))
    d_in, d_sae = 64, 32
    assert {k: tuple(v.shape) for k, v in t.items()} == {
        "W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    assert all(v.dtype == torch.float32 for v in t.values())
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == d_in and cfg["d_sae"] == d_sae and cfg["architecture"] == "standard"
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "blocks.0.mlp.hook_post"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["context_size"] == 32 and cfg["monosem"]["recipe"] == "anthropic-2023"
    ours, _ = load_sae(run.sae_dir)
    assert torch.equal(t["W_dec"], ours.W_dec.T) and torch.equal(t["W_enc"], ours.W_enc.T)
    assert torch.allclose(t["W_dec"].norm(dim=1), torch.ones(d_sae), atol=1e-5)  # rows: directions
    back, _ = load_saelens(out)
    for name, p in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    x = torch.rand(50, d_in) * 3
    assert torch.allclose(saelens_forward(t, cfg, x), ours.reconstruct(x).double(), atol=1e-5)


@pytest.mark.parametrize("recipe", ["anthropic-2024-04", "topk"])
def test_other_recipes_fold_the_input_scale(run, tmp_path, recipe):
    sae = SAE(SAEConfig(recipe=recipe, d_in=64, n_features=32, k=4),
              generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    sae.init_input_scale(torch.rand(100, 64) * 5)
    assert recipe == "topk" or abs(sae.input_scale_value() - 1) > 0.1
    run.train_sae.out = f"sae-{recipe}"
    try:
        save_sae(run, sae)
        export_cli(run, f"--train_sae.out=sae-{recipe}", f"--export.out={tmp_path / 'e'}")
    finally:
        run.train_sae.out = "sae"
    t = load_file(str(tmp_path / "e" / "sae_weights.safetensors"))
    cfg = json.loads((tmp_path / "e" / "cfg.json").read_text())
    assert cfg["apply_b_dec_to_input"] is (recipe == "topk")
    assert cfg["architecture"] == ("topk" if recipe == "topk" else "standard")
    x = torch.rand(40, 64) * 3
    assert torch.allclose(saelens_forward(t, cfg, x), sae.reconstruct(x).double(), atol=1e-4)
    back, _ = load_saelens(tmp_path / "e")
    assert back.recipe == recipe
    assert torch.allclose(back.reconstruct(x), sae.reconstruct(x), atol=1e-4)


def test_missing_export_names_the_folder(tmp_path):
    from monosem.errors import MonosemError

    with pytest.raises(MonosemError, match=str(tmp_path)):
        load_saelens(tmp_path)
