"""Step-N checkpoint folders: safetensors weights, torch objects loadable with weights_only, JSON state.

    root/step-000100/model.safetensors   tensors (weights)
    root/step-000100/<name>.pt           objects: optimizer state, pool contents (tensors/dicts/lists only)
    root/step-000100/state.json          step, counters, stream states, RNG
    root/step-000100/config.toml         the resolved config
    root/latest                          text: the newest complete step folder's name

A folder is written under a temp name and renamed when complete, then `latest` is rewritten
atomically, then old folders are pruned: a crash at any moment leaves the last good checkpoint loadable.

    path = save_checkpoint("runs/x/sae", 100, tensors=sae.state_dict(), state={"step": 100})
    ckpt = load_checkpoint(latest_checkpoint("runs/x/sae"))
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from monosem.config import Config
from monosem.configfile import to_toml
from monosem.errors import MonosemError
from monosem.files import write_text_atomic

STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def staging_dir(root: str | Path, step: int) -> Path:
    """The temp folder a step is written to before it is committed (same on every rank, so that
    ranks of a shared filesystem can each add their own files before rank 0 commits)."""
    return Path(root) / f".{step_dir_name(step)}.tmp"


def write_parts(folder: Path, *, tensors: dict[str, torch.Tensor] | None = None,
                objects: dict[str, object] | None = None, state: dict | None = None,
                config: Config | None = None) -> None:
    """Write checkpoint parts into `folder` (normally a staging dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        # safetensors refuses shared or non-contiguous storage: store independent copies.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                  str(folder / "model.safetensors"))
    for name, obj in (objects or {}).items():
        torch.save(obj, folder / f"{name}.pt")
    if state is not None:
        (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    if config is not None:
        (folder / "config.toml").write_text(to_toml(config))


def commit(root: str | Path, step: int, keep_last: int = 2) -> Path:
    """Rename the staging dir of `step` to its final name, point `latest` at it, prune old ones."""
    root = Path(root)
    tmp, final = staging_dir(root, step), root / step_dir_name(step)
    for f in tmp.rglob("*"):  # flush file contents before the rename makes them visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # re-saving the same step (e.g. resume then immediate save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name + "\n")
    prune(root, keep_last)
    return final


def save_checkpoint(root: str | Path, step: int, *, tensors: dict[str, torch.Tensor],
                    objects: dict[str, object] | None = None, state: dict | None = None,
                    config: Config | None = None, keep_last: int = 2) -> Path:
    """Write a complete checkpoint of `step` under `root` (single writer)."""
    tmp = staging_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    write_parts(tmp, tensors=tensors, objects=objects, state={"step": step, **(state or {})},
                config=config)
    return commit(root, step, keep_last)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(root: str | Path, keep_last: int) -> None:
    """Remove all but the newest keep_last step folders, and stale staging dirs."""
    steps = list_checkpoints(root)
    for old in steps[: max(0, len(steps) - max(1, keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    newest = int(STEP_RE.match(steps[-1].name).group(1)) if steps else -1
    for tmp in Path(root).glob(".step-*.tmp"):  # left by a crash mid-save
        m = re.match(r"^\.step-(\d+)\.tmp$", tmp.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder `latest` names, or the newest complete step folder; None if there is none."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if p.is_dir():
            return p
    steps = list_checkpoints(root)
    return steps[-1] if steps else None


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict = field(default_factory=dict)

    def load_object(self, name: str) -> object:
        """Load `<name>.pt` without unpickling code (weights_only=True)."""
        f = self.path / f"{name}.pt"
        if not f.is_file():
            raise MonosemError(f"checkpoint {self.path} has no {f.name}")
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt file, or a pickle that is not plain data
            raise MonosemError(f"cannot load {f}: {e}") from e

    def has_object(self, name: str) -> bool:
        return (self.path / f"{name}.pt").is_file()


def load_state(path: str | Path) -> dict:
    """A step folder's state.json alone (no weights read)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MonosemError(f"checkpoint {path}: unreadable state.json: {e}") from e


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a step folder (or a root: its latest). Errors name the folder and the file."""
    path = Path(path)
    if not (path / "state.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise MonosemError(f"no checkpoint found in {path} (expected step-N/ folders with "
                               "state.json)")
        path = latest
    state = load_state(path)
    weights = path / "model.safetensors"
    try:
        tensors = load_file(str(weights)) if weights.is_file() else {}
    except Exception as e:
        raise MonosemError(f"checkpoint {path}: unreadable {weights.name}: {e}") from e
    return Checkpoint(path=path, step=int(state.get("step", 0)), tensors=tensors, state=state)
