"""monosem: train sparse autoencoders on a frozen transformer's MLP activations, streamed, never stored.

Pipeline (one module per stage): config -> tokenizer -> corpus -> shards -> stream -> lm -> producer
-> buffer -> sae -> train_sae (with dist, metrics, checkpoint). Entry point: `monosem --help`.
"""
__version__ = "0.1.0"
