"""Integration quality with scib-metrics: the model's latent against unintegrated PCA and Harmony.

``Benchmarker`` computes the scIB bio-conservation metrics (isolated labels, Leiden NMI/ARI,
silhouette of labels, cLISI) and batch-correction metrics (silhouette of batches, iLISI, kBET,
graph connectivity, PCR comparison against the unintegrated PCA), and the scIB total
(0.4 x batch correction + 0.6 x bio conservation), for every embedding at once.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def pca_baseline(adata: ad.AnnData, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """Unintegrated PCA of log-normalised counts (the usual starting point, and scIB's
    'pre-integrated' reference for the PCR comparison)."""
    import scanpy as sc

    a = ad.AnnData(adata.X.copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    n_comps = min(n_comps, a.n_obs - 1, a.n_vars - 1)
    sc.pp.pca(a, n_comps=n_comps, random_state=seed)
    return np.asarray(a.obsm["X_pca"], dtype=np.float32)


def harmony_baseline(pca: np.ndarray, batches: pd.Series, seed: int = 0) -> np.ndarray:
    import harmonypy

    meta = pd.DataFrame({"batch": batches.astype(str).to_numpy()})
    ho = harmonypy.run_harmony(pca, meta, ["batch"], random_state=seed, verbose=False)
    z = np.asarray(ho.Z_corr)
    return np.ascontiguousarray(z.T if z.shape[0] != len(meta) else z, dtype=np.float32)


def integration_benchmark(
    adata: ad.AnnData,
    batch_key: str,
    label_key: str,
    embeddings: dict[str, np.ndarray],
    pre_integrated: str = "X_pca",
) -> pd.DataFrame:
    """One row per embedding: every scIB metric, 'Batch correction', 'Bio conservation', 'Total'."""
    from scib_metrics.benchmark import Benchmarker

    for key in (batch_key, label_key):
        if key not in adata.obs.columns:
            raise ValueError(f"{key!r} is not an obs column; obs has {sorted(adata.obs.columns)}")
    a = ad.AnnData(obs=adata.obs[[batch_key, label_key]].astype(str).astype("category"))
    for name, z in embeddings.items():
        if len(z) != a.n_obs:
            raise ValueError(f"{name}: {len(z)} rows for {a.n_obs} cells")
        a.obsm[name] = np.asarray(z, dtype=np.float32)
    bm = Benchmarker(
        a,
        batch_key=batch_key,
        label_key=label_key,
        embedding_obsm_keys=list(embeddings),
        pre_integrated_embedding_obsm_key=pre_integrated if pre_integrated in embeddings else None,
        progress_bar=False,
    )
    bm.benchmark()
    table = bm.get_results(min_max_scale=False)
    table = table[table.index != "Metric Type"].astype(float)
    table.index.name = "embedding"
    return table
