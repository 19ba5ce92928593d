"""The Factorizer block's branches keeping only their input x for backward (eager training).

- ``mlp_branch(x, norm, mlp)`` = ``mlp(norm(x))`` (:class:`~fastnmf.models.layers.ChannelLayerNorm`,
  then :class:`~fastnmf.models.layers.MLP`: pointwise conv C -> r C, GELU, dropout, pointwise
  conv -> C, dropout). The plain modules keep LN's output and statistics, fc1's output h, both
  dropout masks and fc2's input g: 23 C + 8 bytes per voxel in fp32 beside x (the MLPs held 8.2
  of the 18.5 GB a BraTS step kept, issue 17).
- ``norm_conv(x, norm, conv)`` = ``conv(norm(x))`` (LN1, then the mixer's in-projection): the
  plain modules keep LN's output (for the conv's weight gradient) and statistics beside x.

Both keep x alone (the block's residual stream, which nothing else keeps) and recompute in
backward. The MLP's backward, in an order that holds little at a time (in C-channel tensors;
the hidden ones r C):

1. LN's output n (kept to the end), fc1, GELU and dropout 1 replayed: g and dropout 1's mask;
2. dropout 2's mask replayed, applied to the incoming gradient dr: ``do``;
3. fc2's weight and bias gradients from (do, g), g freed, then its input gradient dg and
   dropout 1's backward (-> da);
4. fc1 once more (h), GELU's backward written into h (-> dh), fc1's gradients from (dh, n),
   LayerNorm's backward.

What this recomputes: LN once per branch, fc1 twice, GELU and dropout 1 once, dropout 2's mask
once. On the BraTS step (the training-step account, fake tensors: predictions) the fp32 peak
falls from 20.08 to 11.93 GB and the step's bytes grow from 167.7 to 198.9 GB.

Dropout masks are replayed exactly: the random-number generator's state of x's device is saved
before each dropout, as :func:`torch.utils.checkpoint.checkpoint` saves it, and restored around the
replay (:func:`torch.random.fork_rng`: the generator's own sequence is left as it was). The
replay calls what ``F.dropout`` runs: on CUDA (and the other devices ATen gives a fused kernel)
``native_dropout`` (a bool mask; its backward ``native_dropout_backward``), on the CPU a
Bernoulli noise tensor divided by 1 - p and multiplied in. Every gradient is computed by the op
autograd itself would call (``convolution_backward``, ``gelu_backward``, the dropout backward,
``fastnmf::channel_layer_norm_backward``) on the same values, so outputs and gradients equal the
plain formulation's bit for bit (tested on CPU: fp32 and bf16 autocast, dropout 0 and > 0, and
CUDA's fused dropout and autocast lists as the step account emulates them; not yet on a GPU).

Under autocast the recomputation runs under the forward's autocast state; each convolution's
backward gets its inputs in the dtype the forward computed it in (its output's dtype).

Used while training in eager mode only (:func:`use_lean`); evaluation, ``torch.compile``
(whose partitioner chooses what to keep) and ``torch.export`` run the plain modules.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastnmf.channel_norm import channel_layer_norm

__all__ = ["mlp_branch", "norm_conv", "use_lean", "lean_mlp_supported"]

aten = torch.ops.aten
_LN = torch.ops.fastnmf.channel_layer_norm.default
_LN_BACKWARD = torch.ops.fastnmf.channel_layer_norm_backward.default


def use_lean(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` runs its branches lean: eager training with autograd on, a (B, C, *S)
    input with 1-3 spatial dims."""
    return (
        module.training
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and x.dim() in (3, 4, 5)
    )


def lean_mlp_supported(mlp: nn.Module) -> bool:
    """Whether :func:`mlp_branch` computes ``mlp``: a GELU, one dropout rate for both dropouts,
    below 1 (p = 1 zeroes the branch). Anything else runs the plain modules."""
    return (
        isinstance(mlp.act, nn.GELU)
        and isinstance(mlp.drop1, nn.Dropout)
        and isinstance(mlp.drop2, nn.Dropout)
        and mlp.drop1.p == mlp.drop2.p < 1
    )


def _fused_dropout(t: torch.Tensor) -> bool:
    """Whether ``F.dropout`` runs ATen's fused kernel (``native_dropout``) on ``t``'s device
    (ATen's ``is_fused_kernel_acceptable``, p aside); the CPU multiplies by a noise tensor."""
    return t.device.type in ("cuda", "xpu", "lazy", torch._C._get_privateuse1_backend_name())


