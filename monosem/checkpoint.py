"""Step-N checkpoint folders: safetensors weights, torch objects loadable with weights_only, JSON state.

    root/step-000100/model.safetensors   tensors (weights)
    root/step-000100/<name>.pt           objects: optimizer state, pool contents (tensors/dicts/lists only)
    root/step-000100/state.json          step, counters, stream states, RNG
    root/step-000100/config.toml         the resolved config
    root/latest                          text: the newest complete step folder's name

A folder is written under a temp name and renamed when complete, then `latest` is rewritten
atomically, then old folders are pruned: a crash at any moment leaves the last good checkpoint loadable.

    root/step-000100/rank<r>.pt          each rank's own state (stream, RNG, pool, reservoir, counters)
    root/step-000100/<sub>/...           per-model parts (an SAE of a sweep: model.safetensors, optimizer.pt)

One protocol for both trainers: `save` is collective (every rank writes the state_dicts of its stateful
parts, rank 0 the weights), `load_checkpoint` + `Checkpoint.tensors / load_object / rank_state` read it
back, and every loader error names the file and says which earlier checkpoint is still intact.

    save(root, 100, rank_state={"stream": stream.state_dict()}, write_main=lambda tmp: ..., state={...})
    ckpt = load_checkpoint(latest_checkpoint(root)); stream.load_state_dict(ckpt.rank_state(rank)["stream"])
    path = save_checkpoint("runs/x/sae", 100, tensors=sae.state_dict())      # single writer
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
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


def save(root: str | Path, step: int, *, rank_state: dict, write_main: Callable[[Path], None],
         state: dict, config: Config | None = None, keep_last: int = 2) -> Path:
    """Checkpoint `step` (call on every rank): each rank writes rank<r>.pt with its own state, rank 0
    calls write_main(staging folder) for the weights and optimizer state, writes state.json and the
    config, and commits. Multi-node runs need `root` on a shared filesystem."""
    from monosem import dist

    tmp = staging_dir(root, step)
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died half-way
    dist.barrier()
    write_parts(tmp, objects={f"rank{dist.rank()}": rank_state})
    if dist.is_main():
        write_main(tmp)
        write_parts(tmp, state={"step": step, "world_size": dist.world_size(), **state}, config=config)
    dist.barrier()
    if dist.is_main():
        commit(root, step, keep_last)
    dist.barrier()
    return Path(root) / step_dir_name(step)


def _reason(e: Exception) -> str:
    """The cause in one line, without torch's advice to unpickle code (never follow it for checkpoints)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
        return "not a plain-data torch file (damaged, or it holds code objects, which are never unpickled)"
    return text[:300]


def _intact(path: Path) -> bool:
    """A cheap check of a step folder: state.json parses, safetensors headers parse, .pt archives pass
    their CRC check."""
    try:
        json.loads((path / "state.json").read_text())
        for f in path.rglob("*.safetensors"):
            with safe_open(str(f), "pt"):
                pass
        return all(zipfile.is_zipfile(f) and zipfile.ZipFile(f).testzip() is None for f in path.rglob("*.pt"))
    except Exception:  # noqa: BLE001 - any failure means "not intact"
        return False


def damaged(path: Path, file: Path, e: Exception) -> MonosemError:
    """The error for an unreadable checkpoint file: names it and the newest earlier intact checkpoint."""
    earlier = [p for p in list_checkpoints(path.parent) if p.name < path.name]
    good = next((p for p in reversed(earlier) if _intact(p)), None)
    hint = (f"the earlier checkpoint {good} is intact: to resume from it, run `echo {good.name} > "
            f"{path.parent / 'latest'}` and resume again" if good is not None else
            "no earlier checkpoint is intact: start the run again in a new folder")
    return MonosemError(f"checkpoint {path.name} is damaged: cannot read {file}: {_reason(e)}. {hint}")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict = field(default_factory=dict)

    def tensors(self, sub: str = "") -> dict[str, torch.Tensor]:
        """`<sub>/model.safetensors` ({} if there is none)."""
        f = self.path / sub / "model.safetensors"
        if not f.is_file():
            return {}
        try:
            return load_file(str(f))
        except Exception as e:
            raise damaged(self.path, f, e) from None

    def load_object(self, name: str, sub: str = "") -> object:
        """Load `<sub>/<name>.pt` without unpickling code (weights_only=True)."""
        f = self.path / sub / f"{name}.pt"
        if not f.is_file():
            raise damaged(self.path, f, FileNotFoundError("missing"))
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged file, or a pickle that is not plain data
            raise damaged(self.path, f, e) from None

    def has_object(self, name: str, sub: str = "") -> bool:
        return (self.path / sub / f"{name}.pt").is_file()

    def rank_state(self, rank: int) -> dict:
        """What rank `rank` saved of its own parts (stream position, RNG, pool...)."""
        state = self.load_object(f"rank{rank}")
        if not isinstance(state, dict):
            raise damaged(self.path, self.path / f"rank{rank}.pt", ValueError("not a dict"))
        return state


def load_state(path: str | Path) -> dict:
    """A step folder's state.json alone (no weights read)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise damaged(Path(path), Path(path) / "state.json", e) from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A step folder (or a root: its latest), its state read; parts load on demand."""
    path = Path(path)
    if not (path / "state.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise MonosemError(f"no checkpoint found in {path} (expected step-N/ folders with "
                               "state.json)")
        path = latest
    state = load_state(path)
    return Checkpoint(path=path, step=int(state.get("step", 0)), state=state)


def load_sae(path: str | Path, name: str | None = None, device: str | torch.device = "cpu"):
    """A trained SAE and its cfg.json: `path` is an SAE folder holding model.safetensors + cfg.json,
    a step folder (then `name`, default the only / first SAE in it), or a train-sae root (its latest).

        sae, meta = load_sae("runs/quickstart/sae")            # -> (SAE in eval mode, dict)"""
    from monosem.config import SAEConfig
    from monosem.sae import SAE

    folder = Path(path)
    if not (folder / "cfg.json").is_file():
        step = folder if (folder / "state.json").is_file() else latest_checkpoint(folder)
        if step is None:
            raise MonosemError(f"no trained SAE in {folder} (expected step-N/<sae name>/cfg.json)")
        names = load_state(step).get("saes") or sorted(p.name for p in step.iterdir()
                                                        if (p / "cfg.json").is_file())
        if not names:
            raise MonosemError(f"checkpoint {step} holds no SAE folder")
        if name is not None and name not in names:
            raise MonosemError(f"checkpoint {step} has no SAE named {name!r}; it holds {names}")
        folder = step / (name or names[0])
    try:
        meta = json.loads((folder / "cfg.json").read_text())
        cfg = SAEConfig(**{k: meta[k] for k in ("d_in", "n_features", "recipe", "l1_coeff", "k",
                                                 "aux_k", "aux_coeff", "resample_loss") if k in meta})
    except (OSError, ValueError, TypeError) as e:
        raise MonosemError(f"{folder / 'cfg.json'}: unreadable SAE config: {e}") from e
    try:
        tensors = load_file(str(folder / "model.safetensors"))
    except Exception as e:
        raise MonosemError(f"{folder / 'model.safetensors'}: unreadable weights: {e}") from e
    sae = SAE(cfg)
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as e:
        raise MonosemError(f"{folder / 'model.safetensors'} does not match {folder / 'cfg.json'}: {e}") from e
    return sae.to(device).eval(), meta
