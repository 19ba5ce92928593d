"""Benchmarks import their helpers from this folder; which runs collect the suites.

``pyproject.toml`` lists ``bench`` in ``testpaths`` and ``bench_*.py`` in ``python_files`` so that
``pytest --benchmark-only`` (from the repository root) and ``pytest bench --benchmark-only`` both
collect the suites. A plain ``pytest`` must stay the quick test run (each suite runs once at a
tiny shape there, from ``tests/test_bench_smoke.py``), so the suites are collected only when

- ``--benchmark-only`` is given, or
- the command line names ``bench/`` or a path inside it (``pytest bench``,
  ``pytest bench/bench_nmf.py -k ...``).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

HERE = Path(__file__).resolve().parent


def _named_on_command_line(path: Path, config) -> bool:
    """True if a command-line argument is ``path``, or a folder holding it other than the root."""
    root = Path(config.rootpath).resolve()
    for arg in config.invocation_params.args:
        text = str(arg).split("::")[0]
        if not text or text.startswith("-"):
            continue
        named = (Path(config.invocation_params.dir) / text).resolve()
        if named == root or not named.exists():
            continue
        if named == path or named in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path, config):
    path = Path(collection_path).resolve()
    if path.parent != HERE or not (path.name.startswith("bench_") and path.suffix == ".py"):
        return None
    if config.getoption("benchmark_only", default=False) or _named_on_command_line(path, config):
        return None
    return True
