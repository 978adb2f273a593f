"""The Ray pretraining job's run side: live MLflow tracking from rank 0, and registration as a
step of its own that an unreachable store cannot make lose the trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import simulated_adata

pytest.importorskip("ray")
pytest.importorskip("mlflow")


def job_config(tmp_path: Path, uri: str) -> Path:
    simulated_adata(n_cells=150).write_h5ad(tmp_path / "x.h5ad")
    doc = {
        "data": {"source": str(tmp_path / "x.h5ad"), "batch_keys": "batch", "n_hvg": 0},
        "model": {"n_hidden": 16, "n_latent": 4},
        "train": {"schedule": "census", "max_epochs": 3, "lr": 0.01, "batch_size": 64},
        "stream": {"mode": "memory"},
        "out": str(tmp_path / "m"),
        "storage": f"file://{tmp_path}/shared",
        "mlflow": {"tracking_uri": uri, "model_name": "censusvi-job"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "job.yaml"


def test_registration_is_a_step_an_unreachable_store_cannot_lose_the_model_and_a_retry_repeats(
    local_ray, tmp_path, capsys
):
    """A store down at registration: exit 3, one line, the model kept. The same job again once
    the store is back resumes from storage (nothing retrained), logs the epochs the tracker
    missed and registers; once more, it returns the same run and version, registering nothing."""
    from mlflow import MlflowClient

    from censusvi.jobs.pretrain import main
    from censusvi.model.io import load_model

    store = tmp_path / "store"
    store.write_text("not a folder")  # the store cannot be opened: MLflow is unreachable
    uri = f"sqlite:///{store / 'mlflow.db'}"
    config = str(job_config(tmp_path, uri))
    assert main(["--config", config]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert f"training finished and the model is saved in {tmp_path / 'm'}" in err
    assert f"(checkpoints in file://{tmp_path}/shared)" in err
    assert f"cannot reach the MLflow store at {uri}" in err and "Resubmit the same job" in err
    trained = load_model(tmp_path / "m")  # the model survived the failed registration
    assert trained.provenance["epochs"] == 3 and "mlflow_run_id" not in trained.provenance

    store.unlink()  # the store is back: the same job again
    assert main(["--config", config]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["epochs"] == 3 and result["model_version"] == "1"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["resubmissions"] == "1"  # resumed from storage: nothing retrained
    assert run.data.tags["restarts_from_checkpoint"] == "0"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_elbo")]
    assert sorted(steps) == [0, 1, 2]  # the epochs the tracker missed, logged at registration
    assert client.get_model_version("censusvi-job", "1").run_id == run.info.run_id
    assert load_model(tmp_path / "m").provenance["mlflow_run_id"] == run.info.run_id

    assert main(["--config", config]) == 0  # a retry of a registered run
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["mlflow_run_id"], again["model_version"]) == (run.info.run_id, "1")
    assert len(client.search_model_versions("name='censusvi-job'")) == 1
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_elbo")]
    assert sorted(steps) == [0, 1, 2]  # no epoch logged twice

    from censusvi.registry.versions import register_version  # the manual retry path

    manual = client.get_model_version(
        "censusvi-job", register_version(tmp_path / "m", None, "censusvi-job", uri)
    )
    assert client.get_run(manual.run_id).data.tags["training_run_id"] == run.info.run_id


def test_data_ingest_reads_the_counts_where_data_layer_says(tmp_path):
    """A job whose .h5ad files keep log-normalised X and counts in a layer: data.ingest built
    the experiment from X (refused, "pass --layer counts", a flag the job lacks); it now reads
    data.layer, and the training reads the experiment's X layer, where ingest put them."""
    import numpy as np
    import tiledbsoma

    from censusvi.jobs.pretrain import ingest_if_missing, job_from

    a = simulated_adata(n_cells=40)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray() / 7.0)
    (tmp_path / "raw").mkdir()
    a.write_h5ad(tmp_path / "raw" / "d.h5ad")
    doc = {"data": {"source": str(tmp_path / "x.soma"), "ingest": [str(tmp_path / "raw/*.h5ad")],
                    "layer": "counts", "batch_keys": ["batch"]}, "out": str(tmp_path / "m")}  # fmt: skip
    job = job_from(doc)
    assert (job.ingest_layer, job.cfg.data.layer) == ("counts", None)  # training reads X raw
    ingest_if_missing(job)
    with tiledbsoma.Experiment.open(str(tmp_path / "x.soma")) as exp:
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
    assert float(np.sum(x["soma_data"])) == float(a.layers["counts"].sum())
