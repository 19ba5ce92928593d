"""Which training crop each step sees: a pure function of ``(seed, step)``.

Crop ``g`` of a run is case ``perm_e[g mod n]`` (``perm_e`` a permutation drawn from
``(seed, epoch e)``) augmented with random state seeded by ``(seed, g)``; step ``s`` of rank ``r``
takes ``g = (s·world + r)·batch + i`` (:class:`DistributedSampler`'s interleaving). So a resumed
run sees exactly the crops the uninterrupted run would have, whatever the number of workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["case_seed", "CropStream", "StepBatches"]


def case_seed(seed: int, index: int) -> int:
    """A 32-bit seed for crop ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class CropStream(torch.utils.data.Dataset):
    """Training crop ``g`` of a run (see the module docstring): deterministic in (seed, g)."""

    def __init__(self, cached, transform, *, seed: int) -> None:
        self.cached = cached  # CacheDataset over the training cases
        self.transform = transform
        self.seed = seed
        self.n = len(cached)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return 2**62

    def case_index(self, g: int) -> int:
        epoch = g // self.n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][g % self.n])

    def __getitem__(self, g: int) -> dict[str, Any]:
        self.transform.set_random_state(seed=case_seed(self.seed, g))
        item = self.cached[self.case_index(g)]
        if isinstance(item, list):  # RandCropByPosNegLabeld returns a list of samples
            item = item[0]
        return {"image": torch.as_tensor(item["image"]), "label": torch.as_tensor(item["label"])}


class StepBatches(torch.utils.data.Sampler):
    """Batches of crop indices for steps ``start..stop-1`` of rank ``rank`` of ``world``."""

    def __init__(self, *, start: int, stop: int, batch: int, rank: int, world: int) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for s in range(self.start, self.stop):
            base = (s * self.world + self.rank) * self.batch
            yield list(range(base, base + self.batch))
