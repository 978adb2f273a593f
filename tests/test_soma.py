"""`censusvi ingest` builds a Census-schema SOMA experiment that reads back the same counts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from censusvi.data.ingest import ingest
from censusvi.data.soma import CENSUS_FILTER, SomaSource

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
    with pytest.raises(ValueError, match="obs filter 'no_such_column == 1' failed") as e:
        SomaSource(str(soma_exp[0]), obs_filter="no_such_column == 1")
    assert "\n" not in str(e.value) and " At:" not in str(e.value)  # not tiledbsoma's stack
    long = " and ".join(["nnz > 1"] * 2000)  # tiledbsoma's parser took 100 s on 20,000 terms
    with pytest.raises(ValueError, match="23,995 characters, over 10,000"):
        SomaSource(str(soma_exp[0]), obs_filter=long)


def test_census_uri_opens_through_cellxgene_census(soma_exp, monkeypatch):
    """census://VERSION goes to cellxgene_census.open_soma (offline here: a local experiment stands in)."""
    import cellxgene_census
    import tiledbsoma

    asked = {}

    def fake_open_soma(census_version, context):
        asked["version"] = census_version
        asked["signal_handlers"] = context.tiledb_config["sm.enable_signal_handlers"]
        exp = tiledbsoma.Experiment.open(str(soma_exp[0]), context=context)
        return {"census_data": {"homo_sapiens": exp}}

    monkeypatch.setattr(cellxgene_census, "open_soma", fake_open_soma)
    src = SomaSource("census://2025-11-08", obs_filter=CENSUS_FILTER)
    assert asked == {"version": "2025-11-08", "signal_handlers": "false"} and len(src.obs) > 0
    assert src.read_rows(np.arange(3)).shape == (3, len(src.var_ids))


@pytest.mark.parametrize("last_joinid", [38, 2**40])
def test_cells_split_over_fragments_and_sparse_var_joinids(tmp_path, last_joinid):
    """Column tiles narrower than the genes (TileDB then returns a cell's entries in several
    runs), a cell's counts in two writes (two fragments) and var joinids that are not 0..n-1:
    the cells still read back as written, empty ones included. A var joinid of 2^40 made the
    lookup table 4 TiB (a hostile probe): such joinids are looked up, not tabled."""
    import pyarrow as pa
    import scipy.sparse as sp
    import tiledbsoma

    from censusvi.data.soma import SomaX

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.5, (30, 12)).astype(np.float32)
    dense[[3, 17]] = 0  # empty cells
    var_joinids = np.r_[np.arange(11) * 3 + 5, last_joinid]  # gaps: a lookup is needed
    exp = tiledbsoma.Experiment.create(str(tmp_path / "e.soma"))
    exp.add_new_dataframe("obs", schema=pa.schema([("soma_joinid", pa.int64())]), domain=[(0, 29)])
    rna = exp.add_new_collection("ms").add_new_collection("RNA", tiledbsoma.Measurement)
    var_schema = pa.schema([("soma_joinid", pa.int64()), ("feature_id", pa.large_string())])
    var = rna.add_new_dataframe("var", schema=var_schema, domain=[(0, last_joinid)])
    var.write(pa.table({"soma_joinid": var_joinids, "feature_id": [f"g{i}" for i in range(12)]}))
    X = rna.add_new_collection("X").add_new_sparse_ndarray(
        "raw",
        type=pa.float32(),
        shape=(30, last_joinid + 1),
        platform_config=tiledbsoma.TileDBCreateOptions(
            dims={"soma_dim_0": {"tile": 8}, "soma_dim_1": {"tile": 16}}
        ),
    )
    coo = sp.coo_matrix(dense)
    first = coo.col < 6  # each cell's first genes in one write, the rest in another
    for part in (first, ~first):
        X.write(
            pa.table(
                {
                    "soma_dim_0": coo.row[part].astype(np.int64),
                    "soma_dim_1": var_joinids[coo.col[part]],
                    "soma_data": coo.data[part],
                }
            )
        )
    exp.close()
    jid = np.array([0, 3, 4, 17, 18, 29])
    x = SomaX(str(tmp_path / "e.soma")).read(jid)
    np.testing.assert_array_equal(x.toarray(), dense[jid])


