"""h5ad sources: backed reads equal in-memory reads; Census filters work on plain files."""

from __future__ import annotations

import numpy as np

from censusvi.data.h5ad import H5adSource
from conftest import simulated_adata


def test_backed_reads_equal_in_memory(tmp_path):
    path = tmp_path / "x.h5ad"
    simulated_adata().write_h5ad(path)
    mem, disk = H5adSource(path, backed=False), H5adSource(path, backed=True)
    assert disk.backed and not mem.backed
    rows = np.array([0, 5, 6, 120, 299])
    np.testing.assert_array_equal(mem.read_rows(rows).toarray(), disk.read_rows(rows).toarray())


def test_census_filter_on_plain_h5ad(shared_data):
    src = H5adSource(shared_data / "pbmc_3chem_symphony_small.h5ad", obs_filter="nnz >= 300")
    assert 0 < len(src.obs) < 1200 and (src.obs["nnz"] >= 300).all()
    x = src.read_rows(np.arange(len(src.obs)))
    np.testing.assert_array_equal(np.diff(x.indptr), src.obs["nnz"].to_numpy())


def test_genes_without_ensembl_id_keep_their_symbol(shared_data):
    """pbmc_3chem has 344 genes with no Ensembl id: they stay addressable by symbol, ids unique."""
    src = H5adSource(shared_data / "pbmc_3chem_symphony_small.h5ad")
    assert len(set(src.var_ids)) == len(src.var_ids) == 1767
    assert sum(not i.startswith("ENSG") for i in src.var_ids) == 344
