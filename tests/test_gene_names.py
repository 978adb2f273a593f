"""Genes named by symbol: an scvi-tools model trained on symbol var_names (ids in
var['gene_ids'], the usual lab AnnData) imports, embeds its own training data as scvi-tools does,
and names genes in DE and impute tables by symbol with the id beside it."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from censusvi.cli import main
from censusvi.data.h5ad import H5adSource
from censusvi.generative.de import DEConfig, differential_expression
from censusvi.generative.impute import LAYER, impute
from censusvi.inference import latent_representation
from censusvi.mapping.query import map_query
from censusvi.model.io import load_model
from censusvi.wire import decode_arrow, encode_arrow_request

scvi = pytest.importorskip("scvi")
CD79A = "ENSG00000105369"  # its Ensembl id in the shared file's var['gene_ids']


@pytest.fixture(scope="module")
def symbol_scvi(shared_data, tmp_path_factory):
    """scvi-tools' SCVI on the PBMC panel exactly as shipped: symbols in var_names."""
    d = tmp_path_factory.mktemp("symbol_scvi")
    a = ad.read_h5ad(shared_data / "pbmc_3chem_symphony_small.h5ad")
    assert not a.var_names[0].startswith("ENSG") and a.var["gene_ids"].iloc[0].startswith("ENSG")
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a, n_hidden=32, n_latent=8, n_layers=1, gene_likelihood="nb")
    model.train(max_epochs=5, batch_size=256, accelerator="cpu", enable_progress_bar=False)
    model.save(d / "scvi_model")
    assert main(["import-scvi-tools", str(d / "scvi_model"), "--out", str(d / "m")]) == 0
    return d, shared_data / "pbmc_3chem_symphony_small.h5ad", model, model.get_latent_representation(a)  # fmt: skip


def test_symbol_model_embeds_its_training_data_as_scvi_tools(symbol_scvi, capsys):
    d, data, _, theirs = symbol_scvi
    model = load_model(d / "m")
    assert model.genes.ids[:3] == ("LYZ", "FTL", "HLA-DRA")  # its vocabulary is symbols
    assert main(["embed", "--model", str(d / "m"), "--data", str(data), "--out", str(d / "e.h5ad"), "--quiet"]) == 0  # fmt: skip
    out = ad.read_h5ad(d / "e.h5ad")
    assert np.abs(out.obsm["X_scvi"] - theirs).max() < 1e-5
    assert out.uns["censusvi"]["genes"]["matched_by"] == "model symbols ~ var_names"
    pos, z, report = latent_representation(model, H5adSource(data))
    assert (
        report["overlap"] == 1.0 and report["keys_tried"]["model symbols ~ var['gene_ids']"] < 1767
    )
    assert np.abs(z[np.argsort(pos)] - theirs).max() < 1e-5


def test_symbol_model_embeds_census_style_data(symbol_scvi, tmp_path):
    """The same cells with Ensembl ids as var_names and symbols in feature_name (the Census's
    layout): matched by feature_name, same latent."""
    d, data, _, theirs = symbol_scvi
    a = ad.read_h5ad(data)
    ids = a.var["gene_ids"].astype(object)
    census = ad.AnnData(
        a.X,
        obs=a.obs,
        var=pd.DataFrame(
            {"feature_name": a.var_names.to_numpy()},
            index=pd.Index(np.where(ids.isna(), a.var_names, ids).astype(str)),
        ),
    )
    census.write_h5ad(tmp_path / "census.h5ad")
    pos, z, report = latent_representation(load_model(d / "m"), H5adSource(tmp_path / "census.h5ad"))  # fmt: skip
    assert (
        report["matched_by"] == "model symbols ~ var['feature_name']" and report["overlap"] == 1.0
    )
    assert np.abs(z[np.argsort(pos)] - theirs).max() < 1e-5
    # through the wire as the client sends it (ids, symbols beside them): the server's path
    cells = decode_arrow(encode_arrow_request(census.X, list(census.var_names), census.obs["batch"].astype(str), list(a.var_names)))  # fmt: skip
    mq = map_query(load_model(d / "m"), cells.to_anndata(), "batch")
    assert mq.report["genes"]["matched_by"] == "model symbols ~ var['feature_name']"
    assert np.abs(mq.latent - theirs[mq.positions]).max() < 1e-5


