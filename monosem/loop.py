"""The training skeleton both trainers share (train_lm.py, train_sae.py): what a run needs around its loop.

    with Run(cfg.sae_dir, "train-sae", total=cfg.train_sae.steps, resume=resume, expect=expect) as run:
        ckpt = run.checkpoint                 # the step folder resumed from, or None on a fresh start
        run.on_exit(buffer.close)             # closed on success and on failure, in reverse order
        bar, writer = run.progress(), run.writer(cfg.sae_dir / "tb" / "sae", config_text)
        while run.step < run.total:
            ...                               # forward + backward
            stop = run.check(step, losses)    # all ranks: raise on a non-finite loss, else SIGTERM seen?
            ...                               # optimizer step, logging, checkpoint
    # the caller wraps all of it in `with dist.guard(accelerator):` (failure: abort, no barrier)

A Run holds: the run-folder lock (one writer per folder; a stale lock of a dead process is taken over),
the resume checks (no silent overwrite; same world size; recorded identities such as the LM's must match
what is on disk), the SIGTERM/SIGINT flag (checkpoint at the next step, exit 0), the progress bar, the
finiteness check made before the optimizer touches a loss, TensorBoard writers that purge the events a
killed run wrote after its checkpoint. Its exit closes what was registered and releases the lock; the
failure path around it is monosem.dist.guard: a failing rank aborts instead of waiting in a barrier.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from monosem import dist
from monosem.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from monosem.errors import MonosemError
from monosem.metrics import MetricsWriter

LOCK_NAME = "LOCK"


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits 0."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """`<folder>/LOCK`, created exclusively and holding the writer's pid, host and command; removed on
    release. A lock whose pid is dead on this host is stale and taken over."""

    def __init__(self, folder: Path, what: str):
        self.path, self.what, self.held = Path(folder) / LOCK_NAME, what, False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.held = True
            return
        raise MonosemError(f"{self.path}: could not take the run lock")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
            print(f"monosem: taking over the stale lock {self.path} of dead pid {pid}", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return
        raise MonosemError(
            f"{self.path.parent} is in use by another {holder.get('what', 'monosem')} process (pid "
            f"{pid} on host {host}, started {holder.get('started', '?')}); wait for it to finish, or use "
            f"another output folder. If that process is gone, remove {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


class Run:
    """One training run's lock, resume point, stop flag, progress bar, writers and failure path."""

    def __init__(self, root: Path, what: str, *, total: int, resume: bool, expect: dict | None = None,
                 resume_hint: str = "--resume"):
        self.root, self.what, self.total, self.resume = Path(root), what, total, resume
        self.expect, self.resume_hint = expect or {}, resume_hint
        self.checkpoint: Checkpoint | None = None
        self.step, self.finished = 0, False
        self._exits: list[Callable[[], None]] = []
        self._lock, self._stopper, self._bar = RunLock(self.root, what), None, None

    # ---- entering: lock, then resume point ----------------------------------------------------
    def __enter__(self) -> "Run":
        try:
            error = None
            if dist.is_main():  # one lock per folder (multi-node: the folder is on a shared filesystem)
                try:
                    self._lock.acquire()
                except MonosemError as e:
                    error = str(e)
            error = dist.broadcast_object(error)
            if error is not None:
                raise MonosemError(error)
            self._resume_point()
            self._stopper = StopFlag()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _resume_point(self) -> None:
        path = latest_checkpoint(self.root)
        if path is None:
            if dist.is_main():  # events of an earlier attempt that never checkpointed: start clean
                shutil.rmtree(self.root / "tb", ignore_errors=True)
            dist.barrier()
            return
        if not self.resume:  # never overwrite a trained model by accident
            raise MonosemError(f"{self.root} already holds checkpoints ({path.name}): pass {self.resume_hint} "
                               "to continue, or choose another output folder")
        ckpt = load_checkpoint(path)
        saved_world = ckpt.state.get("world_size")
        if saved_world != dist.world_size():
            raise MonosemError(f"{path} was written by {saved_world} processes; resume with the same "
                               f"number (now {dist.world_size()})")
        for key, (now, what) in self.expect.items():
            saved = ckpt.state.get(key)
            if saved is not None and saved != now:
                raise MonosemError(f"{path} was trained on {what} {key} {saved}, but {what} on disk now has "
                                   f"{key} {now}: refusing to resume on a different {what}. Start a new "
                                   "output folder, or restore the original")
        self.checkpoint, self.step = ckpt, ckpt.step
        self.finished = ckpt.step >= self.total

    # ---- during the loop ------------------------------------------------------------------------
    def on_exit(self, fn: Callable[[], None]) -> None:
        """Call fn when the run ends, successfully or not (last registered, first called)."""
        self._exits.append(fn)

    def progress(self) -> tqdm:
        """A progress bar on the main rank; a line every 10 s when stderr is not a terminal."""
        self._bar = tqdm(total=self.total, initial=self.step, disable=not dist.is_main(), desc=self.what,
                         dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)
        self.on_exit(self._bar.close)
        return self._bar

    def writer(self, logdir: Path, config_text: str | None = None) -> MetricsWriter:
        """TensorBoard writer on the main rank; on resume, events after the checkpoint's step are purged
        (a killed run's last steps are logged again, once)."""
        w = MetricsWriter(logdir, enabled=dist.is_main(), config_text=config_text,
                          purge_step=self.step + 1 if self.step else None)
        self.on_exit(w.close)
        return w

    def check(self, step: int, losses: dict[str, float], hint: str = "") -> bool:
        """Call on every rank after the backward pass, before the optimizer step: raises if any rank's
        loss is not finite (the optimizer never touches it; `hint` names the setting to look at, e.g.
        the LR); returns whether any rank was asked to stop."""
        stop, bad = dist.any_flags([self._stopper.stop,
                                    not all(math.isfinite(v) for v in losses.values())])
        if bad:
            raise MonosemError(f"{self.what}: loss is not finite at step {step} ({losses} on rank "
                               f"{dist.rank()}); lower the learning rate? ({hint or 'diverged'}). Last good "
                               f"checkpoint: {latest_checkpoint(self.root)}")
        return stop

    def stopped(self, step: int) -> None:
        print(f"monosem: {self.what} stopped by signal at step {step}; checkpoint in {self.root}",
              file=sys.stderr)

    # ---- leaving --------------------------------------------------------------------------------
    def __exit__(self, exc_type, exc, tb) -> bool:
        for fn in reversed(self._exits):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - closing must not hide the first error
                print(f"monosem: while closing: {e}", file=sys.stderr)
        if self._stopper is not None:
            self._stopper.restore()
        if exc is not None and dist.is_main() and latest_checkpoint(self.root) is None:
            shutil.rmtree(self.root / "tb", ignore_errors=True)  # a failed first attempt leaves nothing
        self._lock.release()
        return False
