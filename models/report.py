"""Parameter / FLOP table of every registered model for both presets.

Run ``python -m fastnmf.models.report``: FLOPs are counted on the meta device by
:func:`fastnmf.models.count_flops` (NMF layers counted with the literal reference algorithm).
"""

from __future__ import annotations

from collections.abc import Sequence

from .flops import count_flops, count_parameters
from .registry import ARCH_PRESETS, available, build

__all__ = ["table"]


def table(names: Sequence[str] | None = None, presets: Sequence[str] = ("brats", "isles")) -> str:
    """A Markdown table of parameters and FLOPs (meta device) of every model and preset."""
    names = [n for n in available() if n != "factorizer"] if names is None else list(names)
    head = "| model | " + " | ".join(f"{p} params (M) | {p} GFLOPs" for p in presets) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(presets))]
    for name in names:
        cells = []
        for preset in presets:
            cfg = ARCH_PRESETS[preset]
            model = build(name, preset=preset)
            shape = (1, cfg["in_channels"], *cfg["spatial_size"])
            cells.append(f"{count_parameters(model) / 1e6:.3f}")
            cells.append(f"{count_flops(model, shape) / 1e9:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fastnmf.models.report
    print(table())
