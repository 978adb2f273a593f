"""Hostile data on the command line (issue #22): damaged sparse matrices, strata without
variation, empty queries, repeated gene ids, broken models, absurd counts. Each gets one
``censusvi: error:`` line and exit 2, never a traceback or a crash, and leaves nothing behind."""

from __future__ import annotations

import functools
import json
import shutil

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import censusvi.data.h5ad as h5ad
from censusvi.cli import main
from censusvi.data.vocabulary import check_unique_gene_ids
from conftest import simulated_adata
from test_bad_input import assert_nothing_written, embed_args, pretrain_args, run_cli, write


def damage(path, kind: str) -> None:
    """Overwrite X's index arrays of a valid .h5ad in place, as a bad writer or a bit flip would."""
    with h5py.File(path, "r+") as f:
        if kind == "indptr":
            p = f["X/indptr"][...]
            p[10], p[11] = p[11], p[10]  # cell 10's entries end before they start
            f["X/indptr"][...] = p
            return
        idx = f["X/indices"][...].astype(np.int64)
        idx[5] = {"index 1e9": 10**9, "index -1": -1}[kind]
        del f["X/indices"]
        f["X/indices"] = idx


DAMAGE = {
    "index 1e9": "column index out of range (0..1000000000) for 200 genes",
    "index -1": "column index out of range (-1..199) for 200 genes",
    "indptr": "indptr decreases",
}


