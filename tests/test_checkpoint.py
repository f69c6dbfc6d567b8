"""Checkpoint folders: atomic commit, latest pointer, pruning, safe loading."""
import pytest
import torch

from monosem.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                save_checkpoint, staging_dir)
from monosem.config import Config
from monosem.errors import MonosemError


def test_save_load_roundtrip_and_prune(tmp_path):
    w = torch.randn(4, 3)
    opt = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, tensors={"w": w * step, "tied": w * step},
                        objects={"optimizer": opt}, state={"rng": [1, 2]}, config=Config(),
                        keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000030"]
    assert latest_checkpoint(tmp_path).name == "step-000030"
    ck = load_checkpoint(tmp_path)
    assert ck.step == 30 and ck.state["rng"] == [1, 2]
    assert torch.equal(ck.tensors()["w"], w * 30)
    assert torch.equal(ck.load_object("optimizer")["state"][0]["exp_avg"], torch.ones(2))
    assert (ck.path / "config.toml").read_text().startswith("[run]")


def test_crash_mid_save_keeps_last_good(tmp_path):
    save_checkpoint(tmp_path, 1, tensors={"w": torch.zeros(2)})
    # a later save that died before commit leaves only its staging dir behind
    tmp = staging_dir(tmp_path, 2)
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1 and torch.equal(ck.tensors()["w"], torch.zeros(2))
    save_checkpoint(tmp_path, 2, tensors={"w": torch.ones(2)})
    assert not tmp.exists() and load_checkpoint(tmp_path).step == 2


def test_errors_name_the_file(tmp_path):
    with pytest.raises(MonosemError, match="no checkpoint found"):
        load_checkpoint(tmp_path)
    p = save_checkpoint(tmp_path, 5, tensors={"w": torch.zeros(2)})
    (p / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MonosemError, match="model.safetensors"):
        load_checkpoint(p).tensors()
    (p / "state.json").write_text("{")
    with pytest.raises(MonosemError, match="state.json"):
        load_checkpoint(p)


class Custom:
    """Arbitrary class: unpickling it would run project code, so weights_only refuses it."""


def test_objects_refuse_code_pickles(tmp_path):
    p = save_checkpoint(tmp_path, 1, tensors={}, objects={"evil": Custom()})
    with pytest.raises(MonosemError, match="evil.pt"):
        load_checkpoint(p).load_object("evil")
