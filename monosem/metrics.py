"""Metrics: SAE quality numbers, the feature-density histogram, loss recovered, and a TensorBoard writer.

Knows nothing of training or distribution: callers hand it already-reduced numbers and tensors.
Only rank 0 writes; other ranks build a disabled writer whose methods do nothing.

    with MetricsWriter("runs/tiny/sae/tb", enabled=rank == 0, config_text=to_toml(cfg)) as tb:
        tb.scalars(step, {"train/loss": loss, "train/l0": l0(f), "train/fvu": fvu(x, out.x_hat)})
        tb.density(step, fire_counts, n_vectors, png_path="runs/tiny/report/density.png")
View: `tensorboard --logdir runs/tiny/sae/tb`; read back in tests: `read_scalars(logdir)`.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from monosem.errors import MonosemError
from monosem.files import write_bytes_atomic

# The tags the trainer logs (any other tag is accepted too).
TAGS = ("train/loss", "train/mse", "train/l1", "train/l0", "train/fvu", "train/lr",
        "features/dead_frac", "features/ultralow_frac", "eval/loss_recovered",
        "perf/vectors_per_s", "perf/tokens_per_s", "buffer/fill", "buffer/producer_wait_s",
        "buffer/consumer_wait_s", "buffer/shuffle_quality")
DEAD_LOG10 = -10.0      # dead features sit here in the log10-density histogram (lower if 1/n_vectors is)
BIN_WIDTH = 0.1         # decades per histogram bucket
FIG_SIZE, FIG_DPI = (6.4, 3.6), 100   # -> a 640 x 360 PNG
ULTRALOW_EVIDENCE = 10.0  # ultralow is only judged once a feature at the threshold would fire this often


# ---- pure metric functions ---------------------------------------------------------------------
def l0(f: Tensor) -> float:
    """Mean number of non-zero features per vector; f: [..., n_features]."""
    n_vectors = f.numel() // max(f.shape[-1], 1)
    if n_vectors == 0:
        raise MonosemError(f"l0: feature activations of shape {tuple(f.shape)} hold no vectors")
    return (f != 0).sum().item() / n_vectors


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained: sum ‖x − x̂‖² / sum ‖x − mean(x)‖² over vectors [..., d].

    The mean is per input dimension over the vectors given. Computed in float64. NaN if x is constant.
    """
    if x.shape != x_hat.shape:
        raise MonosemError(f"fvu: x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    x64 = x.reshape(-1, x.shape[-1]).double()                          # [N, d]
    sse = (x64 - x_hat.reshape(x64.shape).double()).square().sum()
    sst = (x64 - x64.mean(dim=0)).square().sum()
    return (sse / sst).item() if sst > 0 else float("nan")


def fvu_from_sse(sse: float, x: Tensor) -> float:
    """fvu() when the squared error sum ‖x − x̂‖² is already known (the training step computes it): one cheap
    float32 pass over x [..., d] for the variance, centred first so the sum loses no digits. NaN if x is
    constant."""
    xc = x.reshape(-1, x.shape[-1]).float()
    xc = (xc - xc.mean(dim=0)).view(-1)                                 # [N * d], centred per dimension
    sst = torch.dot(xc, xc).item()
    return sse / sst if sst > 0 else float("nan")


def _check_counts(fire_counts: Tensor, n_vectors: int) -> None:
    if fire_counts.dim() != 1:
        raise MonosemError(f"fire_counts must be 1-D [n_features], got shape {tuple(fire_counts.shape)}")
    if n_vectors <= 0:
        raise MonosemError(f"n_vectors must be > 0, got {n_vectors}")
    if fire_counts.numel() and (fire_counts.min() < 0 or fire_counts.max() > n_vectors):
        raise MonosemError(f"fire_counts must lie in [0, n_vectors={n_vectors}], got "
                           f"[{fire_counts.min().item()}, {fire_counts.max().item()}]")


def feature_density(fire_counts: Tensor, n_vectors: int) -> Tensor:
    """Fraction of vectors on which each feature fired: float64 [n_features] (counts may exceed 2^24)."""
    _check_counts(fire_counts, n_vectors)
    return fire_counts.double() / n_vectors


def dead_and_ultralow(fire_counts: Tensor, n_vectors: int, window_fire: Tensor,
                      threshold: float = 1e-6) -> dict[str, float]:
    """Dead and ultralow-density features, as fractions and counts (floats, ready for `scalars`).

    dead: no fire inside the dead window; window_fire is a bool mask "fired in the window" or fire
    counts over the window [n_features]. ultralow: alive (not dead) but density fire_counts/n_vectors
    < threshold. A density that low can only be told from "rare but normal" once a feature at the
    threshold would have fired ULTRALOW_EVIDENCE (10) times, so while n_vectors < 10 / threshold
    (1e7 for 1e-6) ultralow_frac and ultralow_count are NaN.
    Keys: dead_frac, dead_count, ultralow_frac, ultralow_count, n_features.
    """
    density = feature_density(fire_counts, n_vectors)
    if window_fire.shape != fire_counts.shape:
        raise MonosemError(f"window_fire {tuple(window_fire.shape)} and fire_counts "
                           f"{tuple(fire_counts.shape)} differ in shape")
    n_features = fire_counts.numel()
    dead = ~(window_fire.to(density.device) > 0)                      # [n_features] bool
    out = {"dead_count": float(dead.sum().item()), "n_features": float(n_features)}
    out["dead_frac"] = out["dead_count"] / max(n_features, 1)
    if n_vectors >= ULTRALOW_EVIDENCE / threshold:
        out["ultralow_count"] = float((~dead & (density < threshold)).sum().item())
        out["ultralow_frac"] = out["ultralow_count"] / max(n_features, 1)
    else:
        out["ultralow_count"] = out["ultralow_frac"] = float("nan")
    return out


def log10_density(fire_counts: Tensor, n_vectors: int) -> tuple[np.ndarray, float]:
    """(log10 density per feature [n_features] float64, floor); dead (never-fired) features sit at floor.

    floor = DEAD_LOG10 (-10), or one decade below the resolution 1/n_vectors if that is lower.
    """
    density = feature_density(fire_counts, n_vectors).cpu().numpy()
    floor = min(DEAD_LOG10, math.floor(math.log10(1.0 / n_vectors)) - 1.0)
    logd = np.full(density.shape, floor)
    alive = density > 0
    logd[alive] = np.log10(density[alive])
    return logd, floor


def density_image(fire_counts: Tensor, n_vectors: int, title: str = "") -> np.ndarray:
    """The feature-density plot (alive features; the dead count in the title) as RGB uint8 [H, W, 3]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure   # no pyplot: no global state, no GUI backend

    logd, floor = log10_density(fire_counts, n_vectors)
    alive = logd > floor
    lo = math.floor(math.log10(1.0 / n_vectors))
    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(logd[alive], bins=np.arange(lo, BIN_WIDTH / 2, BIN_WIDTH), color="tab:blue")
    ax.axvline(math.log10(1.0 / n_vectors), color="grey", ls="--", lw=1, label="1 / n_vectors")
    ax.set_xlim(lo, 0)
    ax.set_xlabel("log10 feature density")
    ax.set_ylabel("features")
    ax.set_title(f"{title}  alive {int(alive.sum())}, dead {int((~alive).sum())} (not shown), "
                 f"n={n_vectors:,}".strip(), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()            # [H, W, 3] uint8


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 [H, W, 3] array as PNG (Pillow ships with matplotlib)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ---- loss recovered by splicing ----------------------------------------------------------------
@torch.no_grad()
def loss_recovered(lm: nn.Module, tokens: Tensor, reconstruct: Callable[[Tensor], Tensor],
                   batch_size: int = 16, baseline: dict[str, float] | None = None) -> dict[str, float]:
    """Next-token CE with the hook MLP activations clean, zero-ablated, and replaced by reconstruct(h).

    tokens: int64 [B, T] contexts (inputs tokens[:, :-1], targets tokens[:, 1:]). reconstruct gets the
    flattened activations [N, d_mlp] (SAE-shaped) and returns [N, d_mlp]. Runs batch_size contexts per
    forward (the 50k-wide logits are big); every target counts (no ignored ids).
    loss_recovered = (ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 for a perfect reconstruction,
    0 for one as bad as zeros; NaN if zeros cost nothing.
    baseline: ce_clean and ce_zero of an earlier call with the same LM and tokens (they do not depend on
    the reconstruction): only the spliced pass runs, a third of the work.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise MonosemError(f"loss_recovered: tokens must be [B, T>=2], got {tuple(tokens.shape)}")

    def splice(h: Tensor) -> Tensor:                                   # h: [b, t, d_mlp]
        x_hat = reconstruct(h.reshape(-1, h.shape[-1]))
        if x_hat.shape != (h.numel() // h.shape[-1], h.shape[-1]):
            raise MonosemError(f"loss_recovered: reconstruct returned {tuple(x_hat.shape)} for "
                               f"input {(h.numel() // h.shape[-1], h.shape[-1])}")
        return x_hat.reshape(h.shape).to(h.dtype)

    device = next(lm.parameters()).device
    fns = ({"ce_spliced": splice} if baseline is not None else
           {"ce_clean": None, "ce_zero": torch.zeros_like, "ce_spliced": splice})
    sums = dict.fromkeys(fns, 0.0)
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        for name, fn in fns.items():
            _, loss = lm(chunk[:, :-1], chunk[:, 1:], mlp_fn=fn)
            sums[name] += loss.item() * chunk.shape[0]                  # mean CE -> sum over contexts
    out = {name: s / tokens.shape[0] for name, s in sums.items()}
    if baseline is not None:
        out |= {"ce_clean": baseline["ce_clean"], "ce_zero": baseline["ce_zero"]}
    gap = out["ce_zero"] - out["ce_clean"]
    out["loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap != 0 else float("nan")
    return out


# ---- the TensorBoard writer --------------------------------------------------------------------
class MetricsWriter:
    """TensorBoard event writer for rank 0; with enabled=False every method is a no-op and nothing is written.

    purge_step: on resume, pass the checkpoint's step so TensorBoard drops events the killed run wrote
    after it (no doubled curves).
    """

    def __init__(self, logdir: str | Path, enabled: bool = True, config_text: str | None = None,
                 purge_step: int | None = None):
        self.logdir, self.enabled, self._tb = Path(logdir), enabled, None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.logdir), purge_step=purge_step)
        if config_text is not None:   # indented = a Markdown code block: TOML stays readable in TB
            self._tb.add_text("config", "\n".join("    " + line for line in config_text.splitlines()),
                              purge_step or 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One scalar per tag (e.g. "train/loss"); tensors of one element are accepted."""
        if self._tb is None:
            return
        for tag, value in values.items():
            if not isinstance(tag, str) or not tag:
                raise MonosemError(f"metrics: scalar tag must be a non-empty string, got {tag!r}")
            self._tb.add_scalar(tag, float(value), step)

    def density(self, step: int, fire_counts: Tensor, n_vectors: int,
                png_path: str | Path | None = None, image: bool = True) -> None:
        """Log10 feature density: histogram "features/log10_density" (dead features at the floor,
        DEAD_LOG10 = -10, so bucket counts sum to n_features) and, if image, image "features/density_png"
        (alive features only, the dead count in the title; ~0.3 s of matplotlib, so callers may log it
        less often); the PNG is also saved to png_path if given."""
        if self._tb is None:
            return
        logd, floor = log10_density(fire_counts, n_vectors)
        n_bins = int(round(-floor / BIN_WIDTH)) + 1      # bucket centres floor, ..., 0: dead alone in one
        edges = floor - BIN_WIDTH / 2 + BIN_WIDTH * np.arange(n_bins + 1)
        self._tb.add_histogram("features/log10_density", logd, step, bins=edges)
        if not image and png_path is None:
            return
        rgb = density_image(fire_counts, n_vectors, title=f"step {step}")
        if image:
            self._tb.add_image("features/density_png", rgb, step, dataformats="HWC")
        if png_path is not None:
            write_bytes_atomic(png_path, png_bytes(rgb))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- reading event files back (tests, tools) ---------------------------------------------------
def _accumulator(logdir: str | Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    if not Path(logdir).is_dir():
        raise MonosemError(f"TensorBoard log folder {str(logdir)!r} does not exist")
    keep_all = {ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.TENSORS: 0}   # default keeps 1 histogram
    acc = ea.EventAccumulator(str(logdir), size_guidance=keep_all)
    acc.Reload()
    return acc


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files in logdir."""
    acc = _accumulator(logdir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_histograms(logdir: str | Path) -> dict[str, list[tuple[int, dict]]]:
    """{tag: [(step, {"num", "min", "max", "sum", "bucket_limit", "bucket"}), ...]}."""
    acc = _accumulator(logdir)
    out = {}
    for tag in acc.Tags()["histograms"]:
        out[tag] = [(e.step, {"num": e.histogram_value.num, "min": e.histogram_value.min,
                              "max": e.histogram_value.max, "sum": e.histogram_value.sum,
                              "bucket_limit": list(e.histogram_value.bucket_limit),
                              "bucket": list(e.histogram_value.bucket)})
                    for e in acc.Histograms(tag)]
    return out


def read_images(logdir: str | Path) -> dict[str, list[tuple[int, bytes, int, int]]]:
    """{tag: [(step, png_bytes, width, height), ...]}."""
    acc = _accumulator(logdir)
    return {tag: [(e.step, e.encoded_image_string, e.width, e.height) for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]}


def read_texts(logdir: str | Path) -> dict[str, list[tuple[int, str]]]:
    """{tag: [(step, text), ...]} for add_text summaries (tag "<name>/text_summary")."""
    acc = _accumulator(logdir)
    return {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def last_scalars(tb_root: str | Path) -> dict[str, float]:
    """{"<run>/<tag>": last value} over the TensorBoard runs (sub-folders) of tb_root ({} if none)."""
    root = Path(tb_root)
    if not root.is_dir():
        return {}
    return {f"{run.name}/{tag}": values[-1][1] for run in sorted(root.iterdir()) if run.is_dir()
            for tag, values in read_scalars(run).items() if values}
