"""`censusvi ingest` builds a Census-schema SOMA experiment that reads back the same counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from censusvi.data.soma import CENSUS_FILTER, SomaSource, ingest

CENSUS_OBS = {
    "dataset_id",
    "assay",
    "suspension_type",
    "donor_id",
    "cell_type",
    "tissue",
    "is_primary_data",
    "nnz",
    "raw_sum",
}


def test_schema_and_gene_union(soma_exp):
    out, files = soma_exp
    src = SomaSource(str(out))
    assert CENSUS_OBS <= set(src.obs.columns)
    assert src.obs["dataset_id"].value_counts().to_dict() == {
        "pbmc_kang_ctrl_stim_harmony": 2000,
        "cellbench_lung_celllines": 1021,
    }
    ids = set()
    for f in files:
        v = ad.read_h5ad(f, backed="r").var
        ids |= {g if isinstance(g, str) else n for g, n in zip(v["gene_ids"], v.index)}
    assert set(src.var_ids) == ids


def test_counts_read_back_exactly(soma_exp):
    out, files = soma_exp
    src = SomaSource(str(out))
    a = ad.read_h5ad(files[1])
    rows = np.flatnonzero(src.obs["dataset_id"].to_numpy() == "pbmc_kang_ctrl_stim_harmony")[
        [0, 5, 999]
    ]
    x = src.read_rows(rows)
    col = {g: j for j, g in enumerate(src.var_ids)}
    ids = [g if isinstance(g, str) else n for g, n in zip(a.var["gene_ids"], a.var_names)]
    names = [f"pbmc_kang_ctrl_stim_harmony:{n}" for n in a.obs_names]
    for r, row in zip(rows, x.toarray()):
        i = names.index(src.obs["obs_id"].iloc[r])
        np.testing.assert_array_equal(row[[col[g] for g in ids]], a.X[i].toarray().ravel())


def test_census_filter(soma_exp):
    src = SomaSource(str(soma_exp[0]), obs_filter=CENSUS_FILTER)
    assert (src.obs["nnz"] >= 300).all() and 0 < len(src.obs) < 3021


def test_refuses_to_overwrite_and_bad_filter(soma_exp, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        ingest(soma_exp[1], soma_exp[0])
    with pytest.raises(ValueError, match="obs filter 'no_such_column == 1' failed"):
        SomaSource(str(soma_exp[0]), obs_filter="no_such_column == 1")


def test_census_uri_opens_through_cellxgene_census(soma_exp, monkeypatch):
    """census://VERSION goes to cellxgene_census.open_soma (offline here: a local experiment stands in)."""
    import cellxgene_census
    import tiledbsoma

    asked = {}

    def fake_open_soma(census_version):
        asked["version"] = census_version
        return {"census_data": {"homo_sapiens": tiledbsoma.Experiment.open(str(soma_exp[0]))}}

    monkeypatch.setattr(cellxgene_census, "open_soma", fake_open_soma)
    src = SomaSource("census://2025-11-08", obs_filter=CENSUS_FILTER)
    assert asked == {"version": "2025-11-08"} and len(src.obs) > 0
    assert src.read_rows(np.arange(3)).shape == (3, len(src.var_ids))