def test_too_low_overlap_names_the_keys_tried(symbol_scvi, tmp_path, capsys):
    d, data, _, _ = symbol_scvi
    a = ad.read_h5ad(data)[:, :100].copy()  # 100 of the model's 1,767 genes
    a.write_h5ad(tmp_path / "few.h5ad")
    argv = ["embed", "--model", str(d / "m"), "--data", str(tmp_path / "few.h5ad"), "--out", str(tmp_path / "o.h5ad")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "only 100 of the model's 1767 genes (5.7%)" in err
    # genes without an Ensembl id keep their symbol in the id key: a few match there too
    assert re.search(
        r"Keys tried \(genes matched\): model symbols ~ var\['gene_ids'\]: \d, model symbols ~ var_names: 100\.",
        err,
    ), err
    assert "The model expects gene symbols like ['LYZ', 'FTL', 'HLA-DRA']" in err


def test_symbol_model_de_and_impute_tables_by_symbol(symbol_scvi, tmp_path, capsys):
    d, data, _, _ = symbol_scvi
    model, a = load_model(d / "m"), ad.read_h5ad(data)
    res = differential_expression(
        model, a, "cell_type", "B", batch_key="batch", config=DEConfig(n_samples=200), quiet=True
    )
    assert res.index.name == "gene" and list(res.columns[:1]) == ["gene_id"]
    assert res.loc["CD79A", "gene_id"] == CD79A  # the id from the data, beside the symbol
    assert set(res.index) == set(a.var_names)
    # impute: genes by the data's Ensembl id and by symbol, through the CLI
    shown = a[:, a.var_names != "MS4A1"].copy()
    shown.write_h5ad(tmp_path / "shown.h5ad")
    argv = ["impute", "--model", str(d / "m"), "--query", str(tmp_path / "shown.h5ad"), "--batch-key", "batch",
            "--genes", f"{CD79A},MS4A1", "--out", str(tmp_path / "i.h5ad"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    out = ad.read_h5ad(tmp_path / "i.h5ad")
    info = out.uns["censusvi_imputation"]
    assert list(info["genes"]) == ["CD79A", "MS4A1"] and list(info["unmeasured_genes"]) == ["MS4A1"]
    assert out.var_names[-1] == "MS4A1" and not out.var["censusvi_measured"].iloc[-1]
    assert out.layers[LAYER][:, [list(out.var_names).index("CD79A"), -1]].nnz == 2 * out.n_obs
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        impute(model, a, ["ENSG00000000000"], "batch", quiet=True)


def test_censusvi_model_keeps_ids_and_symbols_and_reads_either(tmp_path):
    """Trained on Census-style data (ids in var_names, symbols in feature_name), a model stores
    both and embeds a symbols-only copy of its data identically; a model directory written
    before symbols were stored (ids only) still loads and aligns by id."""
    import json

    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
    from conftest import simulated_adata

    a = simulated_adata(n_cells=120)
    census = a.copy()
    census.var = pd.DataFrame({"feature_name": a.var_names}, index=a.var["gene_ids"].to_numpy())
    census.write_h5ad(tmp_path / "census.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp_path / "census.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(max_epochs=1, batch_size=64),
    )
    pretrain(cfg, tmp_path / "m", quiet=True)
    genes = json.loads((tmp_path / "m" / "config.json").read_text())["genes"]
    assert genes["ids"][:2] == ["ENSG00000000000", "ENSG00000000001"]
    assert genes["symbols"][:2] == ["G0", "G1"]
    symbols_only = ad.AnnData(a.X, obs=a.obs, var=pd.DataFrame(index=a.var_names))
    symbols_only.write_h5ad(tmp_path / "symbols.h5ad")
    model = load_model(tmp_path / "m")
    _, z_ids, r_ids = latent_representation(model, H5adSource(tmp_path / "census.h5ad"))
    _, z_sym, r_sym = latent_representation(model, H5adSource(tmp_path / "symbols.h5ad"))
    assert r_ids["matched_by"] == "model ids ~ var_names" and r_ids["overlap"] == 1.0
    assert r_sym["matched_by"] == "model symbols ~ var_names" and r_sym["overlap"] == 1.0
    np.testing.assert_array_equal(z_ids, z_sym)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    del conf["genes"]["symbols"]  # as older directories were written
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    old = load_model(tmp_path / "m")
    assert old.genes.symbols == old.genes.ids
    _, z_old, r_old = latent_representation(old, H5adSource(tmp_path / "census.h5ad"))
    assert r_old["matched_by"] == "model ids ~ var_names"
    np.testing.assert_array_equal(z_old, z_ids)


def test_wire_symbols_are_optional_and_checked():
    import json

    from censusvi.wire import PayloadError, decode_json

    body = {
        "genes": ["ENSG1", "ENSG2"],
        "indptr": [0, 1],
        "indices": [1],
        "data": [3],
        "batch": "b",
    }
    assert decode_json(json.dumps(body).encode()).symbols is None
    cells = decode_json(json.dumps({**body, "symbols": ["A", ""]}).encode())
    assert cells.to_anndata().var["feature_name"].tolist() == ["A", ""]
    with pytest.raises(PayloadError, match="symbols must be a list of 2 strings, one per gene"):
        decode_json(json.dumps({**body, "symbols": ["A"]}).encode())