def test_training_reads_only_the_obs_columns_it_needs(soma_exp):
    """A run's plan holds the batch/HVG keys, not every obs column (Census obs is tens of columns
    for 74 M cells); a key that obs lacks is named with the columns it has."""
    from censusvi.train.pretrain import DataConfig, PretrainConfig, plan_from

    out = str(soma_exp[0])
    plan = plan_from(PretrainConfig(DataConfig(source=out, batch_keys=("dataset_id",), n_hvg=0)))
    assert set(plan.source.obs.columns) == {"soma_joinid", "dataset_id", "assay", "suspension_type"}
    with pytest.raises(ValueError, match=r"\['donor'\] not in obs; obs has .*'donor_id'"):
        plan_from(PretrainConfig(DataConfig(source=out, batch_keys=("donor",), n_hvg=0)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ingest_stopped_midway_leaves_nothing_behind(shared_data, tmp_path, sig):
    """Ctrl-C during the writes ended `ingest` in a segmentation fault (TileDB had put its own
    SIGINT handler in place of Python's), leaving the half-built experiment on disk. Now SIGINT,
    like SIGTERM, is one line, exit 130, and the temporary experiment is removed."""
    src = shared_data / "cellbench_lung_celllines.h5ad"
    files = []
    for i in range(4):  # four datasets of one file: long enough to be stopped while writing
        (tmp_path / f"lines{i}.h5ad").symlink_to(src)
        files.append(str(tmp_path / f"lines{i}.h5ad"))
    cmd = [sys.executable, "-m", "censusvi.cli", "ingest", *files, "--out", str(tmp_path / "x.soma"),
           "--quiet"]  # fmt: skip
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".x.soma.tmp-*/exp/ms")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the experiment's schema is being written
        assert p.poll() is None, "ingest ended before it could be stopped"
        p.send_signal(sig)
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "censusvi: interrupted", err
    assert not (tmp_path / "x.soma").exists() and not list(tmp_path.glob(".x.soma*"))


def test_a_named_x_layer_is_read_in_process_as_on_a_ray_worker(tmp_path):
    """``data.layer`` on a SOMA source names an X layer: the driver's in-process source read
    the default layer whatever it said, while a Ray worker's reader read the named one (two
    runs of one config trained on different counts). Both now read it; a layer the experiment
    lacks is one line naming the layers it has."""
    import pyarrow as pa
    import tiledbsoma

    from censusvi.data.shards import open_reader
    from censusvi.data.soma import open_source
    from censusvi.train.pretrain import DataConfig, PretrainConfig, plan_from
    from conftest import simulated_adata

    a = simulated_adata(n_cells=40, n_genes=30)
    a.write_h5ad(tmp_path / "a.h5ad")
    uri = str(ingest([tmp_path / "a.h5ad"], tmp_path / "e.soma"))
    with tiledbsoma.Experiment.open(uri) as exp:
        raw = exp.ms["RNA"].X["raw"]
        table, shape = raw.read().tables().concat(), raw.shape
    with tiledbsoma.Experiment.open(uri, "w") as exp:
        doubled = exp.ms["RNA"].X.add_new_sparse_ndarray("doubled", type=pa.float32(), shape=shape)
        doubled.write(table.set_column(2, "soma_data", pa.compute.multiply(table["soma_data"], 2)))
    rows = np.arange(0, 40, 7)
    x = open_source(uri).read_rows(rows).toarray()
    assert x.sum() > 0
    plan = plan_from(PretrainConfig(DataConfig(source=uri, layer="doubled", n_hvg=0)))
    np.testing.assert_array_equal(plan.source.read_rows(rows).toarray(), 2 * x)
    worker = open_reader(uri, None, "doubled", True)
    np.testing.assert_array_equal(worker.read(plan.source.joinids(rows)).toarray(), 2 * x)
    with pytest.raises(
        ValueError, match=r"X layer 'counts' not in the experiment; it has \['doubled', 'raw'\]"
    ):
        open_source(uri, layer="counts")


def test_is_primary_data_written_as_text_is_read_as_the_words_say(tmp_path):
    """A cast made every non-empty string True ("False" too), so the Census filter
    `is_primary_data == True` kept duplicate cells."""
    from conftest import simulated_adata

    a = simulated_adata(n_cells=40, n_genes=20)
    a.obs["is_primary_data"] = ["False"] * 10 + ["True"] * 30
    a.write_h5ad(tmp_path / "a.h5ad")
    ingest([tmp_path / "a.h5ad"], tmp_path / "a.soma")
    src = SomaSource(str(tmp_path / "a.soma"), obs_filter=CENSUS_FILTER.split(" and ")[0])
    assert len(src.obs) == 30
    a.obs["is_primary_data"] = ["maybe"] * 40
    a.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ValueError, match=r"obs\['is_primary_data'\] holds \['maybe'\], not True"):
        ingest([tmp_path / "b.h5ad"], tmp_path / "b.soma")
    assert not (tmp_path / "b.soma").exists()
    a.obs["is_primary_data"] = pd.array([True] * 37 + [None] * 3, dtype="boolean")
    a.write_h5ad(tmp_path / "c.h5ad")  # pandas' nullable booleans: "cannot convert to 'bool'"
    with pytest.raises(ValueError, match=r"c.h5ad: obs\['is_primary_data'\] is missing for 3 c"):
        ingest([tmp_path / "c.h5ad"], tmp_path / "c.soma")


def test_gene_names_of_a_var_without_ids_or_with_nulls():
    """A var without feature_id was a bare KeyError ("feature_id"); a null id became the text
    "None" (then "gene ids must be unique ... e.g. None")."""
    from censusvi.data.soma import gene_names

    var = pd.DataFrame({"soma_joinid": [0, 1, 2], "feature_id": ["E1", None, None]})
    assert gene_names(var, "x.soma") == (["E1", "", ""], ["", "", ""])
    ids, symbols = gene_names(var.drop(columns="feature_id").assign(feature_name=list("ABC")), "x")
    assert ids == ["", "", ""] and symbols == ["A", "B", "C"]
    with pytest.raises(
        ValueError, match=r"var has neither 'feature_id' nor 'feature_name' \(it has \['gene'\]\)"
    ):
        gene_names(pd.DataFrame({"soma_joinid": [0], "gene": ["A"]}), "x.soma")