def _dropout_keep(t: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.dropout(t, p, True), keep)`` drawing what ``F.dropout`` draws; ``keep`` is what its
    backward uses (:func:`_dropout_grad`)."""
    if _fused_dropout(t):
        return torch.native_dropout(t, p, True)  # (out, bool mask)
    noise = torch.empty_like(t).bernoulli_(1 - p).div_(1 - p)  # ATen's _dropout_impl
    return t * noise, noise


def _dropout_grad(d: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's backward as autograd computes it: ``native_dropout_backward`` (fused) or the
    product with the noise (CPU)."""
    if keep.dtype == torch.bool:
        return aten.native_dropout_backward(d, keep, 1.0 / (1.0 - p))
    return d * keep


class _RNGState:
    """The state of the generator that dropout on ``device`` draws from, to replay it."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            self.state = torch.get_rng_state()
        else:
            self.state = torch.get_device_module(device.type).get_rng_state(device)

    @contextlib.contextmanager
    def replay(self):
        cpu = self.device.type == "cpu"
        devices = [] if cpu else [self.device]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            if cpu:
                torch.set_rng_state(self.state)
            else:
                torch.get_device_module(self.device.type).set_rng_state(self.state, self.device)
            yield


def _replay_context() -> contextlib.AbstractContextManager:
    """What the recomputation in backward runs under besides the forward's autocast state (the
    training-step account sets CUDA's dropout and autocast policy here)."""
    return contextlib.nullcontext()


def _conv_grads(dout, inp, weight, bias, *, input_grad: bool):
    """(dInput or None, dW, db or None) of a pointwise conv, in one ``convolution_backward`` as
    autograd calls it, computed in ``dout``'s dtype (the forward's; dInput in ``inp``'s)."""
    nd, has_bias = inp.dim() - 2, bias is not None
    di, dw, db = aten.convolution_backward(
        dout, inp.to(dout.dtype), weight.to(dout.dtype), [weight.shape[0]] if has_bias else None,
        [1] * nd, [0] * nd, [1] * nd, False, [0] * nd, 1, [input_grad, True, has_bias])  # fmt: skip
    return (di.to(inp.dtype) if input_grad else None, dw.to(weight.dtype),
            db.to(bias.dtype) if has_bias else None)  # fmt: skip


def _conv_input_grad(dout, weight, shape, dtype):
    """dInput of a pointwise conv (input ``shape``): only its shape is read, so a broadcast
    stand-in takes its place (as ``torch.nn.grad.conv3d_input`` does)."""
    nd = len(shape) - 2
    stand_in = dout.new_empty(1).expand(shape)
    di, _, _ = aten.convolution_backward(
        dout, stand_in, weight.to(dout.dtype), None, [1] * nd, [0] * nd, [1] * nd, False,
        [0] * nd, 1, [True, False, False])  # fmt: skip
    return di.to(dtype)


class _MLPBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps: float, p: float, approximate: str):
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        ctx.cfg = (eps, p, approximate)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))  # fmt: skip
        ctx.rng1 = _RNGState(x.device) if p > 0 else None
        g = F.dropout(F.gelu(conv(channel_layer_norm(x, ln_w, ln_b, eps), w1, b1),
                             approximate=approximate), p, True)  # fmt: skip
        ctx.rng2 = _RNGState(x.device) if p > 0 else None
        o = conv(g, w2, b2)  # (B, C, *S)
        ctx.hidden = (tuple(g.shape), g.dtype)
        ctx.out = (tuple(o.shape), o.stride(), o.dtype)
        ctx.save_for_backward(x, ln_w, ln_b, w1, b1, w2, b2)
        return F.dropout(o, p, True)

    @staticmethod
    @once_differentiable
    def backward(ctx, dr):
        x, ln_w, ln_b, w1, b1, w2, b2 = ctx.saved_tensors
        p, approximate = ctx.cfg[1:]
        replay = _Replay(ctx, x, ln_w, ln_b, w1, b1)
        # 1-2: LN's output n (kept), the hidden g and dropout 1's mask; dropout 2's backward
        n, mean, rstd = replay.norm()
        ln_dtype = n.dtype
        n = n.to(ctx.hidden[1])  # as fc1 read it (autocast's cast, once; a no-op without)
        g, keep1 = replay.hidden(n)
        do = replay.dropout2_grad(dr)  # (B, C, *S)
        # 3: fc2's gradients, g freed before dg is made; dropout 1's backward
        _, dw2, db2 = _conv_grads(do, g, w2, b2, input_grad=False)
        del g
        da = _conv_input_grad(do, w2, *ctx.hidden)  # (B, r C, *S)
        del do
        if keep1 is not None:
            da = _dropout_grad(da, keep1, p)
        del keep1
        # 4: fc1's output h again; GELU's backward written into h; fc1's and LN's gradients
        h = replay.fc1(n)
        dh = aten.gelu_backward.grad_input(da, h, approximate=approximate, grad_input=h)
        del da, h
        dn, dw1, db1 = _conv_grads(dh, n, w1, b1, input_grad=True)
        del dh, n
        dn = dn.to(ln_dtype)
        dx, dln_w, dln_b = _LN_BACKWARD(dn, x.to(ln_dtype), ln_w.to(ln_dtype), mean, rstd)
        grads = (dx.to(x.dtype), dln_w.to(ln_w.dtype), dln_b.to(ln_b.dtype), dw1, db1, dw2, db2)
        needs = ctx.needs_input_grad[: len(grads)]
        return (*(gr if need else None for gr, need in zip(grads, needs, strict=True)),
                None, None, None)  # fmt: skip


