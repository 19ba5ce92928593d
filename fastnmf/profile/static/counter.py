"""Byte and sector counter: run the layer's kernels under Triton's interpreter and count memory.

Under ``TRITON_INTERPRET=1`` every ``tl.load`` / ``tl.store`` of a kernel reaches the
interpreter's builder (``InterpreterBuilder.create_masked_load`` / ``create_masked_store``;
unmasked loads and stores go through them too, and atomics through ``create_atomic_rmw`` /
``create_atomic_cas``), and every launch goes through ``GridExecutor.__call__``. Wrapping these
gives, per launch and per tensor argument: bytes loaded and stored (active lanes x element size),
unique bytes (distinct byte addresses), 32-byte sectors (per access: the distinct 32-byte-aligned
sectors of the active lanes' addresses, summed over accesses) and the ordered sector trace.
It checks bounds on the way: an active lane outside every tensor argument, past the end of one,
or one access whose lanes lie in two (each ``tl.load`` / ``tl.store`` has one base pointer) is a
:class:`OutOfBounds` (a ``RuntimeError``) naming the kernel, the argument and the program, raised
before the interpreter touches the memory (an access whose lanes all land inside another argument
is not seen).

Trace order: the interpreter runs the grid with axis 0 outermost; a GPU dispatches blocks in
linear order with axis 0 fastest. Each access is tagged with its program's GPU linear id
``x + gx * (y + gy * z)`` and the trace is sorted by it (stable: program order is kept inside a
program). Sector ids are canonical: ``(storage index << 31) + (offset in storage) // 32``, the
storage index numbered in order of first appearance within one counted call (a freed buffer whose
memory is reused gets the same index, as on a GPU caching allocator).

Launch geometry: ``fastnmf.kernels`` picks some launch parameters from ``INTERPRET`` (bigger
tiles for the interpreter). :func:`gpu_geometry` sets every kernels module's ``INTERPRET`` to
False and every module-level ``NAME = A if INTERPRET else B`` to ``B`` (read from the source),
so the kernels run with the launch geometry a GPU would use.

PyTorch work between the launches (fills, sums over partials, ``contiguous`` copies) is seen by a
``TorchDispatchMode`` and recorded as launches of kind ``"torch"``: bytes read = the input
tensors' bytes, bytes written = the outputs' (view and ``empty`` ops excluded), sectors =
ceil(bytes / 32) per tensor. Host-device copies: on a CPU machine there is no transfer, so the
code paths that would be one on a GPU are detected instead: ``aten.lift_fresh`` (a tensor made
from Python data, e.g. ``torch.tensor(shift_rows, device=x.device)``: host to device) and
``aten._local_scalar_dense`` (``.item()``, ``.tolist()``: device to host, a synchronisation).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import pkgutil
import sys
import types

import numpy as np
import torch

__all__ = ["LaunchCount", "CallCount", "count_call", "counting", "torch_ops", "gpu_geometry",
           "interpreting", "SECTOR", "OutOfBounds"]  # fmt: skip

SECTOR = 32  # bytes per L2 sector (NVIDIA sm_80 / sm_90)
_STORAGE_SHIFT = 31  # canonical sector id = (storage index << 31) + sector in storage
H2D_OPS = ("lift_fresh",)
D2H_OPS = ("_local_scalar_dense",)


@dataclasses.dataclass
class LaunchCount:
    """One launch: a Triton kernel (``kind="triton"``) or a PyTorch op (``kind="torch"``).

    ``args`` maps a tensor label (the kernel's argument name; arguments sharing one storage are
    joined by "/") to bytes_loaded, bytes_stored, unique_bytes, sectors. The trace arrays hold one
    entry per sector access, in GPU order: program id, canonical sector id, store flag.
    """

    kind: str
    kernel: str
    grid: tuple
    args: dict
    prog: np.ndarray
    sector: np.ndarray
    store: np.ndarray

    def total(self, key: str) -> int:
        return int(sum(v[key] for v in self.args.values()))


@dataclasses.dataclass
class CallCount:
    launches: list
    host_device_copies: int
    device_host_copies: int


def interpreting() -> bool:
    """True when ``fastnmf.kernels`` runs on Triton's interpreter in this process."""
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module("fastnmf.kernels.window_nmf")
    return isinstance(mod._stats_fwd_kernel, InterpretedFunction)


