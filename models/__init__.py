"""Factorizer models, baselines and the model registry (installed as ``fastnmf.models``).

>>> from fastnmf import models
>>> net = models.build("swin_factorizer", preset="brats", kernel="torch")   # doctest: +SKIP
>>> models.available()                                                       # doctest: +SKIP

- :func:`build`, :func:`available`, :func:`presets`: the registry.
- :func:`factorizer` and the baselines :func:`nnunet`, :func:`resunet`, :func:`performer`,
  :func:`unetr`, :func:`swin_unetr`, :func:`segresnet`.
- Inference-time controls: :func:`set_nmf`, :func:`set_kernel`, :func:`inference_controls`,
  :func:`nmf_layers`.
- Interpretability: :func:`nmf_components`.
- :func:`count_parameters`, :func:`count_flops`.
"""

from .baselines import MonaiNet, nnunet, performer, resunet, segresnet, swin_unetr, unetr
from .factorizer import (
    VARIANTS,
    factorizer,
    inference_controls,
    nmf_components,
    nmf_layers,
    set_kernel,
    set_nmf,
    wrapped_nmf_blocks,
)
from .flops import count_flops, count_parameters
from .layers import (
    MLP,
    ChannelLayerNorm,
    FactorizerBlock,
    FavorAttention,
    PositionEmbedding,
    WrappedNMF,
)
from .registry import ARCH_PRESETS, MODELS, PRESETS, available, build, presets
from .unet import UNet

__all__ = [
    "build",
    "available",
    "presets",
    "MODELS",
    "ARCH_PRESETS",
    "PRESETS",
    "VARIANTS",
    "factorizer",
    "nnunet",
    "resunet",
    "performer",
    "unetr",
    "swin_unetr",
    "segresnet",
    "MonaiNet",
    "UNet",
    "FactorizerBlock",
    "WrappedNMF",
    "FavorAttention",
    "MLP",
    "ChannelLayerNorm",
    "PositionEmbedding",
    "nmf_layers",
    "wrapped_nmf_blocks",
    "set_nmf",
    "set_kernel",
    "inference_controls",
    "nmf_components",
    "count_parameters",
    "count_flops",
]
