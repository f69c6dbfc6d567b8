"""Multi-node launch recipes, run for real on this machine: 2 "nodes" x 1 process over loopback, each
node one `launch/run.sh` exactly as the README has it; a node that loses its trainer; the Slurm script.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_launch.py
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20  # dist.timeout_s for these runs: the bound on how long a lost rank may go unnoticed
COMMON = ["--data.max_tokens=60000", "--data.contexts_per_shard=128", "--train_sae.log_every=5",
          "--train_sae.eval_every=10", "--train_sae.resample_steps=[10]", "--train_sae.dead_window=5",
          "--train_sae.batch_size=128", "--buffer.pool_size=1024", "--buffer.slot_vectors=128",
          f"--dist.timeout_s={TIMEOUT_S}"]


def monosem(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "monosem", *args], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, f"monosem {args[0]}: exit {r.returncode}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Token shards and a trained (5-step) LM in root/run, shared by every launch in this file."""
    root = tmp_path_factory.mktemp("launch")
    run = [f"--run.root={root}", "--run.name=run", *COMMON]
    monosem("prepare", "configs/tiny.toml", *run)
    monosem("train-lm", "configs/tiny.toml", *run, "--train_lm.steps=5", "--train_lm.eval_every=5",
            "--train_lm.ckpt_every=5")
    return root


LAUNCHED: list["Nodes"] = []


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Whatever a failing test leaves running is killed (only the processes this file started)."""
    yield
    while LAUNCHED:
        LAUNCHED.pop().kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nodes:
    """Two `launch/run.sh` processes, NODE_RANK 0 and 1, own TMPDIR each, one free port, logs to files."""

    def __init__(self, root: Path, out: str, steps: int, *extra: str) -> None:
        port, self.logs = free_port(), root / f"logs-{out}-{time.monotonic_ns()}"
        args = [f"--run.root={root}", "--run.name=run", *COMMON, f"--train_sae.out={out}",
                f"--train_sae.steps={steps}", *extra]
        self.procs = []
        for r in (0, 1):
            tmp = self.logs / f"tmp{r}"
            tmp.mkdir(parents=True)
            env = {**os.environ, "NNODES": "2", "NODE_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "CONFIG": "configs/tiny.toml", "TMPDIR": str(tmp),
                   "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
            with open(self.logs / f"node{r}.out", "w") as o, open(self.logs / f"node{r}.err", "w") as e:
                self.procs.append(subprocess.Popen(["bash", "launch/run.sh", *args], cwd=REPO, env=env,
                                                   stdout=o, stderr=e))
        self.tmps = [self.logs / f"tmp{r}" for r in (0, 1)]
        LAUNCHED.append(self)

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"launch did not finish in {timeout:.0f} s\n{self.tail()}") from None
        return [p.returncode for p in self.procs]

    def tree(self) -> list[psutil.Process]:
        """Every live process the two launches started (launchers, trainers, producers, trackers)."""
        out = []
        for p in self.procs:
            with_children = [psutil.Process(p.pid)] if p.poll() is None else []
            try:
                with_children += psutil.Process(p.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
            out += with_children
        return out

    def kill(self) -> None:
        for proc in reversed(self.tree()):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def text(self, r: int, kind: str = "err") -> str:
        return (self.logs / f"node{r}.{kind}").read_text(errors="replace")

    def tail(self) -> str:
        return "\n".join(f"--- node {r} {k}:\n{self.text(r, k)[-3000:]}" for r in (0, 1)
                         for k in ("out", "err"))


def trainer_of(nodes: Nodes, node: int, timeout: float = 120) -> psutil.Process:
    """The trainer process (`python -u -m monosem train-sae ...`) that node's launcher started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.Process(nodes.procs[node].pid).children(recursive=True):
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if cmd[1:4] == ["-u", "-m", "monosem"]:
                return proc
        time.sleep(0.2)
    raise AssertionError(f"no trainer started on node {node}\n{nodes.tail()}")


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def latest_step(sae_dir: Path) -> int:
    latest = sae_dir / "latest"
    return int(latest.read_text().split("-")[1]) if latest.is_file() else 0


def rank_identities(stdout: str) -> dict[int, str]:
    """The `rank R weights: name=sha256` lines train-sae prints at the end."""
    return {int(r): ids for r, ids in re.findall(r"rank (\d+) weights: (.+)", stdout)}


