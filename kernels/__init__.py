"""Fused Triton kernels for the NMF layer (installed as ``fastnmf.kernels``)."""


def _not_yet(*_args, **_kwargs):
    raise NotImplementedError(
        "kernel='triton' is not implemented yet; use kernel='torch' (fast closed form) or "
        "kernel='reference'"
    )


nmf = _not_yet
matricized_nmf = _not_yet
