"""fastnmf: Factorizer (differentiable NMF U-Nets for 3D medical image segmentation), fast.

Public API:

- :func:`nmf` and :func:`matricized_nmf`, the functional NMF layer;
- :class:`NMF` and :class:`MatricizedNMF`, the same as ``torch.nn`` modules;
- ``kernel=`` ``"auto" | "triton" | "torch" | "reference"`` everywhere.
"""

from .modules import NMF, MatricizedNMF
from .ops import matricized_nmf, nmf

__version__ = "0.1.0"

__all__ = ["nmf", "matricized_nmf", "NMF", "MatricizedNMF", "__version__"]
