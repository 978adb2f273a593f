"""Multi-node training on a simulated cluster (``ray.cluster_utils.Cluster``: a head and two
worker nodes, each with its own resources and object store, the run's storage a shared ``file://``
URI). A worker node removed mid-epoch: the run goes on from the last checkpoint and MLflow
records the restart. The driver killed and the job resubmitted: it resumes from storage in the
same MLflow run. tests/multinode_scenario.py runs the cluster in a process of its own (its own
RAY_TMPDIR, so no other Ray on the machine can find it); the faults come from an on_epoch_end
callback there, never from a production setting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import simulated_adata
from test_cluster_submit import processes_under, stop_head

pytest.importorskip("ray")
pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="mn", dir="/tmp"))  # short: Ray's socket paths are limited
    try:
        yield d
    finally:
        stop_head(d)  # anything of the scenario's cluster still alive
        shutil.rmtree(d, ignore_errors=True)
    assert not processes_under(d)


def test_node_loss_and_driver_kill_resume_from_shared_storage_in_one_mlflow_run(work):
    from mlflow import MlflowClient

    from censusvi.model.io import load_model

    simulated_adata(n_cells=200).write_h5ad(work / "x.h5ad")
    uri = f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"
    storage = f"file://{work}/shared"
    doc = {
        "data": {"source": str(work / "x.h5ad"), "batch_keys": "batch", "n_hvg": 0},
        "model": {"n_hidden": 16, "n_latent": 4},
        "train": {"schedule": "census", "max_epochs": EPOCHS, "lr": 0.01, "batch_size": 64},
        "stream": {"mode": "memory"},
        "out": str(work / "m"),
        "storage": storage,
        "mlflow": {"tracking_uri": uri, "model_name": "censusvi-multinode"},
    }
    doc["train"].update(num_workers=2, max_failures=3)
    (work / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(
        PYTHONPATH=str(ROOT / "platform"), RAY_TMPDIR=str(work), MLFLOW_DISABLE_TELEMETRY="true"
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in work.glob("*.log") if p.is_file()
    )
    assert done.returncode == 0, done.stderr[-3000:] + logs
    summary = json.loads((work / "summary.json").read_text())
    assert summary["removed_node"] != summary["driver_node"]  # a worker's node, not the driver's
    assert summary["first_submission_exit"] == -9  # the driver was killed
    assert summary["resubmission_exit"] == 0, logs
    result = summary["resubmission"]
    assert result["epochs"] == EPOCHS and result["model_version"] == "1"

    prov = load_model(work / "m").provenance
    assert prov["restarts_from_checkpoint"] == 1 and prov["resubmissions"] == 1
    assert prov["storage"] == storage and prov["mlflow_run_id"] == result["mlflow_run_id"]
    assert (work / "shared" / prov["ray_run_name"]).is_dir()  # the checkpoints, on the share

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("censusvi-pretrain").experiment_id])
    assert run.info.run_id == result["mlflow_run_id"]  # one run across both submissions
    assert run.data.tags["restarts_from_checkpoint"] == "1"
    assert run.data.tags["resubmissions"] == "1"
    restarts = client.get_metric_history(run.info.run_id, "restarts_from_checkpoint")
    assert (2, 1.0) in {(m.step, m.value) for m in restarts}  # resumed at epoch 2
    val = client.get_metric_history(run.info.run_id, "val_elbo")
    assert sorted(m.step for m in val) == list(range(EPOCHS))  # each epoch once: none redone
    live = sorted(m.step for m in val if m.timestamp < summary["killed_at_ms"])
    assert live == [0, 1, 2, 3]  # logged by rank 0 as it trained: that driver never registered
