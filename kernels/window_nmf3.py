"""Rank-one window NMF, third design: the second design's three passes in one persistent launch,
pipelined plane by plane so that the output pass reads x from L2, not DRAM.

Same interface and result as :mod:`.window_nmf` (selected by ``window_nmf.TUNING["design"] = 3``;
the first design stays the default until a GPU has timed the others). DESIGN.md §6 (b).

The second design (kernels/window_nmf2.py) reads x twice: once for every shift's part statistics,
once for the output, and x (537 MB at 2x32x128^3 fp32) is far larger than L2, so the second read
comes from DRAM. Here the volume is walked along the *pipelining axis* A (the first axis with more
than one window; axis 0 in 3D): a *plane* is the windows with the same grid coordinate along A
(contiguous in window order). Per batch*head the work is a list of *stages*, each a pass over one
plane, cut into chunks of WPP windows (tickets):

    parts(0), parts(1), solve(1), parts(2), solve(2), apply(1), ..., parts(n-1), solve(n-1),
    apply(n-2), then solve(0), apply(n-1), apply(0)

(``_schedule``). With every shift's whole-window offset along A zero (Q_A = 0: shifts smaller
than the window along A, true of [None, 4] and [None, 2, 4, 6] with P = 8), a shifted window of
plane p holds parts of planes p and p - 1 (cyclically), and an unshifted window of plane p lies
in shifted windows of planes p and p + 1; so solve(p) needs parts(p), parts(p - 1), apply(p)
needs solve(p), solve(p + 1), and each stage's needs come earlier in the list (checked on the
host; other shifts fall back to the second design). apply(p) runs about one plane after parts(p)
read the same x: with the chunks in flight, a few MB apart (4 MB per plane per head at 128^2 x 8
voxels x E = 8 fp32), well inside an H200's 60 MB L2. Only plane 0's output pass, deferred to the
end (its shifted windows wrap around to plane n - 1), reads x from DRAM again: 1/n of x.

Ordering: programs take tickets in increasing order from a counter (``tl.atomic_add`` on a flag,
never on a value); a stage waits (acquire) until the stages it needs have all their chunks done
(a per-(batch*head, pass, plane) count, incremented with release after a barrier). A program
waits only for tickets taken before its own, whose programs are running, so there is no deadlock
whatever the grid size or residency, and under the interpreter (programs run one after another)
program 0 simply takes every ticket in order. Every value is still written by one program in a
fixed order, so results are bitwise deterministic; data written by other programs of the launch
(part statistics, u) is loaded with ``.cg`` (L2, not a possibly stale L1 line).

Two launches per call (the flag buffer's zero fill and the kernel); the backward is the second
design's (three launches). The solves run WPP shifted windows at once ((WPP, E, E) tiles) so that
a program's warps are busy in that pass too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, compute_dtype, window_inputs
from ._window2_common import _Geometry2, _shifted_g_all, _tri, _window_origin
from .window_nmf2 import WindowNMF2, _apply_window, _membership, _parts_window

__all__ = ["window_nmf3", "fused_plan"]

PASSES = ("parts", "solve", "apply")
# The persistent launch: programs per SM, warps per program (None: the defaults below, from the
# sm_90a compiles of the static report), and the SM count where the device is not a GPU (the
# static suite's stub driver sets it to its target's; None elsewhere: two programs)
TUNING: dict = {"programs_per_sm": None, "warps": None, "sms": None}
_PROGRAMS_PER_SM = 1
_WARPS = 16


@triton.jit
def _wait_for(flag_ptr, need):
    """Spin until the count at flag_ptr reaches need (acquire: what the counted programs wrote
    before their release is visible after)."""
    n = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while n < need:
        n = tl.atomic_add(flag_ptr, 0, sem="acquire")


@triton.jit
def _solve_batch(kpart_ptr, hpart_ptr, u_ptr, hats_ptr, norms_ptr, kmat_ptr, bh, om, ok,
                 E: tl.constexpr, NWIN, ITERS, NW0, NW1, NW2, SHIFTS: tl.constexpr,
                 NSHIFT: tl.constexpr, NB: tl.constexpr, BLOCK_E: tl.constexpr,
                 SAVE: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """The second design's solve (``_solve_kernel``) for the shifted windows om (NB,) (ok: which
    exist) at once: per shift, the part sums (same order), K saved, the power steps, u."""
    e = tl.arange(0, BLOCK_E)
    i3 = e[None, :, None]
    j3 = e[None, None, :]
    sym = _tri(tl.minimum(i3, j3), tl.maximum(i3, j3), E)  # K[i, j] from the packed triangle
    m3 = ok[:, None, None] & (i3 < E) & (j3 < E)
    m2 = ok[:, None] & (e[None, :] < E)
    o0, o1, o2 = _window_origin(om, NW1, NW2)
    for k in tl.static_range(NSHIFT):
        k_mat = tl.zeros((NB, BLOCK_E, BLOCK_E), dtype=ACC)
        h = tl.zeros((NB, BLOCK_E), dtype=ACC)
        for b2 in tl.static_range(2 if SHIFTS[k][2] else 1):
            w2 = (o2 - b2 - SHIFTS[k][5] + 2 * NW2) % NW2
            for b1 in tl.static_range(2 if SHIFTS[k][1] else 1):
                w1 = (o1 - b1 - SHIFTS[k][4] + 2 * NW1) % NW1
                for b0 in tl.static_range(2 if SHIFTS[k][0] else 1):
                    w0 = (o0 - b0 - SHIFTS[k][3] + 2 * NW0) % NW0
                    w = (w0 * NW1 + w1) * NW2 + w2  # the unshifted windows holding part b
                    slot = (bh * NWIN + w) * (NSHIFT * 8) + k * 8 + (b0 * 2 + b1) * 2 + b2
                    k_mat += tl.load(kpart_ptr + slot[:, None, None] * (E * E) + sym, mask=m3,
                                     other=0, cache_modifier=".cg")  # fmt: skip
                    h += tl.load(hpart_ptr + slot[:, None] * E + e[None, :], mask=m2, other=0,
                                 cache_modifier=".cg")  # fmt: skip
        prog = (bh * NSHIFT + k) * NWIN + om
        hp = hats_ptr + prog[:, None] * (ITERS * E) + e[None, :]
        np_ = norms_ptr + prog * ITERS
        if SAVE:  # K for the backward (packed upper triangle)
            tl.store(kmat_ptr + prog[:, None, None] * (E * E) + _tri(i3, j3, E), k_mat,
                     mask=m3 & (j3 >= i3))  # fmt: skip
        norm = tl.sqrt(tl.sum(h * h, axis=1))
        a_hat = tl.where(norm[:, None] > 0, h / tl.where(norm > 0, norm, 1)[:, None], 0)
        if SAVE:
            tl.store(hp, a_hat, mask=m2)
            tl.store(np_, norm, mask=ok)
        for t in range(1, ITERS):
            a = tl.sum(k_mat * a_hat[:, None, :], axis=2)
            norm = tl.sqrt(tl.sum(a * a, axis=1))
            a_hat = tl.where(norm[:, None] > 0, a / tl.where(norm > 0, norm, 1)[:, None], 0)
            if SAVE:
                tl.store(hp + t * E, a_hat, mask=m2)
                tl.store(np_ + t, norm, mask=ok)
        tl.store(u_ptr + prog[:, None] * E + e[None, :], a_hat, mask=m2)


@triton.jit
def _wait_stage(flags, npl, plane, before: tl.constexpr, need, SHIFTS: tl.constexpr,
                NSHIFT: tl.constexpr, AX: tl.constexpr):  # fmt: skip
    """Wait for the planes a stage needs of the pass before it: for every shift, planes
    plane -/+ (b + Q_AX) (b = 0, and 1 where the shift splits axis AX); ``before`` 1: parts -> solve
    (minus), 2: solve -> apply (plus). flags: the batch*head's (pass, plane) counts."""
    for k in tl.static_range(NSHIFT):
        for b in tl.static_range(2 if SHIFTS[k][AX] else 1):
            if before == 1:
                dep = (plane - b - SHIFTS[k][3 + AX] + 2 * npl) % npl
            else:
                dep = (plane + b + SHIFTS[k][3 + AX]) % npl
            _wait_for(flags + (before - 1) * npl + dep, need)


