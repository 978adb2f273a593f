"""How well minibatches mix datasets: the quantity that block shuffling trades against contiguous
reads. A Census-like corpus is stored dataset by dataset; a minibatch cut from one contiguous block
holds one dataset, which biases every gradient step. The mean entropy of the dataset composition
of minibatches, relative to what a global shuffle gives, says how close a loader comes (1 = as
mixed as a global shuffle, 0 = one dataset per minibatch)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def composition_entropy(codes: np.ndarray) -> float:
    """Entropy (bits) of the dataset codes in one minibatch."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def mixing_ratio(
    minibatch_codes: Iterable[np.ndarray], all_codes: np.ndarray, seed: int = 0
) -> tuple[float, float, float]:
    """(ratio, loader's mean entropy, a global shuffle's mean entropy) for the same batch sizes."""
    batches = list(minibatch_codes)
    loader = float(np.mean([composition_entropy(b) for b in batches]))
    shuffled = np.random.default_rng(seed).permutation(all_codes)
    sizes = np.cumsum([len(b) for b in batches])[:-1]
    reference = float(np.mean([composition_entropy(b) for b in np.split(shuffled, sizes)]))
    return (loader / reference if reference > 0 else 1.0), loader, reference
