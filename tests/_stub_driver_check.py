"""The body of test_static_kernels.test_stub_driver_compiles_records_and_restores, run as a script
in a compiling subprocess: once Triton's interpreter has run a kernel in a process it patches
``tl.tensor``'s operators for good, so compiling there fails wherever the kernel cache is cold."""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from fastnmf.profile.static import ptx_tools
from fastnmf.profile.static.driver import stub_driver


def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


def main() -> None:
    before = driver._active
    kernel = JITFunction(_double)  # compiled even where @triton.jit would interpret
    x = torch.empty(1000, device="meta")
    with stub_driver("sm_80") as stub:
        assert driver.active is stub
        assert stub.get_current_target() == GPUTarget("cuda", 80, 32)
        kernel[(8,)](x, torch.empty_like(x), 1000, BLOCK=128, num_warps=4)
    assert driver._active is before
    (launch,) = stub.launches
    assert (launch.kernel, launch.grid, launch.num_warps) == ("_double", (8, 1, 1), 4)
    assert launch.constexprs == {"BLOCK": 128} and launch.args[2] == 1000
    assert ".target sm_80" in launch.compiled.asm["ptx"]
    info = ptx_tools.ptxas_info(launch.compiled.asm["ptx"], "sm_80")
    assert info["regs"] > 0 and info["spill_store_bytes"] == 0
    with pytest.raises(ValueError, match="sm_90a"), stub_driver("sm_100"):
        pass
    assert driver._active is before
    print("stub driver: ok")


if __name__ == "__main__":
    main()
