"""A stub Triton driver: compile Triton kernels for a GPU on a machine without one.

Triton asks its active driver for the target (``get_current_target``), the device and stream, and,
when a compiled kernel first runs, for a launcher and the loaded binary. :class:`StubDriver`
answers these for sm_90a (H100/H200) or sm_80 (A100) without touching a GPU: a kernel launched
with ``kernel[grid](...)`` is compiled for that target (PTX, cubin through Triton's bundled
``ptxas``) and, instead of running, the launch is recorded as a :class:`Launch` (kernel, grid,
warps, stages, constexprs, the compiled kernel). Tensor arguments may live on the CPU or on the
meta device: only their addresses (alignment specialisation) and dtypes matter.

Use it as a context manager, in a process where ``TRITON_INTERPRET`` is unset (under the
interpreter ``@triton.jit`` gives interpreted functions that never reach a driver)::

    with stub_driver("sm_90a") as stub:
        kernel[grid](*args, BLOCK=64, num_warps=4)
    stub.launches  # [Launch(kernel='kernel', grid=(..), num_warps=4, ...)]

Leaving the block restores Triton's previous driver state exactly (including "none chosen yet",
so a later real launch on a GPU machine picks the CUDA driver as usual).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

__all__ = ["TARGETS", "Launch", "StubDriver", "stub_driver", "check_target"]

# target name -> (compute capability, SM count of the reference GPU: H100/H200 SXM, A100)
TARGETS = {"sm_90a": (90, 132), "sm_80": (80, 108)}
_WARP_SIZE = 32
# what Triton's compiler reads from the device (cudaDevAttrMaxSharedMemoryPerBlockOptin)
_MAX_SHARED_OPTIN = {90: 227 * 1024, 80: 163 * 1024}
_MAX_THREADS_PER_BLOCK = 1024


def check_target(target: str) -> int:
    """Compute capability of ``target``; unknown names are rejected with the valid ones listed."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    return TARGETS[target][0]


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch (what a GPU would have run)."""

    kernel: str  # name of the @triton.jit function
    module: str  # its Python module
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int  # Triton's shared-memory allocation per program (bytes)
    constexprs: dict  # name -> value (dtypes as strings)
    args: list  # runtime arguments: "tensor(shape, dtype)" or the int / float value
    compiled: object = dataclasses.field(repr=False, default=None)  # triton CompiledKernel

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _describe(value) -> object:
    """A short JSON-friendly description of a launch argument."""
    if hasattr(value, "data_ptr") and hasattr(value, "shape"):
        return f"tensor({tuple(value.shape)}, {str(value.dtype).removeprefix('torch.')})"
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    return str(value)


class _Utils:
    """The driver's ``utils``: device properties and a no-op binary loader."""

    def __init__(self, capability: int, sm_count: int):
        self._props = {
            "max_shared_mem": _MAX_SHARED_OPTIN[capability],
            "multiprocessor_count": sm_count,
            "warpSize": _WARP_SIZE,
        }

    def get_device_properties(self, device):
        return dict(self._props)

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, max threads): module None keeps the
        # CompiledKernel from unloading anything when it is deleted
        return None, None, 0, 0, _MAX_THREADS_PER_BLOCK

    def unload_module(self, module):
        pass


class _Recorder:
    """Stands in for Triton's CudaLauncher: records the launch with the active stub driver.

    A CompiledKernel keeps its launcher for ever, so the recorder must not bind to one stub: it
    reports to whichever stub is active when the kernel is launched.
    """

    def __init__(self, src, metadata):
        self.src = src
        self.metadata = metadata

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *args):  # fmt: skip
        from triton.runtime.driver import driver

        active = driver.active
        if not isinstance(active, StubDriver):
            raise RuntimeError("a kernel compiled by the stub driver was launched outside it")
        active.record(self, (grid_x, grid_y, grid_z), args)


class StubDriver:
    """Triton driver for ``target`` ("sm_90a" or "sm_80") that compiles and records launches."""

    def __init__(self, target: str = "sm_90a"):
        from triton.backends.compiler import GPUTarget

        self.capability = check_target(target)
        self.target_name = target
        self.sm_count = TARGETS[target][1]
        self.target = GPUTarget("cuda", self.capability, _WARP_SIZE)
        # a device number of its own per target: Triton caches compiled kernels per device, so
        # sm_90a and sm_80 compiles (and a real GPU's device 0) never share a cache entry
        self.device = 1000 + self.capability
        self.utils = _Utils(self.capability, self.sm_count)
        self.launcher_cls = _Recorder
        self.launches: list[Launch] = []

    # --- what Triton's runtime asks of a driver ---
    @staticmethod
    def is_active() -> bool:
        return False  # never chosen automatically; only set active by stub_driver()

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.device

    def set_current_device(self, device) -> None:
        if device != self.device:
            raise ValueError(f"the {self.target_name} stub driver has only device {self.device}")

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_capability(self, device=None) -> tuple[int, int]:
        return divmod(self.capability, 10)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("the stub driver compiles kernels; it cannot time them")

    # --- recording ---
    def record(self, recorder: _Recorder, grid, args) -> None:
        src, meta = recorder.src, recorder.metadata
        fn = src.fn
        names = fn.arg_names
        constants = {(names.index(k),) if isinstance(k, str) else k: v
                     for k, v in src.constants.items()}  # fmt: skip
        constexprs = {names[k[0]]: _constexpr_value(v) for k, v in constants.items()
                      if len(k) == 1}  # fmt: skip
        runtime = [_describe(a) for i, a in enumerate(args) if (i,) not in constants]
        self.launches.append(Launch(
            kernel=fn.fn.__name__, module=fn.module, grid=tuple(int(g) for g in grid),
            num_warps=meta.num_warps, num_stages=meta.num_stages, shared=meta.shared,
            constexprs=constexprs, args=runtime, compiled=self._compiled(fn, meta),
        ))  # fmt: skip

    def _compiled(self, fn, metadata):
        """The CompiledKernel whose launcher this is (same metadata object)."""
        cache = fn.device_caches[self.device][0]
        for kernel in cache.values():
            if getattr(kernel, "metadata", None) is metadata:
                return kernel
        raise RuntimeError(f"compiled kernel of {fn.__name__} not found in Triton's cache")


def _constexpr_value(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)  # tl dtypes


@contextlib.contextmanager
def stub_driver(target: str = "sm_90a") -> Iterator[StubDriver]:
    """Make a :class:`StubDriver` Triton's active driver inside the block; restore on exit."""
    from triton.runtime.driver import driver

    stub = StubDriver(target)
    # DriverConfig keeps None until a driver is first needed; reset_active() would create the
    # default CUDA driver (an error without a GPU), so the previous value is put back as it was
    saved = driver._active
    driver.set_active(stub)
    try:
        yield stub
    finally:
        driver._active = saved