class _Replay:
    """The forward's pieces again, under its autocast state and with its dropout draws."""

    def __init__(self, ctx, x, ln_w, ln_b, w1, b1):
        self.ctx, self.x, self.ln, self.fc = ctx, x, (ln_w, ln_b), (w1, b1)
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]

    @contextlib.contextmanager
    def _forward_state(self):
        enabled, dtype = self.ctx.autocast
        with torch.autocast(self.x.device.type, dtype=dtype, enabled=enabled), _replay_context():
            yield

    def norm(self):
        """(n, mean, rstd): LN's output and statistics."""
        with self._forward_state():
            return _LN(self.x, *self.ln, self.ctx.cfg[0])

    def fc1(self, n):
        """fc1's output h."""
        with self._forward_state():
            return self.conv(n, *self.fc)

    def hidden(self, n):
        """(g, keep1): dropout 1's output and what its backward uses (None without dropout)."""
        p, approximate = self.ctx.cfg[1:]
        with self._forward_state():
            a = F.gelu(self.conv(n, *self.fc), approximate=approximate)
            if p == 0:
                return a, None
            with self.ctx.rng1.replay():
                return _dropout_keep(a, p)

    def dropout2_grad(self, dr):
        """Dropout 2's backward of dr (its mask drawn again; dr in the output's dtype)."""
        shape, stride, dtype = self.ctx.out
        p = self.ctx.cfg[1]
        dr = dr.to(dtype)
        if p == 0:
            return dr
        with self._forward_state(), self.ctx.rng2.replay():
            _, keep = _dropout_keep(torch.empty_strided(shape, stride, dtype=dtype,
                                                        device=dr.device), p)  # fmt: skip
        return _dropout_grad(dr, keep, p)


class _NormConv(torch.autograd.Function):
    """``conv(LN(x), w, b)`` keeping x only: LN's output is made again in backward for the
    conv's weight gradient (LN's forward once more; its statistics come with it)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w, b, eps: float):
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        ctx.eps = eps
        ctx.autocast = (torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))  # fmt: skip
        n = channel_layer_norm(x, ln_w, ln_b, eps)
        ctx.ln_dtype = n.dtype  # float32 under autocast
        z = conv(n, w, b)
        ctx.save_for_backward(x, ln_w, ln_b, w, b)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, dz):
        x, ln_w, ln_b, w, b = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        xs, ws = x.to(ctx.ln_dtype), ln_w.to(ctx.ln_dtype)  # as the LN read them (autocast)
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled), _replay_context():
            n, mean, rstd = _LN(xs, ws, ln_b, ctx.eps)
        dn, dw, db = _conv_grads(dz, n, w, b, input_grad=True)
        del n
        dx, dln_w, dln_b = _LN_BACKWARD(dn, xs, ws, mean, rstd)
        grads = (dx.to(x.dtype), dln_w.to(ln_w.dtype), dln_b.to(ln_b.dtype), dw, db)
        needs = ctx.needs_input_grad[: len(grads)]
        return (*(gr if need else None for gr, need in zip(grads, needs, strict=True)), None)


def norm_conv(x: torch.Tensor, norm: nn.Module, conv: nn.Module) -> torch.Tensor:
    """``conv(norm(x))`` (a ChannelLayerNorm, then a pointwise conv) keeping only x for
    backward: LN's output is made again there."""
    ln = norm.norm
    return _NormConv.apply(x, ln.weight, ln.bias, conv.weight, conv.bias, float(ln.eps))


def mlp_branch(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> torch.Tensor:
    """``mlp(norm(x))`` keeping only x for backward (see the module docstring); ``norm`` a
    :class:`~fastnmf.models.layers.ChannelLayerNorm`, ``mlp`` a
    :class:`~fastnmf.models.layers.MLP` with a GELU and one dropout rate below 1 for both
    dropouts (:func:`lean_mlp_supported`)."""
    if not lean_mlp_supported(mlp):
        raise ValueError(
            f"mlp_branch needs a GELU and one dropout rate below 1, got {type(mlp.act).__name__} "
            f"and dropout rates {mlp.drop1.p} and {mlp.drop2.p}"
        )
    ln, p = norm.norm, float(mlp.drop1.p)
    return _MLPBranch.apply(x, ln.weight, ln.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                            mlp.fc2.bias, float(ln.eps), p, mlp.act.approximate)  # fmt: skip