def _kernel_modules():
    import fastnmf.kernels as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        yield importlib.import_module(f"{pkg.__name__}.{info.name}")


# The kernels modules' interpreter flag (kernels/_common.py, imported by each module by this name)
_FLAG = "INTERPRET"


def _gpu_values(module) -> dict:
    """Module-level ``NAME = A if INTERPRET else B``: {NAME: B} (B a literal)."""
    tree = ast.parse(inspect.getsource(module))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.IfExp):
            test = node.value.test
            if isinstance(test, ast.Name) and test.id == _FLAG:
                for target in node.targets:
                    out[target.id] = ast.literal_eval(node.value.orelse)
    return out


@contextlib.contextmanager
def gpu_geometry():
    """Make the kernels' launchers choose the launch geometry of a GPU (see module docstring)."""
    saved = []
    for mod in _kernel_modules():
        if not hasattr(mod, _FLAG):
            continue
        values = {_FLAG: False, **_gpu_values(mod)}
        for name, value in values.items():
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in reversed(saved):
            setattr(mod, name, value)


class _Session:
    """State of one counted call: storages seen, launches recorded, the launch being run."""

    def __init__(self):
        self.storage_index: dict[int, int] = {}
        self.launches: list[LaunchCount] = []
        self.h2d = 0
        self.d2h = 0
        self.in_kernel = False
        self.accesses = None  # list of (prog, store, addrs, itemsize) during a launch
        self.grid = None
        self.kernel = None  # during a launch: its name, its tensor arguments' storages and bases
        self.stor: list = []
        self.bases = np.zeros(0, dtype=np.uint64)

    def index(self, base: int) -> int:
        if base % SECTOR:
            raise RuntimeError(f"storage at {base:#x} is not {SECTOR}-byte aligned")
        return self.storage_index.setdefault(base, len(self.storage_index))


_SESSION: _Session | None = None


def _record(kind: str, ptrs, mask) -> None:
    from triton.runtime.interpreter import interpreter_builder as b

    s = _SESSION
    if s is None or s.accesses is None:
        return
    data = np.asarray(ptrs.data)
    active = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
    addrs = data[active].astype(np.uint64).ravel()
    itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
    x, y, z = b.grid_idx
    gx, gy, _ = b.grid_dim
    prog = x + gx * (y + gy * z)
    if addrs.size:  # before the interpreter touches the memory (out of bounds it may crash)
        _check_bounds(s.kernel, s.stor, s.bases, addrs, itemsize, prog)
    s.accesses.append((prog, kind == "store", addrs, itemsize))


class OutOfBounds(RuntimeError):
    """An active lane of a counted kernel outside its tensor argument (:func:`_check_bounds`)."""


def _check_bounds(kernel, stor, bases, addrs, itemsize, prog) -> None:
    """Every lane of one access inside one tensor argument (each tl.load / tl.store has one
    base pointer), else :class:`OutOfBounds` naming the kernel, the argument and the program."""
    where = np.searchsorted(bases, addrs, side="right") - 1
    spans = np.unique(where)
    if spans[0] < 0:
        raise OutOfBounds(f"{kernel}: an access falls before every tensor argument "
                          f"(program {prog})")  # fmt: skip
    if spans.size > 1:
        names = " and ".join(stor[int(i)][2] for i in spans)
        raise OutOfBounds(f"{kernel}: one access spans the tensor arguments {names}: some of "
                          f"its lanes lie outside their own (program {prog})")  # fmt: skip
    base, nbytes, label, _ = stor[int(spans[0])]
    end = int(addrs.max()) - base + itemsize
    if end > nbytes:
        raise OutOfBounds(
            f"{kernel}: an access falls outside its tensor arguments: past the end of {label} "
            f"(bytes {end - itemsize}..{end} of {nbytes}; program {prog})")  # fmt: skip


