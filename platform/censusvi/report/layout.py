"""The 2-D picture of a mapping: a UMAP fitted on a per-cell-type subsample of the reference, with
query cells placed by the same UMAP's ``transform``, so every query lands on a fixed reference map
(the explorer and the report of the same index show the same layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from censusvi.annotate.index import LabelIndex


@dataclass
class ReferenceLayout:
    xy: np.ndarray  # (n, 2) positions of the subsampled reference cells
    labels: pd.DataFrame  # their label table rows
    umap: object  # the fitted umap.UMAP (transform places query cells)

    def place(self, latent: np.ndarray) -> np.ndarray:
        if len(latent) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        return np.asarray(self.umap.transform(np.asarray(latent, dtype=np.float32)), np.float32)


def reference_vectors(index: LabelIndex) -> np.ndarray:
    """The indexed embeddings back out of FAISS (flat indexes store them; IVF needs a direct map)."""
    ix = index.index
    if hasattr(ix, "make_direct_map"):
        ix.make_direct_map()
    return ix.reconstruct_n(0, ix.ntotal)


def subsample_per_type(labels: pd.Series, per_type: int, seed: int) -> np.ndarray:
    """At most ``per_type`` rows of each label, so rare types stay visible in a large reference."""
    rng = np.random.default_rng(seed)
    rows = []
    for _, group in labels.groupby(labels, sort=True).groups.items():
        group = np.asarray(group)
        rows.append(group if len(group) <= per_type else rng.choice(group, per_type, replace=False))
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def fit_reference_layout(
    index: LabelIndex, label_key: str | None = None, per_type: int = 300, seed: int = 0
) -> ReferenceLayout:
    import umap

    key = label_key or index.labels.columns[0]
    rows = subsample_per_type(index.labels[key].reset_index(drop=True), per_type, seed)
    z = reference_vectors(index)[rows]
    reducer = umap.UMAP(n_neighbors=min(15, max(2, len(rows) - 1)), random_state=seed, n_jobs=1)
    xy = np.asarray(reducer.fit_transform(z), dtype=np.float32)
    return ReferenceLayout(xy, index.labels.iloc[rows].reset_index(drop=True), reducer)
