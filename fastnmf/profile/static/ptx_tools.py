"""Read a compiled Triton kernel: ``ptxas -v`` (registers, spills, shared memory), the SASS (global
loads/stores by width, SHFL, integer-division sequences), the PTX, and occupancy per SM.

The tools are the ones bundled with Triton (``triton/backends/nvidia/bin``): ``ptxas -v`` is run
by Triton's own ``make_cubin`` (the ptxas it takes for the target, with its flags: Triton 3.9 runs
``ptxas-blackwell``, CUDA 13, with ``--regAllocOptLevel=2`` for sm_90a; Triton 3.6 ``ptxas``, CUDA
12.8, without), so the figures are those of the cubin a GPU would load; ``nvdisasm`` for the SASS
of Triton's cubin. Results are cached in memory and on disk beside Triton's own cache
(``<triton cache dir>/fastnmf-static/``), keyed by a hash of the text, the target, the flags,
the tool's version and Triton's (whose ``make_cubin`` picks the ptxas flags).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile

from .driver import check_target

__all__ = ["SM_LIMITS", "tool_path", "missing_tools", "ptxas_info", "sass_counts", "nvdisasm_text",
           "ptx_counts", "occupancy"]  # fmt: skip

# per SM: registers, resident warps, resident blocks, shared memory (bytes). The occupancy
# arithmetic follows CUDA's cuda_occupancy.h (bundled with Triton): registers are allocated per
# warp in units of 256 within each of 4 sub-partitions of 16K registers; shared memory per block
# is rounded up to 128 bytes after adding the 1 KB the driver reserves per block (sm_80 and later).
SM_LIMITS = {
    90: dict(regs=65536, warps=64, blocks=32, smem=228 * 1024),
    80: dict(regs=65536, warps=64, blocks=32, smem=164 * 1024),
}
_SUB_PARTITIONS = 4
_SMEM_RESERVED_PER_BLOCK = 1024
_SMEM_UNIT = 128
_REG_ALLOC_UNIT = 256
_MAX_REGS_PER_THREAD = 255
_WARP = 32


class _BundledOnly:
    """For a Triton without a knob for ``binary``: the bundled copy, if it is there."""

    def __init__(self, path: str):
        self._path = path

    @property
    def path(self) -> str:
        if not os.access(self._path, os.X_OK):
            raise RuntimeError(f"Cannot find {os.path.basename(self._path)}")
        return self._path

    @property
    def version(self) -> str:
        out = subprocess.run([self.path, "--version"], capture_output=True, text=True).stdout
        return (re.search(r"release (\d+\.\d+)", out) or [None, "?"])[1]


def _tool(binary: str):
    """(Triton's knob for ``binary``, the path of Triton's bundled copy)."""
    import triton

    default = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", binary)
    knob = getattr(triton.knobs.nvidia, binary.replace("-", "_"), None)
    return knob or _BundledOnly(default), default


def _ptxas_name(capability: int) -> str:
    """The ptxas the installed Triton runs for ``capability`` (its ``get_ptxas``: Triton 3.9 takes
    ``ptxas-blackwell`` from sm_90 on, Triton 3.6 only from sm_100, ``ptxas`` below)."""
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # no NVIDIA backend: Triton 3.9's rule
        return "ptxas-blackwell" if capability >= 90 else "ptxas"
    blackwell = get_ptxas(capability) is triton.knobs.nvidia.ptxas_blackwell
    return "ptxas-blackwell" if blackwell else "ptxas"


def tool_path(binary: str) -> str:
    """Path of Triton's ``binary`` (honouring TRITON_<BINARY>_PATH); a clear error if missing."""
    knob, default = _tool(binary)
    try:
        return knob.path
    except RuntimeError as err:
        env = "TRITON_" + binary.upper().replace("-", "_") + "_PATH"
        raise FileNotFoundError(
            f"{binary} not found: Triton's bundled copy should be at {default} (or set {env}); "
            f"the static kernel report needs it ({err})"
        ) from None


def missing_tools(targets) -> list[str]:
    """A message for each tool the report needs for ``targets`` that is missing (empty: none)."""
    names = {_ptxas_name(check_target(t)) for t in targets} | {"nvdisasm"}
    missing = []
    for name in sorted(names):
        try:
            tool_path(name)
        except FileNotFoundError as err:
            missing.append(str(err))
    return missing