def _patch_interpreter():
    from triton.runtime import interpreter as it

    builder = it.InterpreterBuilder
    orig = {n: getattr(builder, n) for n in ("create_masked_load", "create_masked_store",
                                             "create_atomic_rmw", "create_atomic_cas")}  # fmt: skip
    orig_call = it.GridExecutor.__call__

    # the cache arguments differ between Triton versions (3.9: cache_policy; 3.6: cache_modifier,
    # eviction_policy): passed through as they come
    def masked_load(self, ptrs, mask, *rest, **kw):
        _record("load", ptrs, mask)
        return orig["create_masked_load"](self, ptrs, mask, *rest, **kw)

    def masked_store(self, ptrs, value, mask, *rest, **kw):
        _record("store", ptrs, mask)
        return orig["create_masked_store"](self, ptrs, value, mask, *rest, **kw)

    def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        _record("load", ptr, mask)
        _record("store", ptr, mask)
        return orig["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        every = types.SimpleNamespace(data=np.ones_like(ptr.data, dtype=bool))  # no mask
        _record("load", ptr, every)
        _record("store", ptr, every)
        return orig["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    def grid_call(self, *args, **kwargs):
        s = _SESSION
        if s is None:
            return orig_call(self, *args, **kwargs)
        tensors = dict(zip(self.arg_names, args, strict=False))
        tensors.update(kwargs)
        tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        s.kernel, s.stor = self.fn.__name__, _storages(s, tensors)
        s.bases = np.array([st[0] for st in s.stor], dtype=np.uint64)
        s.in_kernel, s.accesses = True, []
        try:
            orig_call(self, *args, **kwargs)
        except Exception as e:  # the interpreter wraps a device function's errors: unwrap ours
            cause = e
            while cause is not None and not isinstance(cause, OutOfBounds):
                cause = cause.__cause__ or cause.__context__
            if cause is None or cause is e:
                raise
            raise cause from None
        finally:
            s.in_kernel = False
        grid = it.interpreter_builder.grid_dim
        s.launches.append(_launch_from_accesses(s.kernel, grid, s.stor, s.bases, s.accesses))
        s.accesses = None

    patches = [(builder, "create_masked_load", masked_load),
               (builder, "create_masked_store", masked_store),
               (builder, "create_atomic_rmw", atomic_rmw),
               (builder, "create_atomic_cas", atomic_cas),
               (it.GridExecutor, "__call__", grid_call)]  # fmt: skip
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, fn in patches:
        setattr(obj, name, fn)
    return saved


def _storages(session: _Session, tensors: dict) -> list[tuple[int, int, str, int]]:
    """(base, nbytes, label, canonical index) per distinct storage among the tensor arguments."""
    by_base: dict[int, list] = {}
    for name, t in tensors.items():
        st = t.untyped_storage()
        entry = by_base.setdefault(st.data_ptr(), [st.nbytes(), []])
        entry[0] = max(entry[0], st.nbytes())
        entry[1].append(name)
    return sorted(
        (base, nb, "/".join(sorted(names)), session.index(base))
        for base, (nb, names) in by_base.items()
    )


def _launch_from_accesses(kernel, grid, stor, bases, accesses) -> LaunchCount:
    """The launch's counts from its accesses (each inside one argument: :func:`_check_bounds`,
    at the access)."""
    stats = {s[2]: dict(bytes_loaded=0, bytes_stored=0, unique_bytes=0, sectors=0) for s in stor}
    touched = {s[2]: [] for s in stor}
    progs, sectors, stores = [], [], []
    for prog, store, addrs, itemsize in accesses:
        if addrs.size == 0:
            continue
        base, _, label, index = stor[int(np.searchsorted(bases, addrs[0], side="right")) - 1]
        off = addrs - np.uint64(base)
        sec = np.unique(off >> np.uint64(5)).astype(np.int64) + (index << _STORAGE_SHIFT)
        st = stats[label]
        st["bytes_stored" if store else "bytes_loaded"] += off.size * itemsize
        st["sectors"] += sec.size
        touched[label].append((off, itemsize))
        progs.append(np.full(sec.size, prog, dtype=np.int64))
        sectors.append(sec)
        stores.append(np.full(sec.size, store))
    for label, items in touched.items():
        stats[label]["unique_bytes"] = _unique_bytes(items)
    stats = {k: v for k, v in stats.items() if v["bytes_loaded"] or v["bytes_stored"]}
    prog = np.concatenate(progs) if progs else np.zeros(0, np.int64)
    order = np.argsort(prog, kind="stable")
    return LaunchCount(
        kind="triton",
        kernel=kernel,
        grid=tuple(int(g) for g in grid),
        args=stats,
        prog=prog[order],
        sector=(np.concatenate(sectors) if sectors else np.zeros(0, np.int64))[order],
        store=(np.concatenate(stores) if stores else np.zeros(0, bool))[order],
    )


def _unique_bytes(items) -> int:
    if not items:
        return 0
    sizes = {isz for _, isz in items}
    if len(sizes) == 1:  # one element size: elements are aligned, so count distinct elements
        return int(np.unique(np.concatenate([o for o, _ in items])).size) * sizes.pop()
    spans = [(o[:, None] + np.arange(isz, dtype=np.uint64)[None, :]).ravel() for o, isz in items]
    return int(np.unique(np.concatenate(spans)).size)


def _torch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            s = _SESSION
            if s is not None and not s.in_kernel:
                _record_torch_op(s, func, args, kwargs or {}, out)
            return out

    return _Ops()


def _tensors(tree) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0]


def _record_torch_op(session: _Session, func, args, kwargs, out) -> None:
    name = func._schema.name.split("::")[-1]
    if name in H2D_OPS:
        session.h2d += 1
        return
    if name in D2H_OPS:
        session.d2h += 1
        return
    returns = func._schema.returns
    views = [r.alias_info is not None and not r.alias_info.is_write for r in returns]
    if name.startswith(("empty", "new_empty")) or (views and all(views)):
        return  # no memory traffic: an allocation or a view
    # read: the tensor arguments (an out= argument is only written); written: the results
    ins = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
    outs = _tensors(out)
    stats, progs, sectors, stores = {}, [], [], []
    for label, ts, store in (("in", ins, False), ("out", outs, True)):
        for i, t in enumerate(ts):
            nbytes = t.numel() * t.element_size()
            base = t.untyped_storage().data_ptr()
            first = t.storage_offset() * t.element_size() // SECTOR
            nsec = math.ceil((t.storage_offset() * t.element_size() + nbytes) / SECTOR) - first
            key = f"{label}{i}"
            stats[key] = dict(bytes_loaded=0 if store else nbytes, bytes_stored=nbytes if store
                              else 0, unique_bytes=nbytes, sectors=nsec)  # fmt: skip
            sec = np.arange(first, first + nsec, dtype=np.int64)
            sectors.append(sec + (session.index(base) << _STORAGE_SHIFT))
            progs.append(np.zeros(nsec, np.int64))
            stores.append(np.full(nsec, store))
    if not stats:
        return
    session.launches.append(
        LaunchCount(kind="torch", kernel=f"aten.{name}", grid=(), args=stats,
                    prog=np.concatenate(progs), sector=np.concatenate(sectors),
                    store=np.concatenate(stores))  # fmt: skip
    )


@contextlib.contextmanager
def counting():
    """Count every launch and PyTorch op in the block; yields the :class:`CallCount`."""
    global _SESSION
    if not interpreting():
        raise RuntimeError(
            "the byte counter needs Triton's interpreter: set TRITON_INTERPRET=1 before triton "
            "and fastnmf.kernels are imported (or use fastnmf.profile.static.traffic, which runs "
            "the counter in a subprocess)"
        )
    if _SESSION is not None:
        raise RuntimeError("counting() does not nest")
    from triton.runtime.interpreter import interpreter_builder

    session = _Session()
    result = CallCount([], 0, 0)
    saved = _patch_interpreter()
    # the interpreter checks every integer add / sub / mul for int32 overflow (half its time on
    # these kernels); addresses do not depend on it, so the counter turns it off
    options = interpreter_builder.options
    interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)
    _SESSION = session
    try:
        with gpu_geometry(), _torch_mode():
            yield result
    finally:
        _SESSION = None
        interpreter_builder.options = options
        for obj, name, fn in reversed(saved):
            setattr(obj, name, fn)
    result.launches = session.launches
    result.host_device_copies = session.h2d
    result.device_host_copies = session.d2h


