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


def test_unreachable_store_at_registration_keeps_the_model_and_a_resubmission_registers(
    local_ray, tmp_path, capsys
):
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


def test_rank_zero_logs_epochs_live_and_a_retry_registers_once(local_ray, tmp_path, capsys):
    """Each epoch is in MLflow before the model exists (logged by rank 0 as it trains); running
    the finished job again returns the same run and version instead of registering twice."""
    from mlflow import MlflowClient

    from censusvi.jobs.pretrain import main

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    config = str(job_config(tmp_path, uri))
    assert main(["--config", config]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(first["mlflow_run_id"], "val_elbo")
    assert sorted(m.step for m in history) == [0, 1, 2]  # once each: no duplicates
    saved_ms = (tmp_path / "m" / "config.json").stat().st_mtime * 1000
    assert all(m.timestamp <= saved_ms for m in history), "epochs logged only after training"
    assert main(["--config", config]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["mlflow_run_id"], again["model_version"]) == (first["mlflow_run_id"], "1")
    assert len(client.search_model_versions("name='censusvi-job'")) == 1
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"
