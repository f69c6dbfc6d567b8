"""Configuration schema: nested dataclasses, one per section; choices are typed `Literal[...]`.

Every field carries a docstring right under it; `monosem <verb> --help` prints them (read from this
file's source with `ast` by monosem.configfile, so the docs live in exactly one place). Loading TOML
recipes, `--section.key=value` overrides, validation and writing live in monosem.configfile.

    from monosem.config import Config
    cfg = Config()                      # every default; cfg.buffer.pool_size, cfg.sae_dir, ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from monosem.errors import MonosemError


class ConfigError(MonosemError, ValueError):
    """A config key, type or value is wrong; the message names the key and the value."""


@dataclass
class RunConfig:
    name: str = "quickstart"
    """Run name: everything goes under `<root>/<name>/`."""
    root: str = "runs"
    """Folder that holds the run folders."""
    seed: int = 0
    """Master seed for the stream shuffle, initialisation, subsampling and resampling."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """Corpus: `stdlib` (the Python standard library's sources), a local glob of .txt/.jsonl/.parquet
    files (comma-separated globs allowed), or `hf:<dataset name>` for a Hugging Face hub dataset."""
    include_tests: bool = False
    """For `stdlib`: also take the test folders (about 2.7x more tokens)."""
    text_field: str = "text"
    """Field holding the document text in .jsonl/.parquet files and hub datasets."""
    hf_split: str = "train"
    """Split of a hub dataset to stream."""
    hf_config: str = ""
    """Config (subset) name of a hub dataset; empty for the default."""
    max_tokens: int = 0
    """Stop after this many tokens of the corpus (0 = take it all)."""
    ctx_len: int = 128
    """Tokens per context (the LM's sequence length)."""
    val_fraction: float = 0.02
    """Fraction of contexts held out for validation (chosen deterministically)."""
    contexts_per_shard: int = 512
    """Contexts per WebDataset tar shard."""
    shuffle_window: int = 262144
    """Contexts permuted together before they are cut into shards, so that each shard mixes many
    documents (memory: shuffle_window x ctx_len x 2 bytes)."""
    shuffle_seed: int = 0
    """Seed of that permutation."""
    num_threads: int = 2
    """Tokenizer threads."""
    dir: str = ""
    """Where the shards go; empty means `<root>/<name>/data`."""


@dataclass
class StreamConfig:
    num_workers: int = 0
    """DataLoader worker processes reading shards (0 = read in the calling process)."""
    shuffle_shards: bool = True
    """Shuffle the shard order each epoch (seeded by run.seed and the epoch)."""
    shuffle_contexts: bool = True
    """Shuffle the contexts inside each shard each epoch (exactly resumable: a seeded permutation)."""
    on_corrupt: Literal["error", "skip"] = "error"
    """What a truncated or corrupt shard does: `error` stops with the shard's name, `skip` warns and
    counts it."""


@dataclass
class LMConfig:
    n_layer: int = 1
    """Transformer blocks (the paper: 1)."""
    d_model: int = 128
    """Residual stream width (the paper: 128)."""
    n_head: int = 4
    """Attention heads (the paper: 4)."""
    d_mlp: int = 512
    """MLP hidden width, the SAE's input size (the paper: 512)."""
    activation: Literal["relu", "gelu"] = "relu"
    """MLP non-linearity: `relu` (the paper) or `gelu`."""
    vocab_size: int = 50304
    """Embedding rows: GPT-2's 50,257 ids padded to a multiple of 64."""
    dropout: float = 0.0
    """Dropout during LM training."""
    hook_layer: int = -1
    """Block whose MLP post-activation feeds the SAE (-1 = the last)."""


@dataclass
class TrainLMConfig:
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 32
    """Contexts per step per process."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only)."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0 = off)."""
    bf16: bool = False
    """Run forward/backward under bf16 autocast (a CPU without bf16 instructions emulates it: warned)."""
    eval_every: int = 200
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    log_every: int = 20
    """Log train loss, lr and tokens/s every this many steps."""
    ckpt_every: int = 500
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""


@dataclass
class BufferConfig:
    producer_batch: int = 8
    """Contexts per LM forward pass in the producer. Small keeps the producer quick to take the cores
    when its trainer starts waiting (its thread count changes between passes only)."""
    tokens_per_context: int = 0
    """Keep this many random positions per context (the paper: 250; 0 = all)."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Activation dtype through the ring: `fp32`, `bf16` or `fp16`."""
    slot_vectors: int = 2048
    """Vectors per ring slot."""
    n_slots: int = 8
    """Slots in the shared-memory ring."""
    spare_fraction: float = 1.0
    """Shared memory for spare blocks beyond pool + ring, as a fraction of pool_size: with more, fewer
    pool vectors are moved to free a block for the producer (quickstart: 0.93 moved per delivered
    vector at 0, 0.29 at 0.5, 0.15 at 1, 0.05 at 2; see monosem/pool.py)."""
    pool_size: int = 65536
    """Vectors in the consumer's shuffle pool; batches are drawn without replacement from it."""
    producer_threads: int = 1
    """torch threads in the producer process while its trainer steps."""
    producer_wait_threads: int = 0
    """torch threads in the producer while its trainer waits for a slot (on a CPU-only machine): 0 = the
    trainer's cores, idle meanwhile (monosem/producer.py says why)."""
    producer_nice: int = 19
    """Niceness added to the producer on a CPU-only machine (0-19): the SAE step takes every core and the
    producer runs in its gaps (monosem/producer.py says why). 0 = equal priority."""
    producer_device: Literal["auto", "cpu"] = "auto"
    """Device of the producer's LM: `auto` (cuda:<local_rank> if there is a GPU, else cpu), `cpu`."""
    timeout_s: float = 10.0
    """Seconds without progress after which a dead producer/consumer is declared."""


@dataclass
class SAEConfig:
    recipe: Literal["anthropic-2023", "anthropic-2024-04", "topk"] = "anthropic-2023"
    """Training recipe: `anthropic-2023`, `anthropic-2024-04` or `topk`."""
    d_in: int = 512
    """Input width; must equal the LM's d_mlp."""
    n_features: int = 4096
    """Dictionary size."""
    l1_coeff: float = 1e-3
    """Sparsity penalty λ (L1 is a sum over features, MSE a mean over input elements)."""
    k: int = 32
    """Active features per vector for `topk`."""
    aux_k: int = 256
    """Dead latents used in the AuxK loss for `topk`."""
    aux_coeff: float = 1 / 32
    """Weight of the AuxK loss for `topk`."""
    resample_loss: Literal["total", "mse"] = "total"
    """Per-input loss that weights the draw of resampling inputs: `total` (MSE + λ·L1, the paper's
    "loss of the autoencoder on that input") or `mse` (reconstruction only, as many reproductions do)."""


@dataclass
class SweepConfig:
    l1_coeff: list[float] = field(default_factory=list)
    """Train one SAE per λ on the same batches (empty = just `sae.l1_coeff`)."""
    n_features: list[int] = field(default_factory=list)
    """Train one SAE per dictionary size (crossed with l1_coeff; empty = just `sae.n_features`)."""


@dataclass
class TrainSAEConfig:
    out: str = "sae"
    """Folder under the run for this SAE training (checkpoints, TensorBoard): several trainings can
    share one run's shards and LM (e.g. `--train_sae.out=sae-noresample`)."""
    steps: int = 2000
    """Optimizer steps."""
    batch_size: int = 4096
    """Vectors per step per process (the global batch is batch_size x processes)."""
    lr: float = 1e-4
    """Adam learning rate."""
    warmup_steps: int = 0
    """Linear LR warmup steps."""
    decay_start: float = 1.0
    """Fraction of training after which the LR decays linearly to 0 (1.0 = constant)."""
    l1_warmup_steps: int = 0
    """Steps over which λ ramps up linearly from 0 (0 = off)."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this (0 = off)."""
    bf16: bool = False
    """Run the SAE forward/backward under bf16 autocast (a CPU without bf16 instructions emulates it,
    ~35x slower than fp32: the trainer warns)."""
    threads: int = 0
    """torch threads of the SAE step on a CPU-only machine; 0 = every core (divided among the local
    processes), with each producer niced into the step's gaps (see buffer.producer_nice)."""
    sparse: Literal["auto", "on", "off"] = "auto"
    """SAE step path: `auto` (sparse when the batch's density, active entries / (batch x n_features),
    is at most sparse_threshold), `on` (always sparse), `off` (always dense). Same maths either way."""
    sparse_threshold: float = 0.05
    """Density at or below which `sparse=auto` takes the sparse step (it wins up to ~10% in fp32)."""
    dead_window: int = 12500
    """A feature that fired in none of the last dead_window steps is dead."""
    resample_steps: list[int] = field(default_factory=lambda: [25000, 50000, 75000, 100000])
    """Steps at which dead features are resampled (anthropic-2023 only)."""
    resample_pool: int = 819200
    """Inputs held for resampling, summed over processes."""
    resample_power: float = 2.0
    """Draw inputs with probability ∝ loss^power (2 = the paper's square, 0.5 = sqrt)."""
    resample_bias: Literal["density", "zero"] = "density"
    """A resampled feature's encoder bias: `density` starts it firing as often as the alive features
    do now (on a sample of the resampling pool); `zero` is the paper's (it then fires on ~40% of all
    inputs and crowds other features out: see monosem/resample.py)."""
    log_every: int = 50
    """Metrics to TensorBoard every this many steps."""
    eval_every: int = 500
    """Loss recovered on validation tokens every this many steps (0 = off)."""
    eval_contexts: int = 64
    """Validation contexts per loss-recovered evaluation."""
    ckpt_every: int = 1000
    """Checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    save_pool: bool = True
    """Save the shuffle pool's undelivered vectors in checkpoints (exact resume)."""


@dataclass
class DistConfig:
    timeout_s: int = 120
    """Collective timeout: a rank that stops answering fails the others after this long."""
    deepspeed_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage for the SAE (0 = plain DDP; needs the `deepspeed` extra)."""


@dataclass
class AnalyzeConfig:
    sae: str = ""
    """SAE to analyze inside the latest checkpoint of `train_sae.out` (empty = its only / first SAE)."""
    tokens: int = 1000000
    """Held-out (val split) tokens streamed through the LM and the SAE (0 = the whole split)."""
    skip_positions: int = 1
    """Leading positions of each context left out of every statistic: at position 0 the LM's attention
    sees only that token, so its MLP activations are outliers that would fill the top lists."""
    batch_contexts: int = 16
    """Contexts per LM + SAE forward (memory: batch_contexts x ctx_len x n_features floats)."""
    top_k: int = 10
    """Top-activating contexts kept (and ablated) per feature: memory grows with n_features x top_k
    (the contexts' token windows, not their activations)."""
    n_intervals: int = 11
    """Activation intervals per feature (equal widths of its max activation), as the paper's pages."""
    interval_samples: int = 4
    """Contexts sampled uniformly from each interval (reservoir sampling in the second pass, so every
    context of the interval is equally likely)."""
    window_before: int = 12
    """Tokens shown before the activating token."""
    window_after: int = 4
    """Tokens shown after the activating token."""
    single_token_frac: float = 0.9
    """A feature is single-token when at least this fraction of its fires are on one token id."""
    ultralow_density: float = 1e-5
    """Alive features firing on fewer than this fraction of tokens are listed as ultralow."""
    ablate: bool = True
    """Measure the next-token loss change when each feature is removed at its top contexts."""
    out: str = ""
    """Report folder; empty means `<root>/<name>/report`."""


@dataclass
class ExportConfig:
    sae: str = ""
    """SAE to export from the latest checkpoint of `train_sae.out` (empty = its only / first SAE)."""
    format: Literal["saelens"] = "saelens"
    """Layout written: `saelens` (cfg.json + sae_weights.safetensors, SAELens' names and orientation)."""
    out: str = ""
    """Export folder; empty means `<root>/<name>/export/<sae name>`."""


@dataclass
class Config:
    """Every section of a run; `monosem <verb> --help` lists the fields of the sections a verb reads."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)          # corpus -> token shards
    stream: StreamConfig = field(default_factory=StreamConfig)
    lm: LMConfig = field(default_factory=LMConfig)                 # the frozen LM and its training
    train_lm: TrainLMConfig = field(default_factory=TrainLMConfig)

    buffer: BufferConfig = field(default_factory=BufferConfig)     # streamed activations -> SAEs
    sae: SAEConfig = field(default_factory=SAEConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    train_sae: TrainSAEConfig = field(default_factory=TrainSAEConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    analyze: AnalyzeConfig = field(default_factory=AnalyzeConfig)  # reading the trained SAE
    export: ExportConfig = field(default_factory=ExportConfig)

    # ---- derived paths -------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.run_dir / "data"

    @property
    def lm_dir(self) -> Path:
        return self.run_dir / "lm"

    @property
    def sae_dir(self) -> Path:
        return self.run_dir / self.train_sae.out