def contexts_to_shards(data_dir: Path) -> dict[int, str]:
    """context id -> shard file name, read from the tar member names (<ctx_id>.tokens.npy)."""
    owner = {}
    for path in sorted(data_dir.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for name in tar.getnames():
                owner[int(name.split(".")[0])] = path.name
    return owner


def shards_read(step_dir: Path, rank: int, owner: dict[int, str], ctx_len: int = 32) -> set[str]:
    """Shards of the vectors in rank's saved shuffle pool (provenance id = context * ctx_len + position)."""
    state = torch.load(step_dir / f"rank{rank}.pt", weights_only=True)
    ids = state["buffer"]["pool"]["ids"]
    assert ids.numel() > 0, f"{step_dir}/rank{rank}.pt: empty pool, nothing to check"
    return {owner[int(c)] for c in (ids // ctx_len).unique().tolist()}


def test_two_nodes_over_loopback(root):
    """README recipe: both nodes exit 0, the SAE weights agree on both ranks, the ranks read disjoint shards."""
    nodes = Nodes(root, "two", 20, "--train_sae.ckpt_every=10")
    rcs = nodes.wait()
    assert rcs == [0, 0], f"exit codes {rcs}\n{nodes.tail()}"
    ids = rank_identities(nodes.text(0, "out"))
    assert sorted(ids) == [0, 1], f"no per-rank weight identities in node 0's output\n{nodes.tail()}"
    assert ids[0] == ids[1], f"SAE parameters differ across nodes: {ids}"
    sae_dir = root / "run" / "two"
    step_dir = sae_dir / (sae_dir / "latest").read_text().strip()
    assert json.loads((step_dir / "state.json").read_text())["world_size"] == 2
    owner = contexts_to_shards(root / "run" / "data")
    s0, s1 = (shards_read(step_dir, r, owner) for r in (0, 1))
    assert s0 and s1 and not s0 & s1, f"both nodes read shards {sorted(s0 & s1)}"
    assert all(not any(t.iterdir()) for t in nodes.tmps), "run.sh left files in its TMPDIR"


def test_lost_rank_stops_every_node_then_resume(root):
    """SIGKILL node 1's trainer mid-run: everything exits non-zero within dist.timeout_s, names the lost
    rank, leaves no shared-memory segment or process; then --resume on both nodes runs to the end."""
    steps, sae_dir = 20, root / "run" / "lost"
    nodes = Nodes(root, "lost", steps, "--train_sae.ckpt_every=5")
    victim, survivor = trainer_of(nodes, 1), trainer_of(nodes, 0)
    deadline = time.monotonic() + 180
    while latest_step(sae_dir) == 0 and time.monotonic() < deadline and None in [p.poll() for p in nodes.procs]:
        time.sleep(0.1)
    assert 0 < latest_step(sae_dir) < steps, f"no checkpoint before the end\n{nodes.tail()}"
    started = nodes.tree()
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rcs = nodes.wait(timeout=TIMEOUT_S + 60)
    took = time.monotonic() - killed_at
    print(f"lost rank: nodes exited {rcs} {took:.1f} s after the SIGKILL")
    assert 0 not in rcs, f"a node exited 0 after losing rank 1: {rcs}\n{nodes.tail()}"
    assert took < TIMEOUT_S, f"the nodes took {took:.1f} s to stop (dist.timeout_s = {TIMEOUT_S})"
    err0 = nodes.text(0)
    assert re.search(r"(lost|failed|died|gone)[^\n]*\brank 1\b|\brank 1\b[^\n]*(lost|failed|died|gone)",
                     err0, re.IGNORECASE), f"node 0 does not name the lost rank 1\n{err0[-3000:]}"
    grace = time.monotonic() + 5  # a producer notices its trainer is gone within its poll interval
    while time.monotonic() < grace and any(map(alive, started)):
        time.sleep(0.1)
    left = [f"{p.pid} {p.name()}" for p in started if alive(p)]
    assert not left, f"processes left behind: {left}"
    segments = [f for t in (victim, survivor) for f in os.listdir("/dev/shm")
                if f.startswith(f"monosem_{t.pid}_")]
    assert not segments, f"shared-memory segments left behind: {segments}"

    resumed = Nodes(root, "lost", steps, "--train_sae.ckpt_every=5", "--resume")
    rcs = resumed.wait()
    assert rcs == [0, 0], f"resume: exit codes {rcs}\n{resumed.tail()}"
    assert latest_step(sae_dir) == steps
    ids = rank_identities(resumed.text(0, "out"))
    assert sorted(ids) == [0, 1] and ids[0] == ids[1], f"after resume: {ids}"


def clean_env() -> dict:
    """os.environ without the variables run.sh / slurm.sbatch read."""
    drop = {"CONFIG", "VERB", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT",
            "ACCELERATE_ARGS", "DRY_RUN"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}


def test_slurm_script_gives_each_node_its_rank(tmp_path):
    """launch/slurm.sbatch under stand-in srun/scontrol (they run each task here, DRY_RUN=1): one
    run.sh per node with NODE_RANK = SLURM_NODEID and the first host of the node list as master."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && '
                                      'printf "gpu07\\ngpu08\\n"\n')
    # srun: run the command once per node, as Slurm would on each, with that node's SLURM_NODEID
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for i in 0 1; do SLURM_NODEID=$i "$@" || exit; done\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**clean_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242", "DRY_RUN": "1", "ACCELERATE_USE_CPU": "1",
           "NPROC_PER_NODE": "8"}
    r = subprocess.run(["bash", "launch/slurm.sbatch", "--resume"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [line.rstrip() for line in r.stdout.strip().splitlines()]
    assert len(lines) == 2, r.stdout
    for rank, line in enumerate(lines):
        assert f"--machine_rank {rank} " in line and "--num_machines 2 " in line, line
        assert "--num_processes 16 " in line and "--main_process_ip gpu07 " in line, line
        assert "--main_process_port 24242 " in line and "--multi_gpu" in line, line
        assert line.endswith("-m monosem train-sae configs/paper.toml --resume"), line


@pytest.mark.parametrize("env, message", [
    ({}, "CONFIG is not set"),
    ({"CONFIG": "configs/none.toml"}, "CONFIG=configs/none.toml: no such file"),
    ({"CONFIG": "configs/tiny.toml", "NNODES": "2"}, "NODE_RANK is not set"),
    ({"CONFIG": "configs/tiny.toml", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"CONFIG": "configs/tiny.toml", "NNODES": "x"}, "NNODES=x is not an integer"),
    ({"CONFIG": "configs/tiny.toml", "VERB": "prepare"}, "VERB=prepare"),
])
def test_run_sh_names_what_is_missing(env, message):
    r = subprocess.run(["bash", "launch/run.sh"], cwd=REPO, env={**clean_env(), **env, "DRY_RUN": "1"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)
