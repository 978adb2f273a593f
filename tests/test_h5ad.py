"""h5ad sources: backed reads equal in-memory reads; Census filters work on plain files."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from censusvi import cli
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


def test_an_obs_filter_is_parsed_never_run(tmp_path, capsys):
    """pandas' DataFrame.eval resolved '@os' to the caller's module and ran the shell command; the
    filter is now walked by one grammar on every source, and anything else is one line, exit 2."""
    path = tmp_path / "x.h5ad"
    adata = simulated_adata()
    adata.obs["assay"] = np.where(np.arange(adata.n_obs) % 3 == 0, "10x 3' v3", "Drop-seq")
    adata.write_h5ad(path)
    marker = tmp_path / "pwned"
    for payload in (
        f"@os.system('touch {marker}')",
        f"__import__('os').system('touch {marker}') == 0",
        f"nnz.__class__.__init__.__globals__['os'].system('touch {marker}')",
    ):
        rc = cli.main(
            [
                "pretrain",
                "--source",
                str(path),
                "--out",
                str(tmp_path / "m"),
                "--obs-filter",
                payload,
                "--max-epochs",
                "1",
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "obs filter" in err, err
        assert not marker.exists() and not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="'nope' is not an obs column"):
        H5adSource(path, obs_filter="nope == 1")
    src = H5adSource(path, obs_filter='assay in ["10x 3\' v3"] and not (nnz < 0) or raw_sum < 0')
    assert len(src.obs) == (adata.n_obs + 2) // 3 and (src.obs["assay"] == "10x 3' v3").all()


def test_an_obs_filter_reads_as_pandas_query_read_it():
    """What pandas' query accepted for plain comparisons still selects the same cells: & and |
    bind looser than comparisons (pandas rewrites them), == with a list is isin, NaN compares
    false, categorical columns compare by value."""
    from censusvi.data.obs_filter import mask

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({
        "nnz": rng.integers(0, 1000, 200),
        "is_primary_data": rng.random(200) < 0.5,
        "code": rng.integers(-2, 3, 200),
        "assay": pd.Categorical(rng.choice(["10x 3' v3", "Drop-seq", "Smart-seq2"], 200)),
        "score": np.where(rng.random(200) < 0.2, np.nan, rng.random(200)),
    })  # fmt: skip
    for text in [
        "is_primary_data == True & nnz >= 300",
        "nnz > 800 | nnz < 100 & is_primary_data",
        "code in [-2, 0] and assay != 'Drop-seq'",
        "assay == ['Drop-seq', 'Smart-seq2']",
        "assay != ['Drop-seq'] or ~is_primary_data",
        "score > 0.5",
        "not (score <= 0.5) and 100 < nnz <= 900",
        "is_primary_data",
    ]:
        np.testing.assert_array_equal(mask(obs, text), obs.eval(text).to_numpy(), err_msg=text)
    for text, says in [
        ("x & nnz > 1", "'x' is not an obs column"),
        ("~" * 5000 + "is_primary_data", "it nests too deeply"),
        ("nnz in nnz", "'in' takes a [list]"),
        ("nnz + 1 > 2", "'nnz + 1' is neither a column nor a literal"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            mask(obs, text)


def test_a_file_that_reads_other_files_is_refused_before_anndata_opens_it(tmp_path, capsys):
    """An .h5ad handed over whose obs names are an external link, external storage or a virtual
    dataset over a file of the reader's machine: the CLI copied that file into its output."""
    from hostile import (
        _external_link,
        _external_storage,
        _h5ad_variant,
        _virtual,
        server_secrets,
    )

    secret, secret_h5 = server_secrets(tmp_path)
    q = simulated_adata(n_cells=40)
    for name, change in [
        ("link", _external_link(secret_h5)),
        ("ext", _external_storage(secret)),
        ("virtual", _virtual(secret_h5)),
    ]:
        _h5ad_variant(q, tmp_path, name, change)
        out = tmp_path / f"{name}.out.h5ad"
        rc = cli.main(["ingest", str(tmp_path / f"{name}.h5ad"), "--out", str(tmp_path / "x.soma")])
        err = capsys.readouterr().err
        assert rc == 2 and f"{name}.h5ad reaches outside itself" in err, err
        assert cli.main(["pretrain", "--source", str(tmp_path / f"{name}.h5ad"), "--batch-keys",
                         "batch", "--out", str(out)]) == 2  # fmt: skip
        assert "write it anew with anndata's write_h5ad" in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "x.soma").exists()
    q.obs_names = [f"c{i}" for i in range(q.n_obs)]
    q.write_h5ad(tmp_path / "plain.h5ad")
    assert len(H5adSource(tmp_path / "plain.h5ad").obs) == 40


def test_a_bool_mask_layer_beside_the_counts_is_read_and_x_names_the_default(tmp_path):
    """A layer the user does not read (a bool mask) made every command refuse the file
    ("CSR data must hold numbers"); only the matrix read as counts must hold numbers. And the
    help names X as the default layer, so '--layer X' reads X."""
    a = simulated_adata()
    a.layers["counts"] = a.X.copy()
    a.layers["mask"] = (a.X > 0).astype(bool)
    path = tmp_path / "mask.h5ad"
    a.write_h5ad(path)
    ref = a.X.toarray()
    for layer in (None, "X", "counts"):
        src = H5adSource(path, layer=layer)
        np.testing.assert_array_equal(src.read_rows(np.arange(a.n_obs)).toarray(), ref)
    with pytest.raises(ValueError, match="must hold numbers"):
        H5adSource(path, layer="mask")  # the mask itself is not counts
