"""Training-step account (issue 14, part 3): bytes, FLOPs, saved bytes, peak memory and a roofline
lower bound of one training step of every registry model, without a GPU.

One step = forward (fp32, or bf16 autocast), the training loss (``"train"``: the DiceCE with deep
supervision of :mod:`fastnmf.train`; ``"bce"``: the deep-supervision BCE the H200 model suite
timed), backward, AdamW step (``foreach``, as on CUDA; its state made by one step beforehand, as
in a timed step). Each model is built on the CPU with the brats preset (Factorizers with
``kernel="triton"``, ``seed=0`` and optionally ``checkpoint=True``; the baselines have no
checkpointing option: their checkpointed rows are left out), turned into fake tensors (shapes,
strides and dtypes only: no memory, no arithmetic; ``torch._subclasses.FakeTensorMode`` on the CPU)
and run with the NMF layers' value checks off, with CUDA's dropout and (bf16) autocast policy
(:mod:`.step_cuda`). :class:`~fastnmf.profile.static.step_ops.StepCounter` counts every op; the
NMF core is one opaque op counted by the traffic model (:mod:`.step_nmf`).

Figures per step:

- bytes (read + written) and FLOPs per op class, and per phase;
- ``saved_bytes``: the distinct storages autograd keeps for backward (``saved_tensors_hooks``;
  parameters excluded) plus, with checkpointing, the inputs the checkpoints keep;
- ``predicted_peak_bytes``: the largest total of live storages over the step (every storage from
  allocation to its last reference, as the CUDA allocator would hold it, without its rounding,
  fragmentation or library workspaces), with what was live at that moment: parameters, their
  gradients, AdamW state, saved activations, inputs and labels, and the rest (transient: outputs
  and gradients in flight);
- ``roofline_ms``: per class, the sum over its ops of max(bytes / the H200's measured copy
  bandwidth, FLOPs / the peak of the op's kind and dtype) (:mod:`.step_device`): a lower bound that
  assumes every op streams its bytes once at copy speed and ignores launch gaps;
- the H200's measured step time and peak where one exists (fp32, no checkpointing), and the error
  ``predicted / measured - 1``.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from unittest import mock

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .step_cuda import CudaPolicy
from .step_device import h200, measured_steps
from .step_nmf import nmf_as_opaque_op
from .step_ops import CLASSES, StepCounter

__all__ = ["account_steps", "account_step", "steps_markdown", "LOSSES", "CLASSES", "QUICK_MODELS"]

LOSSES = ("train", "bce")
STEP_DTYPES = ("fp32", "bf16")
_FACTORIZERS = ("swin_factorizer", "local_factorizer", "global_factorizer")
QUICK_MODELS = ("swin_factorizer", "nnunet", "swin_unetr")  # the H200's measured steps


def _build(model: str, *, checkpoint: bool, size: int, overrides: dict | None) -> nn.Module:
    from fastnmf import models

    kw = dict(overrides or {})
    if size != 128:
        kw.setdefault("spatial_size", (size,) * 3)
    if model in _FACTORIZERS:
        kw.update(kernel="triton", seed=0, checkpoint=checkpoint)
    elif checkpoint:
        raise ValueError(f"{model} has no checkpointing option (only the Factorizers have one)")
    torch.manual_seed(0)
    return models.build(model, "brats", **kw)


def _fake(net: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Every parameter and buffer of ``net`` as a fake tensor of ``mode`` (in place)."""
    for m in net.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = nn.Parameter(mode.from_tensor(p.detach()), p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = mode.from_tensor(b)
    return net


@contextlib.contextmanager
def _real_arange():
    """MONAI's DiceLoss reads its reduction axes with ``torch.arange(2, ndim).tolist()``, a
    data-dependent call that fake tensors refuse: during the loss, ``torch.arange`` of plain ints
    runs on real (CPU) tensors (a few integers; nothing of the step's traffic)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    real = torch.arange

    def arange(*args, **kwargs):
        if all(isinstance(a, int) for a in args) and not kwargs:
            with unset_fake_temporarily():
                return real(*args)
        return real(*args, **kwargs)

    with mock.patch("torch.arange", arange):
        yield


def _loss_fn(loss: str):
    if loss == "train":
        from fastnmf.train import DeepSupervisionLoss

        fn = DeepSupervisionLoss()

        def train(outs, label):
            with _real_arange():
                return fn(outs, label)

        return train

    def bce(outs, label):  # the H200 model suite: BCE of every output vs a target of its shape
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return sum(
            F.binary_cross_entropy_with_logits(o.float(), torch.empty_like(o, dtype=torch.float32))
            for o in outs
        )

    return bce


class _Saved:
    """Distinct storages autograd keeps for backward (and checkpoints keep as inputs), by the
    counter's serial numbers; parameters excluded."""

    def __init__(self, counter: StepCounter, exclude: set[int], amp: torch.dtype | None):
        self.counter = counter
        self.amp = amp
        self.exclude = exclude
        self.by_serial: dict[int, int] = {}
        self.ckpt: dict[int, int] = {}

    def _add(self, t: torch.Tensor, into: dict) -> None:
        (serial,) = self.counter.track([t])
        if serial not in self.exclude and serial not in self.by_serial:
            into[serial] = self.by_serial[serial] = t.untyped_storage().nbytes()

    def pack(self, t):
        self._add(t, {})
        return t

    @contextlib.contextmanager
    def hooks(self):
        real = torch.utils.checkpoint.checkpoint

        def kept(fn, *args, **kwargs):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self._add(a, self.ckpt)
            # the recomputation (in backward) under the same policy; checkpoint restores CUDA's
            # autocast state likewise
            amp = self.amp
            kwargs["context_fn"] = lambda: (contextlib.nullcontext(), CudaPolicy(amp))
            return real(fn, *args, **kwargs)

        with mock.patch("torch.utils.checkpoint.checkpoint", kept):
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield


@contextlib.contextmanager
def _lean_mlp_as_on_cuda(amp: torch.dtype | None):
    """The Factorizer blocks' MLP branch (:mod:`fastnmf.models.recompute`) recomputes in backward,
    outside the forward's :class:`CudaPolicy`: its replay runs under the same policy (CUDA's
    autocast lists), and its dropout replay takes CUDA's fused kernel (bool masks), as on a GPU."""
    from fastnmf.models import recompute

    with mock.patch.object(recompute, "_replay_context", lambda: CudaPolicy(amp)), \
            mock.patch.object(recompute, "_fused_dropout", lambda t: True):  # fmt: skip
        yield


@contextlib.contextmanager
def _fused_as_on_gpu():
    """Where a GPU runs the fused glue ops (fastnmf/models/fused.py), so does the account (their
    Philox seed, drawn on the host, is a constant here: fake tensors hold no values)."""
    from fastnmf.kernels import _glue
    from fastnmf.models import fused

    with mock.patch.object(fused, "_on_gpu", lambda t: True), \
            mock.patch.object(_glue, "dropout_seed", lambda: 0):  # fmt: skip
        yield


def _opt_state(opt) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


def _run_step(net, counter, mode, *, dtype, size, batch, loss) -> dict:
    """One counted training step; returns the storage groups for the peak breakdown."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)
    for p in params:  # AdamW state as in a timed step (made by a first step)
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    x = torch.empty(batch, net.in_channels, size, size, size)
    label = torch.empty(batch, net.out_channels, size, size, size)
    loss_fn = _loss_fn(loss)
    amp = CudaPolicy(torch.bfloat16 if dtype == "bf16" else None)  # the forward's policy
    amp_dtype = torch.bfloat16 if dtype == "bf16" else None
    with counter, _lean_mlp_as_on_cuda(amp_dtype), _fused_as_on_gpu():
        groups = {"params": set(counter.track([*net.parameters(), *net.buffers()])),
                  "optimizer": set(counter.track(_opt_state(opt))),
                  "inputs": set(counter.track([x, label]))}  # fmt: skip
        saved = _Saved(counter, groups["params"], amp_dtype)
        counter.phase = "forward"
        with saved.hooks(), amp:
            outs = net(x)
        counter.phase = "loss"
        with saved.hooks():
            value = loss_fn(outs, label)
        del outs
        counter.phase = "backward"
        value.backward()
        groups["grads"] = set(counter.track([p.grad for p in params]))
        counter.phase = "optimizer"
        opt.step()
    groups["saved"] = set(saved.by_serial)
    return {"groups": groups, "saved": saved}


def _peak_breakdown(sizes: dict[int, int], groups: dict) -> dict:
    out, rest = {}, set(sizes)
    for name in ("params", "optimizer", "grads", "inputs", "saved"):
        hit = rest & groups.get(name, set())
        out[name] = sum(sizes.get(k, 0) for k in hit)
        rest -= hit
    out["transient"] = sum(sizes.get(k, 0) for k in rest)
    return out


def account_step(
    model: str,
    *,
    dtype: str = "fp32",
    checkpoint: bool = False,
    size: int = 128,
    batch: int = 2,
    loss: str = "train",
    overrides: dict | None = None,
    fused: bool = True,
) -> dict:
    """The account of one training step (see the module docstring for every figure).
    ``fused=False``: the Factorizer blocks' lean branches instead of the fused glue ops a GPU
    runs (fastnmf/models/fused.py), for comparison."""
    if dtype not in STEP_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(STEP_DTYPES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    t0 = time.perf_counter()
    device = h200()
    net = _build(model, checkpoint=checkpoint, size=size, overrides=overrides).train()
    n_params = sum(p.numel() for p in net.parameters())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter = StepCounter(device)
    no_checks = mock.patch("fastnmf._checks.want_value_checks", lambda check, x: False)
    from fastnmf.models import fused as fused_module

    no_fused = {k: False for k in fused_module.ENABLED}
    switch = contextlib.nullcontext() if fused else mock.patch.dict(fused_module.ENABLED, no_fused)
    with mode, no_checks, nmf_as_opaque_op(counter), switch:
        _fake(net, mode)
        run = _run_step(net, counter, mode, dtype=dtype, size=size, batch=batch, loss=loss)
    row = _row(model, dtype, checkpoint, size, batch, loss, n_params, counter, run, device)
    row["account_seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _row(model, dtype, checkpoint, size, batch, loss, n_params, counter, run, device):
    saved = run["saved"]
    by = counter.by_class
    row = {
        "model": model, "dtype": dtype, "checkpoint": checkpoint, "size": size, "batch": batch,
        "loss": loss, "params": n_params,
        "bytes": {c: by[c]["bytes_read"] + by[c]["bytes_written"] for c in CLASSES},
        "bytes_read": {c: by[c]["bytes_read"] for c in CLASSES},
        "bytes_written": {c: by[c]["bytes_written"] for c in CLASSES},
        "flops": {c: by[c]["flops"] for c in CLASSES},
        "ops": {c: by[c]["ops"] for c in CLASSES},
        "roofline_ms": {c: by[c]["seconds"] * 1e3 for c in CLASSES},
        "by_phase": {p: dict(v) for p, v in counter.by_phase.items()},
        "views": counter.views,
        "saved_bytes": sum(saved.by_serial.values()),
        "checkpoint_kept_bytes": sum(saved.ckpt.values()),
        "predicted_peak_bytes": counter.peak_bytes,
        "peak_phase": counter.peak_phase,
        "peak_breakdown": _peak_breakdown(counter.peak_sizes, run["groups"]),
        "nmf_calls": len(counter.nmf_calls),
        # NMF calls by "dtype pass design" (e.g. "bf16 fwd d3"): what the account modelled
        "nmf_calls_by": dict(sorted(Counter(f"{c.dtype} {p} d{c.design}"
                                            for c, p in counter.nmf_calls).items())),
        "nmf_source": ", ".join(sorted(counter.nmf_sources)) or "-",
        "device": device.describe(),
    }  # fmt: skip
    row["bytes_total"] = sum(row["bytes"].values())
    row["flops_total"] = sum(row["flops"].values())
    row["roofline_ms"]["total"] = sum(row["roofline_ms"][c] for c in CLASSES)
    meas = measured_steps().get((model, dtype, checkpoint, size, batch))
    row["measured_ms"] = meas["ms"] if meas else None
    row["measured_peak_bytes"] = meas["peak_bytes"] if meas else None
    row["time_error"] = row["roofline_ms"]["total"] / meas["ms"] - 1 if meas else None
    row["peak_error"] = counter.peak_bytes / meas["peak_bytes"] - 1 if meas else None
    return row


def account_steps(
    *,
    models: Sequence[str] | None = None,
    dtypes: Sequence[str] | None = None,
    checkpoint: Sequence[bool] | None = None,
    size: int = 128,
    batch: int = 2,
    loss: str = "train",
    overrides: dict[str, dict] | None = None,
    quick: bool = False,
) -> list[dict]:
    """One row per (model, dtype, checkpoint) step; checkpointed rows for the Factorizers only.

    Defaults: every registry model, fp32 and bf16, without and with checkpointing; ``quick``:
    the models measured on the H200 (:data:`QUICK_MODELS`), fp32, no checkpointing (what the
    comparison needs; explicit ``models`` / ``dtypes`` / ``checkpoint`` still win).
    ``overrides`` maps a model name to builder options (e.g. small widths for a quick run).
    """
    from fastnmf.models import MODELS

    if models is None:
        models = QUICK_MODELS if quick else list(MODELS)
    dtypes = dtypes if dtypes is not None else (("fp32",) if quick else STEP_DTYPES)
    checkpoint = checkpoint if checkpoint is not None else ((False,) if quick else (False, True))
    names = list(models)
    for m in names:
        if m not in MODELS:
            raise ValueError(f"unknown model {m!r}; valid: {', '.join(MODELS)}")
    rows = []
    for m in names:
        for dt in dtypes:
            for ck in checkpoint:
                if ck and m not in _FACTORIZERS:
                    continue
                over = (overrides or {}).get(m)
                rows.append(account_step(m, dtype=dt, checkpoint=ck, size=size, batch=batch,
                                         loss=loss, overrides=over))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------
# report


def _gb(v) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.0f} %"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def steps_markdown(rows: list[dict]) -> list[str]:
    """The account as markdown lines: bytes and roofline per class, memory, and the comparison
    with the H200's measured steps (every error)."""
    if not rows:
        return ["(no training-step rows)"]
    out = [
        "## Training-step account (no GPU: fake tensors; predictions, not measurements)",
        "",
        f"Device model: {rows[0]['device']}. Step: forward, loss ({rows[0]['loss']}), backward, "
        f"AdamW at {rows[0]['batch']} x {rows[0]['size']}^3; NMF bytes from: "
        f"{', '.join(sorted({r['nmf_source'] for r in rows} - {'-'})) or '-'}.",
        "",
        "Bytes (read + written, GB) / roofline lower bound (ms) per op class; ops = kernels "
        "counted (NMF: the traffic model's launches):",
        "",
        "| model | dtype | ckpt | "
        + " | ".join(CLASSES)
        + " | total GB | TFLOP | ops | roofline ms |",
        "|---|---|---|" + "---:|" * (len(CLASSES) + 4),
    ]
    for r in rows:
        cells = [f"{_gb(r['bytes'][c])} / {_ms(r['roofline_ms'][c])}" for c in CLASSES]
        out.append(
            f"| {r['model']} | {r['dtype']} | {'yes' if r['checkpoint'] else 'no'} | "
            + " | ".join(cells)
            + f" | {_gb(r['bytes_total'])} | {r['flops_total'] / 1e12:.2f} | "
            f"{sum(r['ops'].values())} | {_ms(r['roofline_ms']['total'])} |"
        )
    out += [
        "",
        "Memory (GB): saved for backward, predicted peak and what was live at the peak:",
        "",
    ]
    out += [
        "| model | dtype | ckpt | saved | peak | phase | params | grads | AdamW | "
        "activations | inputs | transient |",
        "|---|---|---|" + "---:|" * 8 + "---:|",
    ]
    for r in rows:
        b = r["peak_breakdown"]
        out.append(
            f"| {r['model']} | {r['dtype']} | {'yes' if r['checkpoint'] else 'no'} | "
            f"{_gb(r['saved_bytes'])} | {_gb(r['predicted_peak_bytes'])} | {r['peak_phase']} | "
            f"{_gb(b['params'])} | {_gb(b['grads'])} | {_gb(b['optimizer'])} | "
            f"{_gb(b['saved'])} | {_gb(b['inputs'])} | {_gb(b['transient'])} |"
        )
    out += [
        "",
        "Peak = the largest total of live storages (parameters, AdamW state, gradients, what "
        "autograd keeps, inputs, tensors in flight); the CUDA allocator's rounding and "
        "fragmentation, cuDNN / cuBLAS workspaces and kernels' internal buffers are left out. "
        "Roofline = a lower bound: every op at copy bandwidth or peak FLOP rate, whichever binds, "
        "no launch gaps, no cache reuse between ops.",
        "",
        *compare_lines(rows),
    ]
    return out


def compare_lines(rows: list[dict]) -> list[str]:
    """Predictions beside the H200 measurements: every error, the order of the step times."""
    meas = [r for r in rows if r.get("measured_ms") is not None]
    if not meas:
        return ["No H200 measurement matches these rows (fp32, no checkpointing, 2 x 128^3)."]
    out = ["Against the H200 (bench/results/model_h200, fp32, no checkpointing):", "",
           "| model | roofline ms | measured ms | error | predicted peak GB | measured peak GB "
           "| error |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in meas:
        out.append(
            f"| {r['model']} | {_ms(r['roofline_ms']['total'])} | {_ms(r['measured_ms'])} | "
            f"{_pct(r['time_error'])} | {_gb(r['predicted_peak_bytes'])} | "
            f"{_gb(r['measured_peak_bytes'])} | {_pct(r['peak_error'])} |"
        )
    by_pred = [r["model"] for r in sorted(meas, key=lambda r: r["roofline_ms"]["total"])]
    by_meas = [r["model"] for r in sorted(meas, key=lambda r: r["measured_ms"])]
    same = "the same order" if by_pred == by_meas else "a different order"
    out += ["", f"Step-time order: predicted {' < '.join(by_pred)}; measured "
            f"{' < '.join(by_meas)} ({same})."]  # fmt: skip
    return out