@pytest.mark.parametrize("backed", [False, True], ids=["in-memory", "backed"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_pretrain_damaged_sparse_matrix(kind, backed, tmp_path, capsys, monkeypatch):
    src = write(simulated_adata(), tmp_path / "x.h5ad")
    damage(src, kind)
    if backed:  # every file is "large": rows are read from disk block by block
        monkeypatch.setattr(h5ad, "BACKED_ABOVE_BYTES", -1)
    code, err = run_cli(pretrain_args(src, tmp_path / "m"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"censusvi: error: {src} (" in err and DAMAGE[kind] in err
    assert_nothing_written(tmp_path, "m")


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_query_damaged_sparse_matrix(kind, sim_model, tmp_path, capsys):
    src = write(simulated_adata(seed=1), tmp_path / "q.h5ad")
    damage(src, kind)
    q = ["--model", str(sim_model), "--query", src, "--batch-key", "batch", "--quiet"]
    for args in (
        embed_args(sim_model, src, tmp_path / "o.h5ad"),
        ["map", *q, "--out", str(tmp_path / "o.h5ad"), "--max-epochs", "1"],
    ):
        code, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"{src} (X): " in err and DAMAGE[kind] in err
        assert_nothing_written(tmp_path, "o.h5ad")


def test_damaged_layer_is_refused_even_when_unused(tmp_path, capsys):
    """Subsetting cells touches every layer, so a damaged one is refused at read."""
    a = simulated_adata()
    a.layers["spliced"] = a.X.copy()
    src = write(a, tmp_path / "x.h5ad")
    with h5py.File(src, "r+") as f:
        f["layers/spliced/indices"][3] = 1000
    code, err = run_cli(pretrain_args(src, tmp_path / "m"), capsys)
    assert code == 2 and "(layers['spliced']): column index out of range" in err


def hvg_args(src: str, out) -> list[str]:
    args = pretrain_args(src, out)
    args[args.index("--n-hvg") + 1] = "50"
    return [*args, "--hvg-keys", "assay"]


def test_hvg_stratum_without_counts_is_skipped(tmp_path, capsys, caplog):
    """skmisc's loess crashed the process on a stratum where no gene varies."""
    a = simulated_adata()
    a.obs["assay"] = np.where(np.arange(a.n_obs) < 100, "10x 3' v2", "10x 3' v3")
    x = a.X.toarray()
    x[:100] = 0
    a.X = sp.csr_matrix(x)
    assert run_cli(hvg_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)[0] == 0
    skipped = [r.getMessage() for r in caplog.records if "it is skipped" in r.getMessage()]
    assert skipped == [
        'HVG: stratum "10x 3\' v2" (100 cells): only 0 genes vary in it (the loess fit needs '
        "10); it is skipped"
    ]


def test_hvg_no_usable_stratum(tmp_path, capsys):
    a = simulated_adata()
    a.obs["assay"] = np.where(np.arange(a.n_obs) < 100, "A", "B")
    a.X = sp.csr_matrix(np.ones(a.shape, dtype=np.float32))  # no gene varies anywhere
    code, err = run_cli(hvg_args(write(a, tmp_path / "x.h5ad"), tmp_path / "m"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        "HVG selection failed in every stratum of ['assay']: 'A' (100 cells): only 0 genes" in err
    )
    assert "use fewer --hvg-keys, or keep every gene with --n-hvg 0" in err
    assert_nothing_written(tmp_path, "m")


def test_hvg_all_cells_zero(tmp_path, capsys):
    a = simulated_adata()
    a.obs["assay"] = "A"
    a.X = sp.csr_matrix(a.shape, dtype=np.float32)
    src = write(a, tmp_path / "x.h5ad")
    code, err = run_cli(hvg_args(src, tmp_path / "m"), capsys)
    assert code == 2 and f"{src}: every cell has zero counts" in err
    assert_nothing_written(tmp_path, "m")


@pytest.fixture(scope="module")
def sim_index(sim_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("simindex")
    src = write(simulated_adata(), d / "ref.h5ad")
    args = ["index", "--model", str(sim_model), "--data", src, "--label-keys", "cell_type"]
    assert main([*args, "--out", str(d / "ix"), "--quiet"]) == 0
    return d / "ix"


def query_commands(model, index, src: str, out) -> dict[str, list[str]]:
    """embed, map and annotate of one query file, each writing ``out``."""
    q = ["--model", str(model), "--query", src, "--batch-key", "batch", "--quiet"]
    q += ["--out", str(out), "--max-epochs", "1"]
    return {
        "embed": embed_args(model, src, out),
        "map": ["map", *q],
        "annotate": ["annotate", *q, "--index", str(index)],
    }


@pytest.mark.parametrize(
    "cells, message",
    [
        ("none", {"embed": "q.h5ad: 0 cells; there is nothing to embed"}),
        (
            "all zero",
            {
                "embed": "q.h5ad: all 300 cells have zero counts over the model's genes; none is "
                "left to embed"
            },
        ),
        (
            "all zero, counts in a layer",
            {
                "embed": "none is left to embed; the matrix read is empty, but layers['counts'] "
                "holds values: pass --layer counts"
            },
        ),
    ],
)
def test_query_without_counts(cells, message, sim_model, sim_index, tmp_path, capsys):
    a = simulated_adata(seed=1)
    if cells == "none":
        a = a[:0].copy()
        expected = {**message, "map": "the query has 0 cells; there is nothing to map"}
    else:
        if cells == "all zero, counts in a layer":
            a.layers["counts"] = a.X.copy()
        a.X = a.X.copy()
        a.X.data[:] = 0  # stored zeros are no counts either
        expected = {
            **message,
            "map": "all 300 query cells have zero counts over the model's genes (200 matched); "
            "none is left to map" + message["embed"].partition("to embed")[2],
        }
    expected["annotate"] = expected["map"]
    src = write(a, tmp_path / "q.h5ad")
    for name, args in query_commands(sim_model, sim_index, src, tmp_path / "o.h5ad").items():
        code, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1, name
        assert expected[name] in err, (name, err)
        assert_nothing_written(tmp_path, "o.h5ad")


def test_embed_drops_zero_cells_with_a_count(sim_model, tmp_path, capsys, caplog):
    """Cells without counts are left out and counted, even when whole minibatches are empty."""
    a = simulated_adata(seed=1)
    x = a.X.toarray()
    x[:25] = 0
    a.X = sp.csr_matrix(x)
    src = write(a, tmp_path / "q.h5ad")
    args = [*embed_args(sim_model, src, tmp_path / "o.h5ad"), "--batch-size", "10"]
    assert run_cli(args, capsys)[0] == 0
    assert f"{src}: 25 of 300 cells had no counts over the model's genes and are left out" in [
        r.getMessage() for r in caplog.records
    ]
    out = ad.read_h5ad(tmp_path / "o.h5ad")
    assert out.obsm["X_scvi"].shape == (275, 50) and list(out.obs_names[:1]) == ["c25"]


def test_query_repeated_gene_ids(sim_model, sim_index, tmp_path, capsys):
    """Matching by id cannot choose between two columns of one gene: refused, not last-wins."""
    a = simulated_adata(seed=1)
    ids = list(a.var["gene_ids"])
    ids[7] = ids[9] = ids[3]
    ids[11] = ids[4]
    a.var["gene_ids"] = ids
    a.var_names = [f"other{i}" for i in range(a.n_vars)]  # no symbol match: ids are the best key
    src = write(a, tmp_path / "q.h5ad")
    for name, args in query_commands(sim_model, sim_index, src, tmp_path / "o.h5ad").items():
        code, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1, name
        assert (
            f"{src if name == 'embed' else 'the query'}, var['gene_ids']: gene ids must be unique, "
            "but 2 repeat, "
            "e.g. ENSG00000000003 (3 columns), ENSG00000000004 (2 columns). Sum the repeated "
            "columns into one (or drop all but one) first" in err
        ), (name, err)
        assert_nothing_written(tmp_path, "o.h5ad")


def test_missing_gene_ids_are_not_repeats():
    check_unique_gene_ids(["ENSG1", "", "", "ENSG2"], "x")  # no id: matched by symbol instead
    with pytest.raises(
        ValueError, match=r"^x: gene ids must be unique, but 1 repeat, e.g. ENSG1 \(2 columns\)\."
    ):
        check_unique_gene_ids(["ENSG1", "", "ENSG1"], "x")


def test_model_with_nan_weight(sim_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(sim_model, tmp_path / "m")
    state = load_file(model / "weights.safetensors")
    state["decoder.scale.weight"][2, 3] = float("nan")
    save_file(state, model / "weights.safetensors")
    src = write(simulated_adata(seed=1), tmp_path / "q.h5ad")
    code, err = run_cli(embed_args(model, src, tmp_path / "o.h5ad"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert (
        f"{model}/weights.safetensors: non-finite weights (NaN or inf) in 1 tensor(s): "
        "decoder.scale.weight (1 of "
        in err
        and "retrain it" in err
    )
    assert_nothing_written(tmp_path, "o.h5ad")


@pytest.mark.parametrize(
    "drop, message",
    [
        ("genes", "the key 'genes' is missing"),
        ("batch_categories", "the key 'batch_categories' is missing"),
        ("model.n_genes", "'model' does not describe a model: "),
    ],
)
def test_model_config_without_a_key(drop, message, sim_model, tmp_path, capsys):
    model = shutil.copytree(sim_model, tmp_path / "m")
    d = json.loads((model / "config.json").read_text())
    *parents, key = drop.split(".")
    del functools.reduce(dict.__getitem__, parents, d)[key]
    (model / "config.json").write_text(json.dumps(d))
    src = write(simulated_adata(seed=1), tmp_path / "q.h5ad")
    code, err = run_cli(embed_args(model, src, tmp_path / "o.h5ad"), capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"censusvi: error: {model}/config.json: {message}" in err and key in err
    assert_nothing_written(tmp_path, "o.h5ad")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"provenance": "x"}, "'provenance' must be a JSON object, got str"),
        ({"covariates": ["x"]}, "'covariates' must be a JSON object, got list"),
        ({"batch_keys": "batch"}, "'batch_keys' must be a JSON list, got str"),
        ({"batch_keys": [""]}, "'batch_keys' must be a list of obs column names"),
        (
            "latent_library",
            "'model' does not describe a model: model.latent_library='yes': must be true or false",
        ),
        (
            "extra_categories",
            "'model' does not describe a model: model.extra_categories=('x',): must be a list of whole numbers",
        ),
    ],
)
def test_model_config_of_the_wrong_shape(edit, message, sim_model, tmp_path, capsys):
    """An edited section of the wrong JSON type failed in whatever read it first (info: an
    AttributeError traceback)."""
    model = shutil.copytree(sim_model, tmp_path / "m")
    d = json.loads((model / "config.json").read_text())
    if isinstance(edit, str):  # a setting of the model section
        edit = {"model": {**d["model"], edit: {"latent_library": "yes"}.get(edit, ["x"])}}
    (model / "config.json").write_text(json.dumps({**d, **edit}))
    src = write(simulated_adata(seed=1), tmp_path / "q.h5ad")
    for argv in (["info", str(model)], embed_args(model, src, tmp_path / "o.h5ad")):
        code, err = run_cli(argv, capsys)
        assert (code, err) == (2, f"censusvi: error: {model}/config.json: {message}\n")


@pytest.mark.parametrize("command", ["pretrain", "pretrain with HVG", "embed", "map"])
def test_absurd_counts(command, sim_model, tmp_path, capsys):
    """A count of 1e30 is finite (even in float32) yet no UMI count: refused above 1e9."""
    a = simulated_adata(seed=1)
    a.obs["assay"] = "A"
    a.X = a.X.copy()
    a.X.data[17] = 1e30
    src = write(a, tmp_path / "x.h5ad")
    out = tmp_path / "o"
    args = {
        "pretrain": pretrain_args(src, out),
        "pretrain with HVG": hvg_args(src, out),
        "embed": embed_args(sim_model, src, out.with_suffix(".h5ad")),
        "map": ["map", "--model", str(sim_model), "--query", src, "--batch-key", "batch"]
        + ["--out", str(out.with_suffix(".h5ad")), "--quiet"],
    }[command]
    code, err = run_cli(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "(cells 0..299): a count of 1e+30 is above 1e+09; raw UMI counts are far smaller" in err
    assert_nothing_written(tmp_path, "o")
