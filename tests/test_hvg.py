"""Streamed, stratified Seurat v3 HVG selection equals scanpy's on real counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc

from censusvi.data.h5ad import H5adSource
from censusvi.data.hvg import highly_variable_genes


def test_matches_scanpy_seurat_v3_with_strata(shared_data):
    a = ad.read_h5ad(shared_data / "pbmc_zheng_sorted_donorA_mudan.h5ad")
    sc.pp.filter_genes(a, min_cells=1)
    ref = sc.pp.highly_variable_genes(
        a, flavor="seurat_v3", n_top_genes=1500, batch_key="donor", inplace=False
    )
    ours = highly_variable_genes(H5adSource("zheng", adata=a), 1500, ["donor"], block_size=700)
    assert set(np.flatnonzero(ref["highly_variable"].to_numpy())) == set(ours.genes)
    np.testing.assert_allclose(ours.variances_norm, ref["variances_norm"].to_numpy(), rtol=1e-9)
    assert ours.strata == ("donor_A", "sorted_populations")
