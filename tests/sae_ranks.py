"""Run by tests/test_train_sae.py under `accelerate launch --num_processes 2`: trains the SAE and
writes, per rank, the parameter identities, the contexts consumed and the shards they came from.

    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 tests/sae_ranks.py ROOT OUT --k=v ...
"""
import json
import os
import sys
from pathlib import Path

from monosem import dist
from monosem.configfile import load_config
from monosem.shards import load_shard, read_manifest, shard_paths
from monosem.train_sae import train


def main() -> None:
    root, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs/tiny.toml", overrides)
    lm = cfg.run_dir / "lm"
    if dist.local_rank() == 0 and not lm.exists():
        lm.parent.mkdir(parents=True, exist_ok=True)
        lm.symlink_to(root / "base" / "lm")
    contexts: set[int] = set()
    metrics = train(cfg, on_batch=lambda step, x, ids: contexts.update((ids // cfg.data.ctx_len).tolist()))

    manifest = read_manifest(cfg.data_dir)
    owner = {}
    for path, entry in zip(shard_paths(cfg.data_dir, "train"), manifest["splits"]["train"]["shards"]):
        for c in load_shard(path, cfg.data.ctx_len, entry)[1].tolist():
            owner[c] = path.name
    rank = int(os.environ["RANK"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": int(os.environ["WORLD_SIZE"]),
        "identities": metrics["rank_identities"], "contexts": sorted(contexts),
        "shards": sorted({owner[c] for c in contexts})}))


if __name__ == "__main__":  # the producer is spawned: it re-imports this file
    main()
