"""CellTypist-style majority voting: over-cluster the query's latent, then give every cell its
cluster's most frequent predicted label.

Per-cell kNN transfer lets a few cells of a homogeneous population flip to a neighbouring type;
a vote over a small cluster of similar cells smooths those flips while keeping rare types that
form their own clusters. CellTypist over-clusters with Leiden (scanpy), which is not a core
dependency here: clusters are k-means on the latent (scikit-learn, in the core) with
``n_clusters(n) = ceil(sqrt(n))`` clusters, about sqrt(n) cells each (32 clusters of ~31 cells
for 1,000 cells; 317 of ~316 for 100,000): small enough to split neighbouring types, large
enough for a vote to mean something.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

MINIBATCH_ABOVE = 50_000  # cells above which k-means runs in minibatches (MiniBatchKMeans)


def n_clusters(n_cells: int) -> int:
    """The over-clustering's cluster count: ceil(sqrt(n_cells)), at least 1."""
    return max(1, math.ceil(math.sqrt(n_cells)))


def over_cluster(latent: np.ndarray, n: int | None = None, seed: int = 0) -> np.ndarray:
    """A k-means cluster id per row of ``latent`` (``n`` clusters, default ``n_clusters``)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    z = np.asarray(latent, dtype=np.float32)
    if len(z) == 0:
        return np.zeros(0, dtype=np.int64)
    n = min(n or n_clusters(len(z)), len(z))
    if n < 1:
        raise ValueError(f"{n} clusters: majority voting needs at least 1")
    kind = MiniBatchKMeans if len(z) > MINIBATCH_ABOVE else KMeans
    return kind(n_clusters=n, n_init=3, random_state=seed).fit_predict(z).astype(np.int64)


def majority_vote(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each cell's cluster's most frequent label (ties: the label first in sorted order)."""
    clusters, labels = np.asarray(clusters), np.asarray(labels).astype(str)
    if len(clusters) != len(labels):
        raise ValueError(f"{len(clusters)} cluster ids for {len(labels)} labels")
    if len(labels) == 0:
        return labels
    winner = pd.crosstab(clusters, labels).idxmax(axis=1)  # columns sorted: ties -> first label
    return winner.loc[clusters].to_numpy().astype(str)
