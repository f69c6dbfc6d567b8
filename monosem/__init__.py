"""monosem: train sparse autoencoders on a frozen transformer's MLP activations, streamed, never stored.

Pipeline (one module per stage): config -> tokenizer -> corpus -> shards -> stream -> lm -> producer
-> buffer -> sae -> train_sae (with dist, metrics, checkpoint). Entry point: `monosem --help`.
"""
import os as _os

__version__ = "0.1.0"

# Read by torch at its first allocation, so before anything imports torch (see monosem.host)
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
