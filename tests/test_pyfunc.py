"""Every registered version is an MLflow model: `mlflow models serve -m models:/NAME@ALIAS` and
`mlflow.pyfunc.load_model` answer the labels `censusvi annotate` writes, for the same cells."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import requests
import scipy.sparse as sp

from censusvi.annotate.index import save_index
from censusvi.annotate.pipeline import index_reference
from censusvi.annotate.transfer import UNKNOWN
from censusvi.cli import main
from censusvi.model.io import load_model
from censusvi.outputs import label_columns
from censusvi.registry.versions import add_to_version, evaluation_metrics, promote, register_version
from conftest import simulated_adata

ROOT = Path(__file__).resolve().parents[1]
NAME = "censusvi-pyfunc"
COLUMNS = list(label_columns("cell_type"))
ZERO = 3  # a query cell without counts: annotate leaves it out, predict answers missing labels


@pytest.fixture(scope="module")
def version(sim_model, tmp_path_factory):
    """Version 1, registered without an index, its index attached afterwards (the embed job's
    path), promoted to production; and `censusvi annotate`'s labels for a query."""
    d = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    ix = index_reference(load_model(sim_model), sim_model.parent / "ref.h5ad", ["cell_type"])
    save_index(ix, d / "index")
    assert register_version(sim_model, None, NAME, uri) == "1"
    add_to_version(f"models:/{NAME}/1", evaluation_metrics(d / "index"), d / "index", uri)
    promote(NAME, "1", "production", uri=uri)
    q = simulated_adata(n_cells=60, seed=5)
    x = q.X.toarray()
    x[ZERO] = 0
    q.X = sp.csr_matrix(x)
    q.write_h5ad(d / "query.h5ad")
    assert main(annotate_argv((uri, sim_model, q, None, d))) == 0
    expected = ad.read_h5ad(d / "annotated.h5ad").obs[COLUMNS]
    assert len(expected) == q.n_obs - 1 and expected[COLUMNS[0]].nunique() == 2
    return uri, sim_model, q, expected, d


def annotate_argv(version, out: str = "annotated.h5ad") -> list[str]:
    _, model_dir, _, _, d = version
    return ["annotate", "--model", str(model_dir), "--index", str(d / "index"), "--query",
            str(d / "query.h5ad"), "--batch-key", "batch", "--out", str(d / out)]  # fmt: skip


def counts_frame(q: ad.AnnData, genes: str = "ids", batch: bool = True) -> pd.DataFrame:
    names = q.var["gene_ids"] if genes == "ids" else q.var_names  # the simulation's symbols
    df = pd.DataFrame(q.X.toarray().astype(np.int64), columns=list(names), index=q.obs_names)
    if batch:
        df["batch"] = q.obs["batch"].to_numpy()
    return df


def assert_same_labels(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """``got`` has a row per query cell; the cell without counts has no label."""
    assert list(got.columns) == COLUMNS and len(got) == len(expected) + 1
    assert got.iloc[ZERO].isna().all()
    got = got.drop(got.index[ZERO])
    assert got[COLUMNS[0]].tolist() == expected[COLUMNS[0]].astype(str).tolist()
    for column in COLUMNS[1:]:
        np.testing.assert_allclose(got[column].to_numpy(float), expected[column], atol=1e-6)


def test_pyfunc_predict_equals_annotate_and_refuses_bad_input(version, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    uri, model_dir, q, expected = version[:4]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    signature = model.metadata.signature
    assert signature.inputs is None and signature.outputs.input_names() == COLUMNS
    assert model.metadata.flavors["python_function"]["loader_module"] == "censusvi.registry.pyfunc"
    for genes in ("ids", "symbols"):
        frame = counts_frame(q, genes)
        got = model.predict(frame)
        assert list(got.index) == list(frame.index)
        assert_same_labels(got, expected)
    options = {"k": 3, "unknown_threshold": 0.4}  # annotate's options, as MLflow params
    assert main([*annotate_argv(version, "k3.h5ad"), "--k", "3", "--unknown-threshold", "0.4"]) == 0
    few = ad.read_h5ad(version[4] / "k3.h5ad").obs[COLUMNS]
    assert (few[COLUMNS[0]] == UNKNOWN).any()
    assert_same_labels(model.predict(counts_frame(q), params=options), few)
    assert len(model.predict(counts_frame(q, batch=False))) == q.n_obs  # one new batch, mapped

    bad = counts_frame(q)
    bad.iloc[1, 5] = -2
    with pytest.raises(MlflowException, match="negative values"):
        model.predict(bad)
    unknown = counts_frame(q).rename(columns=lambda c: c if c == "batch" else f"X{c}")
    with pytest.raises(MlflowException, match="only 0 of the model's 200 genes"):
        model.predict(unknown)
    # The rules of every server: a missing batch is not a batch called "nan", k is capped as
    # the Serve app caps it (each neighbour is a row of the search), a column is sent once.
    no_batch = counts_frame(q)
    no_batch.loc[no_batch.index[:3], "batch"] = np.nan
    with pytest.raises(MlflowException, match=r"3 of \d+ query cells have no 'batch' \(NaN\)"):
        model.predict(no_batch)
    with pytest.raises(MlflowException, match="this server answers at most 1000 neighbours"):
        model.predict(counts_frame(q), params={"k": 10**9})
    twice = counts_frame(q)
    twice = pd.concat([twice, twice.iloc[:, :2]], axis=1)
    with pytest.raises(MlflowException, match=r"appear more than once; send each gene"):
        model.predict(twice)

    # A version registered without an index is an MLflow model that says what it lacks.
    assert register_version(model_dir, None, NAME, uri) == "2"
    bare = mlflow.pyfunc.load_model(f"models:/{NAME}/2")
    assert bare.metadata.signature.outputs is None
    with pytest.raises(MlflowException, match="has no index, so it cannot annotate"):
        bare.predict(counts_frame(q))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the server's process group (the mlflow CLI and its uvicorn worker), then wait
    until no process of the group is left (SIGKILL after ``timeout``)."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def invoke(url: str, frame: pd.DataFrame, params: dict | None = None) -> requests.Response:
    body = {"dataframe_split": frame.to_dict(orient="split")} | (
        {"params": params} if params else {}
    )
    return requests.post(f"{url}/invocations", json=body, timeout=120)


def test_mlflow_models_serve_answers_annotate_labels(version, tmp_path):
    uri, _, q, expected = version[:4]
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(ROOT / "platform"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # uvicorn
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@production",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        for genes in ("ids", "symbols"):
            r = invoke(url, counts_frame(q, genes).reset_index(drop=True))
            assert r.status_code == 200, r.text[:500]
            assert_same_labels(pd.DataFrame(r.json()["predictions"]), expected)
        bad = counts_frame(q).reset_index(drop=True)
        bad.iloc[0, 0] = -1
        r = invoke(url, bad)
        assert r.status_code == 400 and r.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "negative values" in r.json()["message"]
        r = invoke(url, counts_frame(q).reset_index(drop=True), {"k": 5000})
        assert r.status_code == 400, r.text[:500]
        assert "at most 1000 neighbours per cell" in r.json()["message"]
    finally:
        stop_group(proc)
        log.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/ping", timeout=5)
