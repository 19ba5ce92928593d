"""Model registry: ``build(name, preset="brats", kernel="auto", **overrides)`` and ``available()``.

Presets (paper sections 4.1-4.2):

========  ===  ===  ========  ===  ======  =========  ================
preset    in   out  patch     E    window  mlp_ratio  swin shifts
========  ===  ===  ========  ===  ======  =========  ================
brats     4    3    128^3     8    8       2          [None, 2, 4, 6]
isles     2    1    64^3      4    4       4          [None, 1, 2, 3]
========  ===  ===  ========  ===  ======  =========  ================

Every model takes ``in_channels``, ``out_channels`` and ``spatial_size`` from the preset; the
Factorizer and Performer take E (``head_dim``), ``window`` and ``mlp_ratio`` too. Any keyword
argument of a model's builder can be overridden (e.g. ``widths=(8, 16, 32)``,
``spatial_size=(32, 32)`` for a 2D net); unknown ones are rejected with the valid ones listed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from fastnmf._checks import KERNELS, check_choice

from . import baselines
from .factorizer import factorizer

__all__ = ["ARCH_PRESETS", "PRESETS", "MODELS", "available", "presets", "build"]


def _arch(in_channels: int, out_channels: int, crop: int, *, head_dim: int, window: int,
          mlp_ratio: float, shifts: list) -> dict:  # fmt: skip
    """An architecture preset: channels in and out, a cubic training crop, the NMF settings."""
    return dict(in_channels=in_channels, out_channels=out_channels, spatial_size=(crop,) * 3,
                head_dim=head_dim, window=window, mlp_ratio=mlp_ratio, shifts=shifts)  # fmt: skip


ARCH_PRESETS: dict[str, dict] = {
    "brats": _arch(4, 3, 128, head_dim=8, window=8, mlp_ratio=2.0, shifts=[None, 2, 4, 6]),
    "isles": _arch(2, 1, 64, head_dim=4, window=4, mlp_ratio=4.0, shifts=[None, 1, 2, 3]),
}
PRESETS = ARCH_PRESETS  # the old name (fastnmf.config.RUN_PRESETS are the run presets)


def _factorizer_variant(variant: str) -> Callable[..., nn.Module]:
    def build_variant(**kwargs) -> nn.Module:
        return factorizer(variant=variant, **kwargs)

    build_variant.__signature__ = inspect.signature(factorizer).replace(  # type: ignore[attr-defined]
        parameters=[
            p for n, p in inspect.signature(factorizer).parameters.items() if n != "variant"
        ]
    )
    build_variant.__doc__ = f"{variant} Factorizer; see :func:`fastnmf.models.factorizer`."
    return build_variant


MODELS: dict[str, Callable[..., nn.Module]] = {
    "swin_factorizer": _factorizer_variant("swin"),
    "local_factorizer": _factorizer_variant("local"),
    "global_factorizer": _factorizer_variant("global"),
    "nnunet": baselines.nnunet,
    "resunet": baselines.resunet,
    "performer": baselines.performer,
    "unetr": baselines.unetr,
    "swin_unetr": baselines.swin_unetr,
    "segresnet": baselines.segresnet,
}
_ALIASES = {"factorizer": "swin_factorizer"}


def available() -> list[str]:
    """Names accepted by :func:`build` (``"factorizer"`` is an alias of ``"swin_factorizer"``)."""
    return sorted([*MODELS, *_ALIASES])


def presets() -> list[str]:
    return sorted(ARCH_PRESETS)


def build(name: str, preset: str = "brats", kernel: str = "auto", **overrides) -> nn.Module:
    """Build model ``name`` with the settings of ``preset``, then ``overrides``.

    ``kernel`` reaches every NMF layer (Factorizers only; other models ignore it).
    """
    check_choice("model", name, available(), listing="available models")
    check_choice("preset", preset, presets(), listing="valid presets")
    check_choice("kernel", kernel, KERNELS)
    fn = MODELS[_ALIASES.get(name, name)]
    params = inspect.signature(fn).parameters
    unknown = sorted(k for k in overrides if k not in params)
    if unknown:
        raise TypeError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; valid options: "
            f"{', '.join(params)}"
        )
    kwargs = {k: v for k, v in ARCH_PRESETS[preset].items() if k in params}
    if "kernel" in params:
        kwargs["kernel"] = kernel
    kwargs.update(overrides)
    return fn(**kwargs)
