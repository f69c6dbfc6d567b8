"""monosem: train sparse autoencoders on a frozen transformer's MLP activations, streamed, never stored.

Pipeline (one module per stage): config -> tokenizer -> corpus -> shards -> stream -> lm -> producer
-> buffer -> sae -> train_sae (with dist, metrics, checkpoint). Entry point: `monosem --help`.
"""
import os as _os

__version__ = "0.1.0"

# Huge pages for torch's large CPU tensors (read at torch's first allocation, so before anything imports
# torch) and, with them, freed memory kept in the process: see monosem.host
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# OpenMP threads of an idle trainer spin ~0.3 ms (libgomp's default: ~8 ms) before they sleep, so the
# producer gets the step's gaps (read when torch loads libgomp; monosem/producer.py measures it)
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")
from monosem import host as _host  # noqa: E402

if _host.huge_pages_requested():
    _host.tune_allocator()
