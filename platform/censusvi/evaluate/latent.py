"""Quick, dependency-light checks of a latent space: kNN label accuracy and label silhouette.

These are what the demo prints per dataset; the full scib-metrics benchmark lives beside them.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from censusvi.data.labels import unlabelled


def knn_label_accuracy(z: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out accuracy of a majority vote of each cell's k nearest other cells."""
    labels = np.asarray(labels).astype(str)
    k = min(k, len(z) - 1)
    if k < 1:
        raise ValueError("kNN accuracy needs at least two cells")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    neigh = labels[idx[:, 1:]]
    cats, codes = np.unique(neigh, return_inverse=True)
    votes = np.zeros((len(z), len(cats)), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(z)), k), codes.ravel()), 1)
    return float((cats[votes.argmax(1)] == labels).mean())


def label_silhouette(
    z: np.ndarray, labels: np.ndarray, seed: int = 0, max_cells: int = 20000
) -> float:
    """Silhouette width of the labels in [-1, 1] (higher: types better separated)."""
    labels = np.asarray(labels).astype(str)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(silhouette_score(z, labels, sample_size=min(max_cells, len(z)), random_state=seed))


def per_group_scores(
    z: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> dict[str, dict[str, float]]:
    """kNN accuracy and silhouette within each group (e.g. dataset) of labelled cells."""
    labels, groups = np.asarray(labels).astype(str), np.asarray(groups).astype(str)
    out: dict[str, dict[str, float]] = {}
    for g in np.unique(groups):
        m = (groups == g) & ~unlabelled(labels)
        if m.sum() < 10 or len(np.unique(labels[m])) < 2:
            continue
        out[g] = {
            "n_cells": int(m.sum()),
            "n_types": int(len(np.unique(labels[m]))),
            "knn_accuracy": knn_label_accuracy(z[m], labels[m]),
            "silhouette": label_silhouette(z[m], labels[m]),
        }
    return out
