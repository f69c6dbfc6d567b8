"""Config: recipes load, overrides apply, errors name the key and the value, help lists docs."""
import subprocess
import sys
import tomllib

import pytest

from monosem.config import Config, ConfigError
from monosem.configfile import choices, field_docs, from_dict, load_config, save_config, to_toml, validate

RECIPES = ["configs/tiny.toml", "configs/quickstart.toml", "configs/paper.toml"]


@pytest.mark.parametrize("path", RECIPES)
def test_recipes_load_and_roundtrip(path):
    cfg = load_config(path)
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_paper_shapes():
    cfg = load_config("configs/paper.toml")
    assert (cfg.lm.n_layer, cfg.lm.d_model, cfg.lm.n_head, cfg.lm.d_mlp) == (1, 128, 4, 512)
    assert cfg.train_sae.resample_steps == [25000, 50000, 75000, 100000]
    assert (cfg.train_sae.dead_window, cfg.train_sae.resample_pool) == (12500, 819200)
    assert cfg.buffer.tokens_per_context == 250
    assert 8 * cfg.train_sae.batch_size == 8192  # per process, sized for 8 GPUs: the paper's global batch


def test_overrides_typed():
    cfg = load_config("configs/tiny.toml", ["--sae.l1_coeff=3e-4", "--train_sae.bf16=true",
                                            "--train_sae.resample_steps=[5,10]", "--data.ctx_len=16"])
    assert cfg.sae.l1_coeff == 3e-4 and cfg.train_sae.bf16 is True
    assert cfg.train_sae.resample_steps == [5, 10] and cfg.data.ctx_len == 16


@pytest.mark.parametrize("override,message", [
    ("--sae.bogus=1", "unknown config key 'sae.bogus'"),
    ("--nope.x=1", "unknown config section"),
    ("--sae.n_features=many", "sae.n_features: expected an integer, got 'many'"),
    ("--sae.n_features=-4", "sae.n_features must be > 0, got -4"),
    ("--train_sae.bf16=maybe", "train_sae.bf16: expected true/false, got 'maybe'"),
    ("--lm.activation=tanh", "lm.activation must be one of relu, gelu; got 'tanh'"),
    ("--lm.n_head=3", "lm.d_model (128) must be divisible by lm.n_head (3)"),
    ("--data.val_fraction=1.5", "data.val_fraction must be in [0, 1), got 1.5"),
    ("--dist.deepspeed_stage=4", "dist.deepspeed_stage must be one of 0, 1, 2, 3; got 4"),
    ("sae.k", "must look like --section.key=value"),
    ("--buffer.dtype=fp64", "buffer.dtype must be one of fp32, bf16, fp16; got 'fp64'"),
    ("--buffer.producer_device=gpu", "buffer.producer_device must be one of auto, cpu; got 'gpu'"),
    ("--sae.recipe=l2", "sae.recipe must be one of anthropic-2023, anthropic-2024-04, topk; got 'l2'"),
    ("--sae.resample_loss=l1", "sae.resample_loss must be one of total, mse; got 'l1'"),
    ("--stream.on_corrupt=ignore", "stream.on_corrupt must be one of error, skip; got 'ignore'"),
    ("--dist.deepspeed_stage=two", "dist.deepspeed_stage: expected an integer, got 'two'"),
    ("--buffer.slot_vectors=100", "buffer.slot_vectors (100) must hold one context's 128 vectors"),
    ("--buffer.pool_size=4000", "buffer.pool_size (4000) must be >= 2 x buffer.slot_vectors (2048)"),
    ("--buffer.tokens_per_context=129", "buffer.tokens_per_context (129) exceeds data.ctx_len (128)"),
    ("--train_sae.batch_size=63489", "train_sae.batch_size (63489) must be <= buffer.pool_size - "
                                     "buffer.slot_vectors (65536 - 2048)"),
])
def test_override_errors_name_key_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_choices_come_from_the_literal_types():
    c = choices()
    assert c["lm.activation"] == ("relu", "gelu") and c["dist.deepspeed_stage"] == (0, 1, 2, 3)
    assert c["buffer.dtype"] == ("fp32", "bf16", "fp16") and "sae.recipe" in c and "sae.resample_loss" in c
    assert load_config(None, ["--dist.deepspeed_stage=2"]).dist.deepspeed_stage == 2
    cfg = Config()
    cfg.lm.activation = "tanh"  # set in code, past the parser: validate still refuses it
    with pytest.raises(ConfigError, match="lm.activation must be one of relu, gelu; got 'tanh'"):
        validate(cfg)
    cfg = Config()
    cfg.dist.deepspeed_stage = True  # == 1 in Python, but not a ZeRO stage
    with pytest.raises(ConfigError, match="dist.deepspeed_stage must be one of"):
        validate(cfg)
    assert field_docs()["lm.activation"][0] == "str" and field_docs()["dist.deepspeed_stage"][0] == "int"


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sae]\nn_features = 'x'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: sae.n_features: expected an integer"):
        load_config(bad)
    bad.write_text("[sae\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_every_field_documented():
    docs = field_docs()
    assert len(docs) > 60
    missing = [k for k, (_, doc, _) in docs.items() if not doc]
    assert not missing, f"fields without a docstring: {missing}"


def test_saved_config_reloads(tmp_path):
    cfg = load_config("configs/tiny.toml", ["--run.name=x"])
    assert load_config(save_config(cfg, tmp_path)) == cfg


def test_cli_help_and_errors():
    out = subprocess.run([sys.executable, "-m", "monosem", "train-sae", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--sae.l1_coeff=" in out and "Sparsity penalty" in out and "[train_sae]" in out
    r = subprocess.run([sys.executable, "-m", "monosem", "config", "configs/tiny.toml",
                        "--sae.k=zero"], capture_output=True, text=True)
    assert r.returncode == 2 and "sae.k: expected an integer, got 'zero'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "monosem", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown verb 'frobnicate'" in r.stderr
    assert Config() == load_config(None)


def test_readme_documents_every_field():
    from pathlib import Path

    from monosem.configfile import markdown_reference

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_reference() in readme, "README config reference is stale: regenerate it"
