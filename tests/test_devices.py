"""Every tensor of the SAE training path lives on the SAE's device: proven on a CPU-only machine.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_devices.py

The trainer's functions run with accelerator.device = `cpu:1`, a device that holds its data on the host
but that every PyTorch op still reports by name, under DeviceAudit (a dispatch mode). DeviceAudit knows
which storages were made on that device (a factory or a copy with device=cpu:1, or any op with an input
there) and raises on any op that mixes such a tensor with a host tensor, as CUDA does: 0-d host scalars
and index arguments are allowed, copies are how data moves, `.cpu()` makes a host copy, and `.numpy()`
of a device tensor is an error. Covered: the data-dependent init, the step (forward, backward, Adam,
renormalisation, fire counters), the metrics, the resampling (reservoir on the host, its loss pass on the
device) and the loss-recovered eval (the LM loaded on the trainer's device).

Why not FakeTensorMode with fake `cuda` tensors: in a CPU build of torch, autograd, views, copy_ and
int() on fake CUDA tensors ask for a CUDA device guard and fail (autograd aborts the interpreter).
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from monosem import trainee as tr
from monosem.resample import Reservoir
from monosem.train_sae import check_lm

from tinyrun import make_tiny_run

DEVICE = torch.device("cpu", 1)
aten = torch.ops.aten
MOVES = {aten._to_copy.default, aten.copy_.default, aten.lift_fresh.default, aten.detach.default}
INDEX_ARGS = {aten.index.Tensor: 1, aten.index_put_.default: 1, aten.index_put.default: 1,
              aten._index_put_impl_.default: 1}


class DeviceAudit(TorchDispatchMode):
    """Tracks the storages on DEVICE; raises on an op that mixes them with host tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device: set[int] = set()
        self.ops = 0

    @staticmethod
    def _ptr(t: torch.Tensor) -> int:
        """The data pointer of t's storage (a sparse tensor: of its values)."""
        if t.layout != torch.strided:
            with torch.utils._python_dispatch._disable_current_modes():
                t = t.values()
        return t.untyped_storage().data_ptr()

    def where(self, t: torch.Tensor) -> str | None:
        on_device = self._ptr(t) in self.on_device
        if t.numel() == 0 or t.dim() == 0 and not on_device:
            return None  # empty tensors and 0-d host scalars go anywhere
        return "device" if on_device else "host"

    def mark(self, t: torch.Tensor, on_device: bool) -> None:
        ptr = self._ptr(t)
        if ptr:
            (self.on_device.add if on_device else self.on_device.discard)(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        checked = list(args)
        if func in INDEX_ARGS:  # host index tensors for a device tensor are fine, as on CUDA
            checked[INDEX_ARGS[func]] = None
        places = {self.where(t) for t in tree_flatten((checked, kwargs))[0] if torch.is_tensor(t)} - {None}
        if places == {"device", "host"} and func not in MOVES:
            shapes = [tuple(t.shape) for t in tree_flatten(args)[0] if torch.is_tensor(t)]
            raise RuntimeError(f"device mismatch: {func} mixes tensors on {DEVICE} and on the host {shapes}")
        out = func(*args, **kwargs)
        target = kwargs.get("device")
        if target is not None and torch.device(target) != torch.device("cpu"):
            on_device = torch.device(target) == DEVICE   # (a plain `cpu` may be a default filled in)
        elif func is aten._to_copy.default and target is not None:
            on_device = False                             # .to("cpu"): a host copy
        elif func is aten.copy_.default:
            on_device = self.where(args[0]) == "device"
        else:
            on_device = "device" in places
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                self.mark(t, on_device)
        return out


REAL_CPU = torch.Tensor.cpu


def _host_copy(self, *args, **kwargs):
    """Tensor.cpu(): on a CPU build a no-op for a tensor on cpu:1; here a real host copy, as on a GPU."""
    out = self.clone()
    AUDIT.mark(out, False)
    return out


def _numpy(self, *args, **kwargs):
    if AUDIT.where(self) == "device":
        raise RuntimeError(f"device mismatch: .numpy() of a tensor on {DEVICE} {tuple(self.shape)}")
    return REAL_NUMPY(self, *args, **kwargs)


AUDIT = DeviceAudit()
REAL_NUMPY = torch.Tensor.numpy


REAL_DEVICE = torch._C.TensorBase.device


def _device(self) -> torch.device:
    """Tensor.device: cpu:1 for a tensor on the device (so `.to(x.device)` and `device=x.device` place
    new tensors as they would on a GPU), the real device otherwise."""
    real = REAL_DEVICE.__get__(self)
    return DEVICE if real.type == "cpu" and AUDIT.where(self) == "device" else real


@contextlib.contextmanager
def audited():
    torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.device = _host_copy, _numpy, property(_device)
    AUDIT.on_device.clear()
    try:
        with AUDIT:
            yield AUDIT
    finally:
        del torch.Tensor.device
        torch.Tensor.cpu, torch.Tensor.numpy = REAL_CPU, REAL_NUMPY


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("dev")
    return make_tiny_run([f"--run.root={root}", "--data.max_tokens=20000", "--train_sae.eval_contexts=4",
                          "--train_sae.batch_size=64", "--train_sae.dead_window=1",
                          "--buffer.pool_size=512", "--buffer.slot_vectors=128"])


def accelerator() -> SimpleNamespace:
    """What the trainer uses of accelerate's single-device Accelerator (prepare returns its inputs)."""
    return SimpleNamespace(device=DEVICE, prepare=lambda *objs: objs, backward=lambda loss: loss.backward(),
                           clip_grad_norm_=torch.nn.utils.clip_grad_norm_)


@pytest.mark.parametrize("recipe,sparse", [("anthropic-2023", "off"), ("anthropic-2023", "on"),
                                           ("anthropic-2024-04", "auto"), ("topk", "on")])
def test_training_path_stays_on_the_sae_device(cfg, recipe, sparse):
    cfg.sae.recipe, cfg.sae.k, cfg.train_sae.sparse = recipe, 8, sparse
    x_host = torch.randn(cfg.train_sae.batch_size, cfg.sae.d_in)          # what the pool holds
    reservoir = Reservoir(256, d_in=cfg.sae.d_in)
    reservoir.add(x_host)
    with audited() as audit:
        trainees = tr.build_trainees(cfg, accelerator(), None)
        t = trainees[0]
        assert audit.where(t.sae.W_enc) == audit.where(t.last_fired) == "device"
        x = x_host.to(DEVICE)                                # buffer.next_batch(B, accelerator.device)
        tr.init_from_batch(trainees, x)
        for step in range(3):
            tr.forward_backward(t, x, step, cfg)
            tr.optimizer_step(t, step, cfg)
        tr.log_metrics(trainees, 3, cfg, {"fill": 1.0}, vectors_per_s=1.0)
        assert audit.where(t.opt.state[t.sae.W_enc]["exp_avg"]) == "device"
        t.last_fired.zero_()
        assert tr.resample_dead(t, reservoir, 5, cfg) == (cfg.sae.n_features if recipe == "anthropic-2023" else 0)
        lm = check_lm(cfg, DEVICE)                           # the eval LM on the trainer's device
        assert audit.where(next(lm.parameters())) == "device"
        out = tr.eval_loss_recovered(trainees, lm, cfg, 4)
        assert audit.where(t.state_dict()["last_fired"]) == "host"  # checkpoints hold host copies
    assert 0 < audit.ops and set(out) == {f"sae/eval/{k}" for k in ("ce_clean", "ce_spliced",
                                                                      "ce_zero", "loss_recovered")}


def test_the_audit_catches_a_host_batch_and_a_host_lm(cfg):
    """It can fail: the mistakes it guards against raise here."""
    cfg.sae.recipe, cfg.train_sae.sparse = "anthropic-2023", "auto"
    x_host = torch.randn(cfg.train_sae.batch_size, cfg.sae.d_in)
    with audited():
        trainees = tr.build_trainees(cfg, accelerator(), None)
        with pytest.raises(RuntimeError, match="device mismatch"):
            tr.forward_backward(trainees[0], x_host, 0, cfg)
        lm_on_host = check_lm(cfg, torch.device("cpu"))
        with pytest.raises(RuntimeError, match="device mismatch"):
            tr.eval_loss_recovered(trainees, lm_on_host, cfg, 1)
        with pytest.raises(RuntimeError, match="device mismatch"):
            torch.zeros(3) + torch.ones(3, device=DEVICE)


def test_the_buffer_hands_batches_to_the_device(cfg):
    from monosem.buffer import ActivationBuffer

    with ActivationBuffer(cfg, rank=0, world_size=1, lm_path=cfg.lm_dir, data_dir=cfg.data_dir) as buf:
        with audited() as audit:
            x, ids = buf.next_batch(cfg.train_sae.batch_size, DEVICE)
            assert audit.where(x) == "device" and audit.where(ids) == "host" and x.dtype == torch.float32
