"""Helper of tests/test_producer.py: one rank of a real 2-process launch; dumps the ids its buffer delivers.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/buffer_ranks.py RUN/config.toml OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch

from monosem import dist
from monosem.buffer import ActivationBuffer
from monosem.configfile import load_config


def main() -> None:
    cfg, out = load_config(sys.argv[1]), Path(sys.argv[2])
    accelerator = dist.make_accelerator(cfg)
    rank, world = dist.rank(), dist.world_size()
    with ActivationBuffer(cfg, rank=rank, world_size=world, lm_path=cfg.lm_dir, data_dir=cfg.data_dir,
                          loop=False) as buf:
        ids = torch.cat([i for _, i in buf.batches(50)]).tolist()
    counts = dist.all_reduce_sum(torch.tensor([len(ids)]))  # the group is really 2 processes
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "ids": ids,
                                                       "total": int(counts)}))
    dist.teardown(accelerator)


if __name__ == "__main__":
    main()