def ptxas_info(ptx: str, target: str, *, fp_fusion: bool = True, ptx_options=None) -> dict:
    """``ptxas -v`` of ``ptx`` for ``target``: regs, spill stores/loads, stack, static smem."""
    return dict(_ptxas_cached(ptx, target, fp_fusion, ptx_options or ""))


def _disk_cached(tool: str, data, *key, compute):
    """``compute()`` (a JSON-able dict), cached on disk by a hash of the tool, its version, the
    input and ``key``; an unwritable cache directory only costs the recomputation."""
    import triton

    h = hashlib.sha256(f"{tool}|{_tool_version(tool)}|{key}|".encode())
    h.update(data.encode() if isinstance(data, str) else data)
    path = os.path.join(triton.knobs.cache.dir, "fastnmf-static", h.hexdigest() + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    result = compute()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return result


@functools.cache
def _tool_version(binary: str) -> str:
    knob, _ = _tool(binary)
    return knob.version


@functools.cache
def _ptxas_cached(ptx, target, fp_fusion, ptx_options):
    import triton

    name = _ptxas_name(check_target(target))
    run = functools.partial(_run_ptxas, ptx, target, fp_fusion, ptx_options)
    # the flags are Triton's (a key), the raw log is cached, not its reading: a change of the
    # parser needs no invalidation
    log = _disk_cached(name, ptx, target, fp_fusion, ptx_options, triton.__version__, compute=run)
    return _parse_ptxas(log["log"])


def _run_ptxas(ptx, target, fp_fusion, ptx_options) -> dict:
    """The ``ptxas -v`` log of Triton's own ``make_cubin`` for the target: its ptxas, its flags
    (Triton 3.9 adds ``--regAllocOptLevel=2``, Triton 3.6 does not, and the allocation differs)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    tool_path(_ptxas_name(check_target(target)))  # a clear error if it is missing
    capability = check_target(target)
    backend = CUDABackend(GPUTarget("cuda", capability, 32))
    opt = backend.parse_options({"enable_fp_fusion": fp_fusion, "ptx_options": ptx_options or None})
    out = io.StringIO()
    knobs = triton.knobs.nvidia
    dump, knobs.dump_ptxas_log = knobs.dump_ptxas_log, True  # Triton prints the log
    try:
        with contextlib.redirect_stdout(out):
            backend.make_cubin(ptx, {}, opt, capability)
    except Exception as err:  # Triton's PTXASError carries ptxas's stderr and the command
        raise RuntimeError(f"ptxas failed for {target}: {err}") from None
    finally:
        knobs.dump_ptxas_log = dump
    return {"log": out.getvalue()}


def _parse_ptxas(log: str) -> dict:
    """The kernel's figures from a ``ptxas -v`` log. A kernel that calls non-inlined functions
    (``@triton.jit(noinline=True)``) has one "Function properties" block per function: the
    spill bytes are summed over them and the stack frame is the largest (a lower bound of the
    deepest call chain's), so a callee's spills are not hidden behind the entry's zero."""

    def grab(pattern, default=0):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else default

    def every(pattern):
        return [int(v) for v in re.findall(pattern, log)]

    regs = grab(r"Used (\d+) registers", None)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {
        "regs": regs,
        "spill_store_bytes": sum(every(r"(\d+) bytes spill stores")),
        "spill_load_bytes": sum(every(r"(\d+) bytes spill loads")),
        "stack_bytes": max(every(r"(\d+) bytes stack frame"), default=0),
        "static_smem_bytes": grab(r"(\d+) bytes smem"),
        "ptxas_version": (re.search(r"^(ptxas[\w-]*) info", log, re.M) or [None, "ptxas"])[1],
    }


# a SASS instruction line of nvdisasm: "/*0070*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;"
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(opcode: str) -> int:
    for mod in opcode.split(".")[1:]:
        if mod in _WIDTH:
            return _WIDTH[mod]
    return 32


def sass_counts(cubin: bytes) -> dict:
    """Static instruction counts in the SASS of ``cubin`` (each instruction once, loops not
    unrolled by the count): global loads / stores by width in bits, SHFL, 32-bit integer
    division sequences (``I2F.U32.RP``: one per runtime divisor), calls (64-bit division), CTA
    barriers."""
    return dict(_sass_cached(cubin))


@functools.cache
def _sass_cached(cubin):
    # the opcodes are cached (a few thousand short strings), their counts computed here
    ops = _disk_cached("nvdisasm", cubin, compute=functools.partial(_run_nvdisasm, cubin))["ops"]
    return _count_sass(ops)


def _run_nvdisasm(cubin) -> dict:
    # -c: code sections only; -ndf: no dataflow comments (half the time, same instructions)
    text = nvdisasm_text(cubin, "-c", "-ndf")
    return {"ops": [m.group(1) for m in _SASS_LINE.finditer(text)]}


def nvdisasm_text(cubin: bytes, *flags: str) -> str:
    """The output of Triton's bundled ``nvdisasm`` with ``flags`` on ``cubin``."""
    nvdisasm = tool_path("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([nvdisasm, *flags, path], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvdisasm failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _count_sass(ops: list[str]) -> dict:
    loads, stores, copies = collections.Counter(), collections.Counter(), collections.Counter()
    for op in ops:
        head = op.split(".")[0]
        if head == "LDG":
            loads[_width(op)] += 1
        elif head == "LDGSTS":
            copies[_width(op)] += 1
        elif head == "STG":
            stores[_width(op)] += 1
    heads = collections.Counter(op.split(".")[0] for op in ops)
    return {
        "sass_instructions": len(ops),
        "ldg_by_width": {str(k): v for k, v in sorted(loads.items())},
        "stg_by_width": {str(k): v for k, v in sorted(stores.items())},
        # cp.async copies (global to shared) by width: a pipelined loop's loads
        "ldgsts_by_width": {str(k): v for k, v in sorted(copies.items())},
        "shfl": heads["SHFL"],
        "int_div_seqs": sum(1 for op in ops if op.startswith("I2F") and op.endswith(".RP")),
        "calls": heads["CALL"],
        "atomics": heads["ATOM"] + heads["RED"] + heads["ATOMG"] + heads["REDG"],
        "local_mem_ops": heads["LDL"] + heads["STL"],
        # CTA barriers (BAR.SYNC and kin): where a program's warps wait for each other; the
        # H200's ncu put 40 % of design 3's stalls there (bench/results/h200_2026-12-04/)
        "barriers": heads["BAR"],
        # copies from global into shared memory that do not wait (LDGSTS: cp.async; UTMALDG:
        # TMA): what Triton's loop pipelining makes of a pipelined loop's loads
        "async_copies": heads["LDGSTS"] + heads["UTMALDG"],
    }


_PTX_INT_DIV = re.compile(r"^\s*(?:@%p\d+\s+)?(div|rem)\.(?:s|u)(?:32|64)\b", re.M)
_PTX_SHFL = re.compile(r"^\s*(?:@%p\d+\s+)?shfl\.sync\b", re.M)
# global loads and stores marked evict-first: cache streaming (``.cs``) or an L1::evict_first
# qualifier (Triton's ``eviction_policy="evict_first"``, with its L2 policy: ``L2::cache_hint``)
_PTX_EVICT_FIRST = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global\.(?:cs\b|L1::evict_first\b)", re.M)


# A shared-memory write (a store, stmatrix, an async copy into shared memory) ...
_PTX_SMEM_WRITE = re.compile(r"^\s*(?:@%p\d+\s+)?(st\.shared|stmatrix|cp\.async\S*shared)", re.M)
# ... except one thread's store of a scalar (an atomic's result broadcast to the program through
# shared memory, read right after the barrier that follows it)
_PTX_SMEM_BROADCAST = re.compile(
    r"^\s*@%p\d+\s+st\.shared(?:::cta)?\.b32\s+\[\s*%r\d+\s*\+\s*0\s*\]", re.M
)
# the first line of a basic block: its label, or LLVM's comment for one without (``// %bb.3:``)
_PTX_BLOCK = re.compile(r"^(?:\$L__BB\d+_\d+:|//\s*%bb\.\d+:)")
_PTX_ENTRY = re.compile(r"^\.visible \.entry .*?(?=^\.(?:visible\s+)?\.?(?:func|entry)\b|\Z)",
                        re.M | re.S)  # fmt: skip


def smem_held_across_calls(ptx: str) -> int:
    """Shared-memory writes of the kernel's entry function before its first loop header (in the
    PTX's text order, which LLVM's block layout makes the loop's entry), where the module calls
    non-inlined functions (``call.uni``; 0 otherwise), one thread's scalar broadcasts left out.
    What such a write stores stays there through the loop, so through every call in it; and
    Triton 3.6 gives a non-inlined callee shared memory from offset 0 whatever its caller holds
    (triton-lang/triton#11267): design 3's forward lost its part matrix so on the H200."""
    entry = _PTX_ENTRY.search(ptx)
    if entry is None or "call.uni" not in ptx:
        return 0
    body = entry.group(0)
    head = body.find("Loop Header: Depth=1")
    before = _outside_loops(body if head < 0 else body[:head])
    return len(_PTX_SMEM_WRITE.findall(before)) - len(_PTX_SMEM_BROADCAST.findall(before))


def _outside_loops(ptx: str, inside: bool = False, headers: bool = False) -> str:
    """The lines of ptx outside the blocks LLVM marks as in a loop (``// in Loop: Header=...`` on
    a block's label or the comment lines right after it): a loop's body can be laid out before its
    header (sm_90a, Triton 3.6: design 3's forward with ``TUNING["xg0_joined"]`` put its parts
    tile there), and what it stores is not held from before the loop. ``inside``: the others;
    ``headers``: a loop's header block (``Loop Header`` on its label) counts as in the loop."""
    kept, in_loop, at_label = [], False, False
    for line in ptx.splitlines(keepends=True):
        if _PTX_BLOCK.match(line):
            in_loop = "in Loop:" in line or (headers and "Loop Header" in line)
            at_label = True
        elif at_label and line.lstrip().startswith("//"):
            in_loop = in_loop or "in Loop:" in line
        else:
            at_label = False
        if in_loop == inside:
            kept.append(line)
    return "".join(kept)


_PTX_ASYNC_WAIT = re.compile(r"^\s*cp\.async\.wait_group\s+(\d+)\s*;", re.M)


def async_wait_in_loop(ptx: str) -> int:
    """The fewest cp.async groups a loop's waits leave in flight (``cp.async.wait_group N``
    inside a loop; -1: no such wait). 0 in a pipelined loop: each trip waits for every copy
    issued, so no copy overlaps the trip's arithmetic (Triton's ``num_stages=2`` keeps one
    buffer and issues the next trip's copies after this trip's reads: sm_90a, Triton 3.6 and
    3.9); N > 0: the next trips' copies are in flight while this one computes."""
    body = _outside_loops(ptx, inside=True, headers=True)
    waits = [int(n) for n in _PTX_ASYNC_WAIT.findall(body)]
    return min(waits) if waits else -1


def ptx_counts(ptx: str) -> dict:
    """Static counts in the PTX: integer div/rem instructions, shfl.sync, shared-memory writes
    held across non-inlined calls (:func:`smem_held_across_calls`), global loads and stores
    marked evict-first, and the cp.async groups a loop leaves in flight
    (:func:`async_wait_in_loop`)."""
    marked = _PTX_EVICT_FIRST.findall(ptx)
    return {"ptx_int_div": len(_PTX_INT_DIV.findall(ptx)), "ptx_shfl": len(_PTX_SHFL.findall(ptx)),
            "ptx_smem_held_across_calls": smem_held_across_calls(ptx),
            "ptx_ld_evict_first": marked.count("ld"),
            "ptx_st_evict_first": marked.count("st"),
            "ptx_async_wait_in_loop": async_wait_in_loop(ptx)}  # fmt: skip


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(*, regs: int, warps: int, smem: int, target: str) -> dict:
    """Resident blocks and warps per SM for a block of ``warps`` warps using ``regs`` registers
    per thread and ``smem`` bytes of shared memory, and which limit binds (as cuda_occupancy.h)."""
    lim = SM_LIMITS[check_target(target)]
    per_warp = _round_up(regs * _WARP, _REG_ALLOC_UNIT)
    if regs > _MAX_REGS_PER_THREAD or per_warp * _round_up(warps, _SUB_PARTITIONS) > lim["regs"]:
        by_regs = 0
    elif per_warp:
        by_regs = (lim["regs"] // _SUB_PARTITIONS // per_warp) * _SUB_PARTITIONS // warps
    else:
        by_regs = lim["blocks"]
    limits = {
        "registers": by_regs,
        "shared memory": lim["smem"] // _round_up(smem + _SMEM_RESERVED_PER_BLOCK, _SMEM_UNIT),
        "warps": lim["warps"] // warps,
        "blocks": lim["blocks"],
    }
    blocks = min(limits.values())
    limiter = next(k for k, v in limits.items() if v == blocks)  # first of equals, in this order
    return {"blocks_per_sm": blocks, "resident_warps_per_sm": blocks * warps, "limited_by": limiter}