@contextlib.contextmanager
def torch_ops():
    """Record only the PyTorch ops of the block (no interpreter needed); yields the list of
    :class:`LaunchCount` (kind "torch") that fills as the block runs."""
    global _SESSION
    if _SESSION is not None:
        raise RuntimeError("torch_ops() does not nest with counting()")
    session = _Session()
    _SESSION = session
    try:
        with _torch_mode():
            yield session.launches
    finally:
        _SESSION = None


def _inputs(case, seed: int):
    from fastnmf._checks import check_patch, check_shifts

    from .cases import DTYPES

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=g).to(DTYPES[case.dtype])
    patch = check_patch(case.window, case.spatial)
    n = math.prod(patch) if patch is not None else math.prod(case.spatial)
    v0 = torch.rand(n, case.rank, generator=g)
    shifts = None if case.mode == "global" else check_shifts(list(case.shifts), len(case.spatial))
    kw = dict(head_dim=case.head_dim, patch_size=patch, shifts=shifts, iters=case.iters)
    dy = torch.randn(case.shape, generator=g).to(DTYPES[case.dtype])
    return x, v0, kw, dy


def has_backward(case) -> bool:
    """The Triton path has no backward for a global matricization of rank > 1."""
    return not (case.mode == "global" and case.rank > 1)


