"""The Python API (censusvi.pretrain, embed, build_index, annotate, map_query, de, impute, report)
on the three-chemistry PBMC panel: 3' v1 + v2 cells are the reference, the 5' cells the query."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import censusvi
from censusvi.annotate.index import load_index
from censusvi.annotate.majority import majority_vote, n_clusters
from censusvi.cli import main
from censusvi.model.io import load_model

ROOT = Path(__file__).resolve().parents[1]
PBMC = "pbmc_3chem_symphony_small.h5ad"
LABEL_COLUMNS = [
    "censusvi_nll_per_count",
    "predicted_cell_type",
    "cell_type_probability",
    "cell_type_uncertainty",
]


def pbmc_split(shared_data: Path) -> tuple[ad.AnnData, ad.AnnData]:
    a = ad.read_h5ad(shared_data / PBMC)
    return a[a.obs["batch"] != "5p"].copy(), a[a.obs["batch"] == "5p"].copy()


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """(reference, query, model, index, directory holding query.h5ad, model/ and index/)."""
    ref, query = pbmc_split(shared_data)
    model = censusvi.pretrain(
        ref, batch_key="batch", max_epochs=25, n_latent=10, n_hidden=64, lr=3e-3, batch_size=128
    )
    index = censusvi.build_index(ref, model, label_keys=["cell_type"])
    d = tmp_path_factory.mktemp("api")
    query.write_h5ad(d / "query.h5ad")
    model.save(d / "model")
    index.save(d / "index")
    return ref, query, model, index, d


def test_pretrain_embed_and_saved_directories_load_with_the_cli_loaders(trained):
    ref, _, model, index, d = trained
    assert model.batch_keys == ("batch",) and set(model.batch_categories) == {"3pv1", "3pv2"}
    a = ref.copy()
    censusvi.embed(a, model, key_added="X_scVI")
    assert a.obsm["X_scVI"].shape == (ref.n_obs, 10) and "X_scvi" not in a.obsm
    assert a.uns["censusvi"]["latent_key"] == "X_scVI"
    b = ref.copy()
    censusvi.embed(b, d / "model")  # a model directory, the default key
    np.testing.assert_allclose(b.obsm["X_scvi"], a.obsm["X_scVI"], rtol=1e-5, atol=1e-5)
    reloaded = load_index(d / "index")
    assert reloaded.meta["n_cells"] == ref.n_obs and reloaded.meta["dim"] == 10
    pd.testing.assert_frame_equal(reloaded.labels, index.labels)
    assert load_model(d / "model").genes.ids == model.genes.ids
    # the index holds the reference's own embeddings: a reference cell's nearest is itself
    _, idx = reloaded.search(a.obsm["X_scVI"][:50], 1)
    assert (idx[:, 0] == np.arange(50)).mean() > 0.9


def test_annotate_in_place_equals_the_cli(trained, capsys):
    _, query, model, index, d = trained
    q = query.copy()
    censusvi.annotate(q, model=model, index=index, batch_key="batch", key_added="X_scVI")
    argv = ["annotate", "--model", str(d / "model"), "--index", str(d / "index")]
    argv += ["--query", str(d / "query.h5ad"), "--batch-key", "batch", "--quiet"]
    assert main([*argv, "--latent-key", "X_scVI", "--out", str(d / "cli.h5ad")]) == 0
    capsys.readouterr()
    cli = ad.read_h5ad(d / "cli.h5ad")
    assert [c for c in cli.obs.columns if c not in query.obs.columns] == LABEL_COLUMNS
    assert list(q.obs.columns) == list(cli.obs.columns)
    for c in LABEL_COLUMNS:
        left, right = q.obs[c], cli.obs[c]
        if c.startswith("predicted_"):
            assert (left.astype(str).to_numpy() == right.astype(str).to_numpy()).all()
        else:
            np.testing.assert_allclose(left.to_numpy(), right.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.obsm["X_scVI"], cli.obsm["X_scVI"], rtol=1e-5, atol=1e-5)
    ours, theirs = (x.uns["censusvi"]["evaluation"]["cell_type"] for x in (q, cli))
    assert ours == pytest.approx(dict(theirs))
    accuracy = ours["accuracy"]
    assert accuracy > 0.6, accuracy  # 5' cells labelled from a 3' reference (9 types)


def test_annotate_with_a_registered_model_and_its_index(trained, tmp_path, monkeypatch):
    from censusvi.registry.versions import promote, register_version

    _, query, model, index, d = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    assert register_version(d / "model", d / "index", "api-pbmc") == "1"
    promote("api-pbmc", "1", "production")
    registered, local = query.copy(), query.copy()
    censusvi.annotate(registered, model="models:/api-pbmc@production", batch_key="batch")
    censusvi.annotate(local, model=model, index=d / "index", batch_key="batch")
    for c in LABEL_COLUMNS:
        assert (registered.obs[c].astype(str) == local.obs[c].astype(str)).all(), c
    with pytest.raises(ValueError, match="no index: pass index="):
        censusvi.annotate(query.copy(), model=d / "model", batch_key="batch")


def test_map_query_de_and_impute(trained):
    ref, query, model, _, _ = trained
    q = query.copy()
    mapped = censusvi.map_query(q, model, batch_key="batch", key_added="X_scVI")
    assert mapped.batch_categories == (*model.batch_categories, "5p")
    assert q.obsm["X_scVI"].shape == (q.n_obs, 10) and np.isfinite(q.obsm["X_scVI"]).all()
    assert q.obs["censusvi_nll_per_count"].gt(0).all()
    assert q.uns["censusvi"]["new_batches"] == ["5p"]

    res = censusvi.de(ref, model, "cell_type", "B", n_samples=400)
    assert len(res) == len(model.genes) and res["comparison"].unique().tolist() == ["B vs Rest"]
    symbols = res["gene_symbol"] if "gene_symbol" in res else res.index.to_series()
    top = set(symbols.head(30))
    assert top & {"MS4A1", "CD79A", "CD79B"}, sorted(top)  # B-cell markers lead

    out = censusvi.impute(query, model, ["MS4A1", "CD3E"], batch_key="batch")
    layer = out.layers["censusvi_imputed"]
    ms4a1 = np.asarray(layer[:, list(out.var_names).index("MS4A1")].todense()).ravel()
    is_b = out.obs["cell_type"].to_numpy() == "B"
    assert ms4a1[is_b].mean() > 3 * ms4a1[~is_b].mean()


def test_majority_vote_is_each_clusters_most_frequent_label():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array(["T", "T", "B", "NK", "B", "B"])
    assert majority_vote(clusters, labels).tolist() == ["T", "T", "T", "B", "B", "B"]
    assert n_clusters(1000) == 32 and n_clusters(1) == 1
    with pytest.raises(ValueError, match="3 cluster ids for 2 labels"):
        majority_vote(clusters[:3], labels[:2])


def test_majority_voting_does_not_lower_accuracy(cellbench_split, capsys):
    """CellBench: a CEL-seq2 reference, the Drop-seq cells as query (cell lines by SNPs)."""
    d = cellbench_split
    ref, query = ad.read_h5ad(d / "ref.h5ad"), ad.read_h5ad(d / "query.h5ad")
    index = censusvi.build_index(ref, d / "m", label_keys="cell_type")
    # kNN's per-cell answers (the ensemble gets all 210 right here, and voting then flips 3)
    censusvi.annotate(query, model=d / "m", index=index, majority_voting=True, method="knn")
    truth = query.obs["cell_type"].astype(str)
    per_cell = (query.obs["predicted_cell_type"].astype(str) == truth).mean()
    voted = (query.obs["cell_type_majority_voting"].astype(str) == truth).mean()
    # voting trades a cell's own neighbours for its cluster's: at most 1 % of cells may flip
    assert voted >= per_cell - 0.01 and voted > 0.8, (per_cell, voted)
    assert query.uns["censusvi"]["majority_voting"]["n_clusters"] == n_clusters(query.n_obs)
    assert query.obs["censusvi_over_clustering"].nunique() == n_clusters(query.n_obs)


def test_report_writes_its_umap_to_obsm(trained, tmp_path, capsys):
    pytest.importorskip("umap")
    _, query, model, index, d = trained
    q = query.copy()
    censusvi.annotate(q, model=model, index=index, batch_key="batch", key_added="X_scVI")
    content = censusvi.report(q, index, tmp_path / "r.html", umap_key="X_umap", per_type=50)
    assert (tmp_path / "r.html").stat().st_size > 1000 and content["n_query_cells"] == q.n_obs
    assert q.obsm["X_umap"].shape == (q.n_obs, 2) and np.isfinite(q.obsm["X_umap"]).all()
    np.testing.assert_allclose(q.obsm["X_umap"][:, 0], content["query"]["x"], atol=1e-3)
    q.write_h5ad(tmp_path / "annotated.h5ad")
    mapped = str(tmp_path / "annotated.h5ad")
    argv = ["report", "--mapped", mapped, "--reference", str(d / "index"), "--per-type", "50"]
    argv += ["--quiet", "--out"]
    assert main([*argv, str(tmp_path / "cli.html"), "--umap-out", str(tmp_path / "u.h5ad")]) == 0
    capsys.readouterr()
    written = ad.read_h5ad(tmp_path / "u.h5ad")
    np.testing.assert_allclose(written.obsm["X_umap"], q.obsm["X_umap"], atol=1e-4)
    assert main([*argv, str(tmp_path / "c2.html"), "--umap-out", mapped]) == 2
    assert "is the input" in capsys.readouterr().err


def readme_quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- python-quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert found, "README.md: no ```python block after <!-- python-quickstart -->"
    return found.group(1)


def test_readme_python_quickstart_runs(shared_data, tmp_path, monkeypatch):
    code = readme_quickstart()
    assert "max_epochs=100" in code
    ref, query = pbmc_split(shared_data)
    ref.write_h5ad(tmp_path / "reference.h5ad")
    query.write_h5ad(tmp_path / "query.h5ad")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace("max_epochs=100", "max_epochs=5"), "README.md", "exec"), namespace)
    q = namespace["query"]
    assert {"predicted_cell_type", "cell_type_majority_voting"} <= set(q.obs.columns)
    assert q.obs["predicted_cell_type"].notna().all()
    assert load_model(tmp_path / "model").batch_keys == ("batch",)
    assert load_index(tmp_path / "index").meta["n_cells"] == ref.n_obs


def test_cells_without_counts_get_nan_in_place(trained):
    _, query, model, index, _ = trained
    q = query.copy()
    keep = np.arange(q.n_obs) >= 3  # three cells without a single count: none can be mapped
    q.X = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ q.X)
    q.X.eliminate_zeros()
    censusvi.annotate(q, model=model, index=index, batch_key="batch")
    assert q.n_obs == query.n_obs and np.isnan(q.obsm["X_scvi"][:3]).all()
    assert q.obs["predicted_cell_type"].iloc[:3].isna().all()
    assert q.obs["predicted_cell_type"].iloc[3:].notna().all()
    assert np.isfinite(q.obsm["X_scvi"][3:]).all()


def test_subpackages_named_like_api_functions_call_them(tmp_path):
    import types

    import censusvi.annotate.pipeline  # noqa: F401  binds censusvi.annotate to the subpackage
    import censusvi.report.build  # noqa: F401

    assert isinstance(censusvi.annotate, types.ModuleType) and callable(censusvi.report)
    with pytest.raises(ValueError, match="no index: pass index="):
        censusvi.annotate(ad.AnnData(np.ones((2, 2), np.float32)), model=str(tmp_path))


def test_pretrain_from_a_path_with_batch_keys_writes_the_cli_directory(shared_data, tmp_path):
    a = ad.read_h5ad(shared_data / PBMC)[::6].copy()
    a.write_h5ad(tmp_path / "small.h5ad")
    seen = []
    model = censusvi.pretrain(
        tmp_path / "small.h5ad", batch_keys=["batch", "assay"], out=tmp_path / "m",
        max_epochs=2, n_latent=4, n_hidden=16, n_hvg=0, on_epoch_end=[seen.append],
    )  # fmt: skip
    assert [s.epoch for s in seen] == [0, 1] and all(s.val_elbo is not None for s in seen)
    assert model.batch_keys == ("batch", "assay")
    loaded = load_model(tmp_path / "m")
    assert loaded.batch_categories == model.batch_categories and len(loaded.genes) == a.n_vars
    assert loaded.provenance["source"] == str(tmp_path / "small.h5ad")
    with pytest.raises(ValueError, match=r"unknown pretrain setting\(s\) \['n_latnet'\]"):
        censusvi.pretrain(a, n_latnet=4)
