"""fastnmf: Factorizer (differentiable NMF U-Nets for 3D medical image segmentation), fast.

Public API:

- :func:`nmf` and :func:`matricized_nmf`, the functional NMF layer;
- :class:`NMF` and :class:`MatricizedNMF`, the same as ``torch.nn`` modules;
- ``kernel=`` ``"auto" | "triton" | "torch" | "reference"`` everywhere.

Importing fastnmf registers its PyTorch ops (``torch.ops.fastnmf.*``), so a saved
``torch.export`` program of a fastnmf model loads after ``import fastnmf``.
"""

from . import channel_norm as _channel_norm  # noqa: F401  (registers fastnmf::channel_layer_norm)
from . import window_op as _window_op  # noqa: F401  (registers fastnmf::window_nmf_triton)
from .modules import NMF, MatricizedNMF
from .ops import matricized_nmf, nmf  # (ops registers fastnmf::matricized_nmf, custom_op.py)

__version__ = "0.1.0"

__all__ = ["nmf", "matricized_nmf", "NMF", "MatricizedNMF", "__version__"]