def count_call(case, *, seed: int = 0) -> dict[str, CallCount]:
    """Count the forward call (training: x requires grad) and the backward call of ``case``.

    Returns {"fwd": CallCount, "bwd": CallCount} ("bwd" absent where the Triton path has none).
    Runs ``fastnmf.kernels.matricized_nmf`` (the Triton dispatch, after the public API's checks).
    """
    from fastnmf import kernels

    from .cases import selected_design

    x, v0, kw, dy = _inputs(case, seed)
    out = {}
    train = has_backward(case)
    x.requires_grad_(train)
    with selected_design(case):
        with counting() as fwd, torch.set_grad_enabled(train):
            y = kernels.matricized_nmf(x, v0, **kw)
        out["fwd"] = fwd
        if train:
            with counting() as bwd:
                (dx,) = torch.autograd.grad(y, x, dy)
            out["bwd"] = bwd
    return out


def write_counts(results: list[dict], path: str) -> None:
    """Counts of several calls to ``path`` (JSON: launches and figures) and the raw sector traces
    beside it (``path.d/``, one flat binary file per array, its dtype in the JSON): no pickle,
    so reading them back runs no code."""
    meta, arrays = [], {}
    for i, result in enumerate(results):
        calls = {}
        for pass_, call in result.items():
            launches = []
            for j, launch in enumerate(call.launches):
                dtypes = {}
                for name in ("prog", "sector", "store"):
                    arrays[f"{i}_{pass_}_{j}_{name}"] = array = getattr(launch, name)
                    dtypes[name] = array.dtype.str
                launches.append(dict(kind=launch.kind, kernel=launch.kernel, dtypes=dtypes,
                                     grid=list(launch.grid), args=launch.args))  # fmt: skip
            calls[pass_] = dict(launches=launches, host_device_copies=call.host_device_copies,
                                device_host_copies=call.device_host_copies)  # fmt: skip
        meta.append(calls)
    with open(path, "w") as f:
        json.dump(meta, f, default=int)  # numpy integers in the figures
    os.makedirs(path + ".d", exist_ok=True)
    for key, array in arrays.items():
        np.ascontiguousarray(array).tofile(os.path.join(path + ".d", key))


def read_counts(path: str) -> list[dict]:
    """The inverse of :func:`write_counts`."""
    with open(path) as f:
        meta = json.load(f)
    def array(key: str, dtype: str) -> np.ndarray:
        return np.fromfile(os.path.join(path + ".d", key), dtype=np.dtype(dtype))

    out = []
    for i, calls in enumerate(meta):
        result = {}
        for pass_, call in calls.items():
            launches = [
                LaunchCount(kind=L["kind"], kernel=L["kernel"], grid=tuple(L["grid"]),
                            args=L["args"], **{n: array(f"{i}_{pass_}_{j}_{n}", L["dtypes"][n])
                                               for n in ("prog", "sector", "store")})
                for j, L in enumerate(call["launches"])
            ]  # fmt: skip
            result[pass_] = CallCount(launches, call["host_device_copies"],
                                      call["device_host_copies"])  # fmt: skip
        out.append(result)
    return out


def _main() -> None:  # run by traffic.py in a subprocess with TRITON_INTERPRET=1
    from .cases import case_from_json

    src, dst = sys.argv[1], sys.argv[2]
    with open(src) as f:
        cases = [case_from_json(c) for c in json.load(f)]
    # the importable module's functions (not __main__'s)
    mod = importlib.import_module("fastnmf.profile.static.counter")
    mod.write_counts([mod.count_call(c) for c in cases], dst)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    _main()
