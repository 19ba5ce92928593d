"""Performance without a GPU (issue 14): ``fastnmf profile --suite static``.

Modules by concern:

- ``driver``: a stub Triton driver targeting sm_90a / sm_80, so kernels compile on a CPU machine.
- ``kernel_report``: registers, spills, shared memory, occupancy and SASS counts of every kernel.
- ``traffic``: bytes and 32-byte sectors of every launch, counted under the interpreter, the
  analytic model of the same kernels, and the L2 (LRU) DRAM estimate.
- ``step_account``: bytes, FLOPs, saved bytes and predicted peak of one training step per model.
- ``suite``: runs the three and writes ``static.md`` / ``static.json``.
"""
