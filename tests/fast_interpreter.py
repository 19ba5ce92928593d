"""The kernel tests' interpreter without its repeated language patching.

Triton's interpreter (``TRITON_INTERPRET=1``) patches ``triton.language`` for interpretation when
a kernel launches, and again on every call of a ``@triton.jit`` function from inside the running
kernel (``InterpretedFunction.__call__`` calls ``_patch_lang``: ``inspect.getmembers`` over four
modules, about 0.5 ms a call). Inside a kernel those modules are already patched (the nested
call's patches find nothing left to replace, and upstream never restores them before the kernel
ends), so the nested patch changes nothing but costs a quarter of a fused kernel's interpreted
time (design 3's float64 forward + backward of a 1 x 4 x 12 x 8 x 8 volume: 25 s -> 18.5 s).

It also looks up the numpy type of a Triton type in a table built once: upstream's
``_get_np_dtype`` builds its table of 17 types on every call (a tenth of the same run's time).

``install()`` skips a patch when the running kernel has already patched every language module
the function sees, and patches as upstream does otherwise (the kernel's own patch, a helper that
sees ``triton.language.core``, as ``tl.sum`` does, the first time). Nothing else of the
interpreter changes. ``tests/test_fast_interpreter.py`` checks that a launch gives bitwise the
result of upstream's interpreter (``upstream()`` restores Triton's own three functions). Where
Triton's interpreter lacks these internals, ``install()`` does nothing.
"""

import contextlib
import inspect

_STATE = {"installed": None, "skipped": 0, "patched": 0}
_RUNNING = []  # per running launch: the ids of the language modules patched so far
_LANGS = {}  # function -> the ids of the language modules among its globals


def _internals():
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return None
    names = ("_patch_lang", "GridExecutor", "_LangPatchScope", "_get_np_dtype")
    if not all(hasattr(interpreter, n) for n in names):
        return None
    return interpreter, tl


def _language_modules(fn, tl) -> frozenset:
    """The ids of the language modules `fn`'s globals hold (found once per function)."""
    langs = _LANGS.get(fn)
    if langs is None:
        mods = (tl, tl.core)
        mods_seen = (v for v in fn.__globals__.values() if inspect.ismodule(v) and v in mods)
        langs = frozenset(id(v) for v in mods_seen)
        _LANGS[fn] = langs
    return langs


def install() -> bool:
    """Skip the nested patches from now on; False (nothing done) without the internals."""
    if _STATE["installed"] is not None:
        return True
    found = _internals()
    if found is None:
        return False
    interpreter, tl = found
    patch_lang, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    np_dtype, np_dtypes = interpreter._get_np_dtype, {}

    def _patch_lang(fn):
        langs = _language_modules(fn, tl)
        if _RUNNING and langs and langs <= _RUNNING[-1]:  # none seen: upstream asserts
            _STATE["skipped"] += 1
            return interpreter._LangPatchScope()  # nothing to restore
        scope = patch_lang(fn)
        _STATE["patched"] += 1
        if _RUNNING:
            _RUNNING[-1] = _RUNNING[-1] | langs
        return scope

    def _grid_call(self, *args, **kwargs):
        _RUNNING.append(frozenset())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _RUNNING.pop()

    def _get_np_dtype(tt_dtype):
        # upstream builds its table of 17 dtypes on every call; a Triton type's name says all
        # its numpy type depends on (block and pointer types name their element type)
        name = tt_dtype.name
        found = np_dtypes.get(name)
        if found is None:
            found = np_dtypes[name] = np_dtype(tt_dtype)
        return found

    _STATE["installed"] = [
        (interpreter, "_patch_lang", patch_lang, _patch_lang),
        (interpreter.GridExecutor, "__call__", grid_call, _grid_call),
        (interpreter, "_get_np_dtype", np_dtype, _get_np_dtype),
    ]
    _swap("ours")
    return True


def _swap(which: str) -> None:
    for owner, name, theirs, ours in _STATE["installed"]:
        setattr(owner, name, ours if which == "ours" else theirs)


@contextlib.contextmanager
def upstream():
    """Triton's own interpreter (every patch made, every table built) inside the block."""
    _swap("upstream")
    try:
        yield
    finally:
        _swap("ours")


def counts() -> tuple[int, int]:
    """(patches skipped, patches made) since install."""
    return _STATE["skipped"], _STATE["patched"]