@triton.jit
def _fused_kernel(
    x_ptr, y_ptr, g0_ptr, rowmask_ptr, kpart_ptr, hpart_ptr, u_ptr, hats_ptr, norms_ptr,
    kmat_ptr, sched_ptr, flag_ptr,
    C, E: tl.constexpr, HEADS, NWIN, NVOX, ITERS, S1, S2, NW0, NW1, NW2,
    NTICKET, CPP, NSTAGE, NPLANE, NPL,
    SHIFTS: tl.constexpr, NSHIFT: tl.constexpr, WPP: tl.constexpr, AX: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    BP0: tl.constexpr, BP1: tl.constexpr, BP2: tl.constexpr,
    BLOCK_E: tl.constexpr, NSB: tl.constexpr, G0: tl.constexpr, G1: tl.constexpr,
    G2: tl.constexpr, MU: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, NPB: tl.constexpr,
    SAVE: tl.constexpr,
):  # fmt: skip
    """Persistent: take tickets (batch*head, stage, chunk) in order until none is left; a stage
    is (pass, plane) from the schedule table; wait for what it needs, run its chunk of WPP
    windows, count the chunk done. The ticket counter is the flag buffer's last element."""
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    rowmask = tl.load(rowmask_ptr + e, mask=emask, other=0).to(ACC)
    g_all = _shifted_g_all(g0_ptr, SHIFTS, NSHIFT, NSB, P0, P1, P2, BP0, BP1, BP2, ACC, True)
    member = 0
    exists = 0
    if DOT:
        member, exists = _membership(SHIFTS, NSHIFT, P0, P1, P2, BP0 // D0, BP1 // D1,
                                     BP2 // D2, D0, D1, D2, NPB, ACC)  # fmt: skip
    ticket_ptr = flag_ptr + NTICKET // (NSTAGE * CPP) * 3 * NPL
    t = tl.atomic_add(ticket_ptr, 1)
    while t < NTICKET:
        bh = t // (NSTAGE * CPP)
        r = t - bh * (NSTAGE * CPP)
        stage = r // CPP
        chunk = r - stage * CPP
        phase = tl.load(sched_ptr + 2 * stage)
        plane = tl.load(sched_ptr + 2 * stage + 1)
        offset = ((bh // HEADS) * C + (bh % HEADS) * E).to(tl.int64) * NVOX
        flags = flag_ptr + bh * 3 * NPL
        first = chunk * WPP  # in the plane
        if phase == 0:
            for j in range(0, WPP):
                if first + j < NPLANE:
                    _parts_window(x_ptr + offset, rowmask, e, emask, plane * NPLANE + first + j,
                                  bh, g_all, member, exists, kpart_ptr, hpart_ptr, E, NWIN, NVOX,
                                  S1, S2, NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1, BP2,
                                  BLOCK_E, NSB, G0, G1, G2, MU, ACC, DOT, D0, D1, D2,
                                  NPB)  # fmt: skip
        elif phase == 1:
            _wait_stage(flags, NPL, plane, 1, CPP, SHIFTS, NSHIFT, AX)
            i = first + tl.arange(0, WPP)
            _solve_batch(kpart_ptr, hpart_ptr, u_ptr, hats_ptr, norms_ptr, kmat_ptr, bh,
                         plane * NPLANE + i, i < NPLANE, E, NWIN, ITERS, NW0, NW1, NW2, SHIFTS,
                         NSHIFT, WPP, BLOCK_E, SAVE, ACC)  # fmt: skip
        else:
            _wait_stage(flags, NPL, plane, 2, CPP, SHIFTS, NSHIFT, AX)
            for j in range(0, WPP):
                if first + j < NPLANE:
                    _apply_window(x_ptr + offset, y_ptr + offset, rowmask, e, emask,
                                  plane * NPLANE + first + j, bh, g_all, u_ptr, E, NWIN, NVOX,
                                  S1, S2, NW0, NW1, NW2, SHIFTS, NSHIFT, P0, P1, P2, BP0, BP1,
                                  BP2, BLOCK_E, NSB, G0, G1, G2, MU, ACC, ".cg")  # fmt: skip
        tl.debug_barrier()  # every thread's stores before the count (release)
        tl.atomic_add(flags + phase * NPL + plane, 1, sem="release")
        t = tl.atomic_add(ticket_ptr, 1)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _schedule(npl: int) -> list[tuple[int, int]]:
    """The stages (pass index into PASSES, plane) of one batch*head, in ticket order."""
    order = []
    for p in range(npl):
        order.append((0, p))
        if p >= 1:
            order.append((1, p))
        if p >= 2:
            order.append((2, p - 1))
    order.append((1, 0))
    if npl >= 2:
        order.append((2, npl - 1))
    order.append((2, 0))
    return order


def _needs(stage: tuple[int, int], npl: int, splits: list[bool], offsets: list[int]):
    """The (pass, plane) stages a stage needs: solve(p) the parts of the planes holding its
    shifted windows' parts, apply(p) the solves of the shifted windows its windows lie in."""
    phase, p = stage
    if phase == 0:
        return set()
    sign = -1 if phase == 1 else 1
    return {
        (phase - 1, (p + sign * (b + q)) % npl)
        for split, q in zip(splits, offsets, strict=True)
        for b in ((0, 1) if split else (0,))
    }


@functools.lru_cache(maxsize=64)
def fused_plan(nw: tuple[int, int, int], shifts: tuple) -> tuple | None:
    """(pipelining axis, schedule) for a window grid nw and the shift constants of
    :class:`_Geometry2`, or None where the schedule would wait on a later stage (a shift with a
    whole-window offset along the axis): then the second design runs instead."""
    ax = next((d for d in range(3) if nw[d] > 1), 0)
    npl = nw[ax]
    order = _schedule(npl)
    splits = [s[ax] > 0 for s in shifts]
    offsets = [s[3 + ax] for s in shifts]
    done = set()
    for stage in order:
        if not _needs(stage, npl, splits, offsets) <= done:
            return None
        done.add(stage)
    return ax, tuple(order)


@functools.lru_cache(maxsize=64)
def _schedule_table(order: tuple, device: str) -> torch.Tensor:
    """The schedule as an int32 (stages, 2) device tensor, made once per schedule and device
    (no host -> device copy per call)."""
    return torch.tensor(order, dtype=torch.int32).to(device)


def _programs(device: torch.device, tickets: int) -> int:
    """The persistent grid: resident programs (SMs x programs per SM) on a GPU (or the SMs of
    ``TUNING["sms"]``); else two (under the interpreter the second finds no ticket left: the
    exit path is exercised)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    elif TUNING["sms"]:
        sms = TUNING["sms"]
    else:
        return min(tickets, 2)
    return min(tickets, sms * (TUNING["programs_per_sm"] or _PROGRAMS_PER_SM))


def _fused_forward(x, g0, rowmask, geo: _Geometry2, plan, iters: int, mu: bool, save: bool):
    ax, order = plan
    f32 = compute_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    dev = x.device
    npl = geo.NW[ax]
    nplane = geo.nwin // npl  # windows per plane (contiguous in window order)
    cpp = triton.cdiv(nplane, geo.wpp)
    tickets = geo.bh * len(order) * cpp
    kpart = torch.empty(geo.slots, geo.E, geo.E, dtype=f32, device=dev)  # unused slots: unread
    hpart = torch.empty(geo.slots, geo.E, dtype=f32, device=dev)
    u = torch.empty(geo.progs, geo.E, dtype=f32, device=dev)
    hats = torch.empty(geo.progs, iters, geo.E, dtype=f32, device=dev) if save else u
    norms = torch.empty(geo.progs, iters, dtype=f32, device=dev) if save else u
    kmat = torch.empty(geo.progs, geo.E, geo.E, dtype=f32, device=dev) if save else u
    flags = torch.zeros(geo.bh * 3 * npl + 1, dtype=torch.int32, device=dev)  # + the ticket
    y = torch.empty_like(x)
    _fused_kernel[(_programs(dev, tickets),)](
        x, y, g0, rowmask, kpart, hpart, u, hats, norms, kmat,
        _schedule_table(order, str(dev)), flags,
        geo.channels, geo.E, geo.heads, geo.nwin, geo.nvox, iters, geo.S[1], geo.S[2], *geo.NW,
        tickets, cpp, len(order), nplane, npl,
        **geo.consts(), **geo.block(), AX=ax, MU=mu, ACC=acc, **geo.dot(acc, mu), SAVE=save,
        num_warps=TUNING["warps"] or _WARPS,
    )  # fmt: skip
    if not save:
        hats = norms = kmat = None
    return y, hats, norms, kmat


class WindowNMF3(torch.autograd.Function):
    """Rank-one matricized NMF over windows, third design forward (one persistent launch), the
    second design's backward."""

    @staticmethod
    def forward(ctx, x, g0, rowmask, head_dim, patch, shifts, iters, mu):
        geo = _Geometry2(x, head_dim, patch, shifts)
        plan = fused_plan(tuple(geo.NW), geo.shifts)
        y, hats, norms, kmat = _fused_forward(x, g0, rowmask, geo, plan, iters, mu,
                                              save=ctx.needs_input_grad[0])  # fmt: skip
        ctx.save_for_backward(x, g0, rowmask, hats, norms, kmat)
        ctx.geo, ctx.args = geo, (head_dim, patch, shifts, iters, mu)
        return y

    backward = WindowNMF2.backward


def window_nmf3(x, v0, *, head_dim, patch_size, shifts, u0=None, iters=5, solver="hals"):
    """Rank-one matricized NMF over (shifted) windows, third design (same interface as
    :func:`.window_nmf.window_nmf`); the second design where the shifts do not allow the plane
    schedule (:func:`fused_plan`)."""
    g0, rowmask, mu = window_inputs(x, v0, u0, head_dim=head_dim, solver=solver)
    geo = _Geometry2(x, head_dim, tuple(patch_size), shifts)
    if fused_plan(tuple(geo.NW), geo.shifts) is None:
        return WindowNMF2.apply(x, g0, rowmask, head_dim, tuple(patch_size), shifts, iters, mu)
    return WindowNMF3.apply(x, g0, rowmask, head_dim, tuple(patch_size), shifts, iters, mu)
