"""Differential expression and imputation from the generative model, checked against scvi-tools."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import spearmanr

from censusvi.cli import main
from censusvi.generative.de import DEConfig, differential_expression, top_genes
from censusvi.generative.impute import LAYER, impute
from censusvi.model.io import load_model
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

scvi = pytest.importorskip("scvi")
N_SAMPLES = 10_000


def scvi_tools_de(model, adata, groupby, group) -> pd.DataFrame:
    scvi.settings.seed = 0
    return model.differential_expression(
        adata,
        groupby=groupby,
        group1=group,
        mode="change",
        delta=0.25,
        batch_correction=True,
        n_samples_overall=N_SAMPLES,
        silent=True,
    )


@pytest.mark.parametrize(
    ("fixture", "group"), [("cellbench_scvi", "H2228"), ("pbmc_scvi", "Mono_CD14")]
)
def test_de_agrees_with_scvi_tools(fixture, group, request):
    model_dir, cells, scvi_model = request.getfixturevalue(fixture)
    adata = ad.read_h5ad(cells)
    ours = differential_expression(
        load_model(model_dir),
        adata,
        "cell_type",
        group,
        batch_key="batch",
        config=DEConfig(n_samples=N_SAMPLES),
        quiet=True,
    )
    # ours: indexed by symbol (the data's var['symbol']), the id beside it; theirs: var_names
    assert ours.index.name == "gene"
    assert (ours.index == adata.var.loc[ours["gene_id"], "symbol"].to_numpy()).all()
    theirs = scvi_tools_de(scvi_model, adata, "cell_type", group).loc[ours["gene_id"]]
    rho = spearmanr(ours["lfc_mean"], theirs["lfc_mean"]).statistic
    overlap = len(set(top_genes(ours)["gene_id"]) & set(top_genes(theirs).index)) / 50
    assert rho >= 0.95, rho
    assert overlap >= 0.8, overlap
    for col in ("non_zeros_proportion1", "raw_mean2", "raw_normalized_mean1"):
        np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-5)  # the same cells and counts
    assert (ours["is_de_fdr_0.05"].to_numpy() == theirs["is_de_fdr_0.05"].to_numpy()).mean() > 0.95


def test_known_markers_come_out_on_top(pbmc_scvi):
    model_dir, cells, _ = pbmc_scvi
    adata = ad.read_h5ad(cells)
    res = differential_expression(
        load_model(model_dir),
        adata,
        "cell_type",
        ["B", "NK", "Mono_CD14"],
        batch_key="batch",
        config=DEConfig(n_samples=5000),
        quiet=True,
    )
    markers = {"B": {"CD79A", "MS4A1"}, "NK": {"NKG7", "GNLY"}, "Mono_CD14": {"LYZ", "CD14"}}
    for group, expected in markers.items():
        frame = res[res["group1"] == group]
        up = frame[frame["lfc_mean"] > 0]
        top = set(top_genes(up, 25).index)  # the table is indexed by symbol
        assert expected & top, (group, sorted(top))
        assert frame.loc[sorted(expected), f"is_de_fdr_{0.05}"].any()


def test_de_cli_vanilla_and_errors(pbmc_scvi, tmp_path, capsys):
    model_dir, cells, _ = pbmc_scvi
    out = tmp_path / "de.csv"
    args = ["de", "--model", str(model_dir), "--data", str(cells), "--groupby", "cell_type"]
    assert main([*args, "--group1", "NK", "--group2", "T_CD8", "--out", str(out), "--quiet", "--n-samples", "2000"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    res = pd.read_csv(out, index_col=0)
    assert len(res) == 1767 and set(res["comparison"]) == {"NK vs T_CD8"}
    assert res.index.name == "gene" and res.loc["NKG7", "gene_id"] == "ENSG00000105374"
    expected = {"lfc_mean", "lfc_median", "lfc_std", "proba_de", "bayes_factor", "is_de_fdr_0.05",
                "scale1", "scale2", "raw_mean1", "non_zeros_proportion2"}  # fmt: skip
    assert expected <= set(res.columns)
    assert "NK vs T_CD8" in printed
    assert main([*args, "--group1", "B", "--out", str(tmp_path / "v.csv"), "--mode", "vanilla", "--quiet"]) == 0  # fmt: skip
    v = pd.read_csv(tmp_path / "v.csv", index_col=0)
    assert {"proba_m1", "bayes_factor"} <= set(v.columns) and set(v["group2"]) == {"Rest"}
    assert v["bayes_factor"].is_monotonic_decreasing
    assert main([*args, "--group1", "Macrophage", "--out", str(tmp_path / "x.csv")]) == 2
    assert "group 'Macrophage' is not in obs['cell_type']" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_de_on_a_mapped_query_with_new_batches(pbmc_scvi):
    model_dir, cells, _ = pbmc_scvi
    adata = ad.read_h5ad(cells)
    query = adata[adata.obs["batch"] == "5p"].copy()
    query.obs["lab"] = "lab-x"  # a batch the model never saw: mapped by surgery first
    res = differential_expression(
        load_model(model_dir), query, "cell_type", "B", batch_key="lab",
        config=DEConfig(n_samples=3000), quiet=True,
    )  # fmt: skip
    assert {"CD79A", "MS4A1"} & set(top_genes(res[res["lfc_mean"] > 0], 25).index)


@pytest.fixture(scope="module")
def cellbench_reference_and_query(shared_data, tmp_path_factory):
    """A censusvi model of four CellBench technologies; the fifth (Drop-seq) is the query."""
    d = tmp_path_factory.mktemp("impute")
    a = ad.read_h5ad(shared_data / "cellbench_lung_celllines.h5ad")
    a = a[:, np.argsort(-np.asarray(a.X.sum(0)).ravel())[:1000]].copy()
    ref, query = a[a.obs["batch"] != "sc_dropseq"].copy(), a[a.obs["batch"] == "sc_dropseq"].copy()
    ref.write_h5ad(d / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(d / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=64, n_latent=10),
        TrainConfig(schedule="census", max_epochs=60, lr=3e-3, batch_size=128, seed=0),
    )
    pretrain(cfg, d / "model", quiet=True)
    return d / "model", query, d


def test_imputation_recovers_hidden_genes(cellbench_reference_and_query, capsys):
    model_dir, query, d = cellbench_reference_and_query
    x = query.X.toarray()
    measured = np.flatnonzero((x > 0).mean(0) > 0.1)
    hidden = np.random.default_rng(0).choice(measured, len(query.var) // 10, replace=False)
    shown = query[:, np.setdiff1d(np.arange(query.n_vars), hidden)].copy()
    shown.write_h5ad(d / "shown.h5ad")
    genes = query.var["gene_ids"].iloc[hidden].tolist()
    argv = ["impute", "--model", str(model_dir), "--query", str(d / "shown.h5ad"),
            "--batch-key", "batch", "--genes", ",".join(genes), "--out", str(d / "imp.h5ad"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = ad.read_h5ad(d / "imp.h5ad")
    assert out.n_vars == shown.n_vars + len(genes)  # the hidden genes came back as new var rows
    assert not out.var["censusvi_measured"].iloc[shown.n_vars :].any()
    imputed = out.layers[LAYER][:, shown.n_vars :].toarray()
    truth = x[:, hidden] / x.sum(1, keepdims=True)
    rng = np.random.default_rng(1)
    rho = [spearmanr(imputed[:, j], truth[:, j]).statistic for j in range(len(genes))]
    control = [spearmanr(rng.permutation(imputed[:, j]), truth[:, j]).statistic for j in range(len(genes))]  # fmt: skip
    median, median_control = float(np.nanmedian(rho)), float(np.nanmedian(control))
    print(f"imputation: median Spearman {median:.3f} over {len(genes)} hidden genes (shuffled {median_control:.3f})")  # fmt: skip
    assert median >= 0.25 and median >= median_control + 0.2, (median, median_control)


def test_impute_options_and_errors(cellbench_reference_and_query):
    model_dir, query, _ = cellbench_reference_and_query
    model = load_model(model_dir)
    genes = [model.genes.symbols[0], model.genes.ids[1]]  # a symbol and an id
    own = impute(model, query, genes, "batch", quiet=True)
    assert own.layers[LAYER].nnz == 2 * query.n_obs and (own.layers[LAYER].data > 0).all()
    as_celseq = impute(model, query, genes, "batch", decode_batch="sc_celseq2", quiet=True)
    assert not np.allclose(own.layers[LAYER].toarray(), as_celseq.layers[LAYER].toarray())
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        impute(model, query, ["NOT_A_GENE"], "batch", quiet=True)
    with pytest.raises(ValueError, match="decode batch 'nowhere'"):
        impute(model, query, genes, "batch", decode_batch="nowhere", quiet=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A one-epoch model on simulated counts: enough to run DE and impute."""
    from conftest import simulated_adata

    d = tmp_path_factory.mktemp("tiny")
    a = simulated_adata(n_cells=120)
    a.var_names = a.var["gene_ids"].to_numpy()
    a.write_h5ad(d / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(d / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(schedule="census", max_epochs=1, batch_size=64),
    )
    model, _ = pretrain(cfg, d / "model", quiet=True)
    return model, a


def test_a_block_of_cells_without_counts_is_skipped(tiny_model):
    """4,096 empty cells first: every cell of the first reads (DE's 4,096, impute's 2,048) has
    no counts, so those minibatches are empty and must be skipped, not decoded."""
    model, a = tiny_model
    empty = ad.AnnData(
        sp.csr_matrix((4096, a.n_vars), dtype=np.float32),
        obs=pd.DataFrame({"batch": "b0", "cell_type": "t0"}, index=[f"e{i}" for i in range(4096)]),
        var=a.var,
    )
    query = ad.concat([empty, a], merge="first")
    out = impute(model, query, [model.genes.ids[0]], "batch", quiet=True)
    assert list(out.obs_names) == list(a.obs_names)  # the cells with counts, in order
    assert np.isfinite(out.layers[LAYER].data).all()
    res = differential_expression(
        model, query, "cell_type", "t0", batch_key="batch", config=DEConfig(n_samples=50),
        quiet=True,
    )  # fmt: skip
    assert res["n_cells1"].iloc[0] + res["n_cells2"].iloc[0] == a.n_obs
    assert np.isfinite(res["lfc_mean"]).all()


def test_a_missing_group_is_no_group_and_a_missing_batch_no_batch(tiny_model, tmp_path, caplog):
    """A NaN groupby value became a group called 'nan' (compared, and counted in the rest); a
    NaN batch became a batch 'nan' the model trained on. Now such cells are in no group (a
    warning counts them), and a NaN batch is refused with the count of cells."""
    model, a = tiny_model
    q = a.copy()
    q.obs["cell_type"] = q.obs["cell_type"].astype(object)
    q.obs.iloc[:20, q.obs.columns.get_loc("cell_type")] = np.nan
    labelled = q.obs["cell_type"].notna()
    res = differential_expression(
        model, q, "cell_type", "t0", batch_key="batch", config=DEConfig(n_samples=50), quiet=True
    )
    assert res["n_cells2"].iloc[0] == (labelled & (q.obs["cell_type"] != "t0")).sum()
    assert res["n_cells1"].iloc[0] + res["n_cells2"].iloc[0] == labelled.sum()
    assert "20 cells have no obs['cell_type'] (NaN)" in caplog.text
    twice = differential_expression(
        model,
        q,
        "cell_type",
        ["t0", "t0"],
        batch_key="batch",
        config=DEConfig(n_samples=50),
        quiet=True,
    )  # --group1 t0,t0: one comparison, each gene once
    assert len(twice) == len(res) and twice.index.is_unique
    with pytest.raises(ValueError, match=r"group 'nan' is not in obs\['cell_type'\]"):
        differential_expression(model, q, "cell_type", "nan", batch_key="batch", quiet=True)
    q.obs["one"] = "x"
    with pytest.raises(ValueError, match="the rest has no cells with counts; every labelled"):
        differential_expression(model, q, "one", "x", batch_key="batch", quiet=True)
    bad = a.copy()
    bad.obs["batch"] = bad.obs["batch"].astype(object)
    bad.obs.iloc[:3, bad.obs.columns.get_loc("batch")] = np.nan
    bad.write_h5ad(tmp_path / "nan_batch.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp_path / "nan_batch.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(schedule="census", max_epochs=1, batch_size=64),
    )
    with pytest.raises(ValueError, match="3 of 120 cells have no 'batch' \\(NaN\\)"):
        pretrain(cfg, tmp_path / "m", quiet=True)
    assert not (tmp_path / "m").exists()
