"""Security: checkpoints are read with ``weights_only=True``; nothing user-supplied is unpickled
or passed to a shell. A static scan of the installed source (fastnmf/, models/, kernels/), plus a
malicious checkpoint that must be refused without running its payload."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from fastnmf.infer import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("fastnmf", "models", "kernels") for p in (ROOT / d).rglob("*.py"))


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: ``torch.load``, ``os.system``, ``eval``; a method of an
    expression gets a ``?.`` prefix (``model.to(d).eval()`` is ``?.eval``, not ``eval``)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "?")
    return ".".join(reversed(parts))


def _calls():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                yield path.relative_to(ROOT), node.lineno, _name(node.func), node


FORBIDDEN = {
    "eval", "exec", "compile", "os.system", "os.popen", "pickle.load", "pickle.loads",
    "pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load", "marshal.load",
    "marshal.loads", "shelve.open", "yaml.load", "yaml.unsafe_load", "np.load", "numpy.load",
}  # fmt: skip


def test_sources_found():
    assert len(SOURCES) > 20


def test_every_torch_load_is_weights_only():
    loads = [(f, n, c) for f, n, name, c in _calls() if name.endswith("torch.load")]
    assert loads, "expected the checkpoint loader"
    for f, n, call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        assert ok, f"{f}:{n}: torch.load without weights_only=True"


def test_no_eval_exec_pickle_or_shell():
    bad = [f"{f}:{n}: {name}" for f, n, name, _ in _calls() if name in FORBIDDEN]
    assert not bad, bad


# The programs fastnmf may start: git (the commit in reports), this Python (the static suite's
# compiling / interpreting processes) and Triton's bundled CUDA tools (ptxas, nvdisasm: their
# paths come from the installed triton package, in the one module that runs them).
TOOL_RUNNERS = {Path("fastnmf/profile/static/ptx_tools.py")}


def _argv_list(call: ast.Call, func: ast.AST) -> ast.List | None:
    """The call's argv as a list display: given inline, or a name assigned one in the function."""
    argv = call.args[0] if call.args else None
    if isinstance(argv, ast.Name):
        lists = [n.value for n in ast.walk(func) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == argv.id for t in n.targets)
                 and isinstance(n.value, ast.List)]  # fmt: skip
        argv = lists[0] if len(lists) == 1 else None
    return argv if isinstance(argv, ast.List) else None


def _fixed_program(path: Path, first: ast.AST) -> bool:
    if isinstance(first, ast.Constant):
        return first.value == "git"
    if _name(first) == "sys.executable":
        return True
    return path in TOOL_RUNNERS


def test_subprocesses_run_fixed_programs_without_a_shell():
    """Only git, this Python and Triton's bundled tools are started, always from an argv list
    (never a string, never ``shell=``)."""
    bad, seen = [], 0
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for func in funcs:
            for call in ast.walk(func):
                if not (isinstance(call, ast.Call) and _name(call.func).startswith("subprocess.")):
                    continue
                seen += 1
                argv = _argv_list(call, func)
                rel = path.relative_to(ROOT)
                if (argv is None or not argv.elts or not _fixed_program(rel, argv.elts[0])
                        or any(k.arg == "shell" for k in call.keywords)):  # fmt: skip
                    bad.append(f"{rel}:{call.lineno}: {_name(call.func)}")
    assert seen > 0 and not bad, bad


def test_no_pickle_imports():
    bad = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad += [
                f"{path.relative_to(ROOT)}: import {m}"
                for m in names
                if m.split(".")[0] in ("pickle", "dill", "cloudpickle", "shelve", "marshal")
            ]
    assert not bad, bad


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path):
    import torch

    _Payload.target = str(tmp_path / "pwned")
    ckpt = tmp_path / "evil.pt"
    torch.save({"config": {}, "model": {}, "x": _Payload()}, ckpt)
    with pytest.raises(CheckpointError, match="evil.pt: cannot read checkpoint"):
        load_checkpoint(ckpt)
    assert not (tmp_path / "pwned").exists()
    raw = tmp_path / "raw.pt"  # a bare pickle, not a zip: refused too
    raw.write_bytes(pickle.dumps({"config": {}, "model": {}, "x": _Payload()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "pwned").exists()
