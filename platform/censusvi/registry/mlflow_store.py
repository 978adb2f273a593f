"""MLflow tracking and registry for pretraining runs.

A run logs its parameters, the resolved config, per-epoch metrics, the gene vocabulary, the git
commit, and the model directory as artifacts (``model/``: config.json + safetensors, no pickle);
the model is then registered as a new version of ``censusvi-scvi`` with lineage tags. The
tracking URI is ``MLFLOW_TRACKING_URI`` when set, else a local sqlite store (``mlflow ui`` reads it).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "censusvi-scvi"
DEFAULT_EXPERIMENT = "censusvi-pretrain"


def tracking_uri(default_dir: str | os.PathLike = "mlruns") -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    d = Path(default_dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{d / 'mlflow.db'}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v if not isinstance(v, (list, tuple)) else ",".join(map(str, v))
    return out


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _experiment_id(uri: str) -> str:
    """The pretraining experiment; with a sqlite store its artifacts live beside the database
    (MLflow's default would be ./mlruns under whatever directory the job started in)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(DEFAULT_EXPERIMENT, artifact_location=location)


def log_and_register(
    trained,
    history,
    model_dir: str | os.PathLike,
    uri: str,
    name: str = DEFAULT_MODEL_NAME,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Log a finished run and register its model; returns (run_id, model version)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(uri)
    prov = trained.provenance
    with mlflow.start_run(experiment_id=_experiment_id(uri), run_name=run_name) as run:
        mlflow.log_params(_flatten(prov.get("config", {})))
        for e in history.epochs:
            metrics = {
                "train_loss": e.train_loss,
                "cells_per_s": e.cells_per_s,
                "kl_weight": e.kl_weight,
            }
            for metric in ("val_elbo", "val_reconstruction", "val_kl"):
                if getattr(e, metric) is not None:
                    metrics[metric] = getattr(e, metric)
            mlflow.log_metrics(metrics, step=e.epoch)
        mlflow.log_dict(prov.get("config", {}), "pretrain_config.json")
        mlflow.log_dict(trained.genes.to_dict(), "genes.json")
        run_tags = {"git_commit": git_commit(), **(extra_tags or {})}
        for key in ("num_workers", "restarts_from_checkpoint"):  # a resumed run says so
            if key in prov:
                run_tags[key] = str(prov[key])
        mlflow.set_tags(run_tags)
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
    tags = {
        "source": str(prov.get("source")),
        "census_version": str(prov.get("source", "")).removeprefix("census://")
        if str(prov.get("source", "")).startswith("census://")
        else "local",
        "obs_filter": str(prov.get("obs_filter")),
        "n_cells": str(prov.get("n_cells")),
        "n_genes": str(len(trained.genes)),
        "n_batches": str(len(trained.batch_categories)),
    }
    return run.info.run_id, new_version(MlflowClient(), name, run, tags)


def new_version(client, name: str, run, tags: dict[str, str]) -> str:
    """A version of ``name`` (registered on first use) whose files are ``run``'s artifacts
    (``model/``, and ``index/`` for a servable version)."""
    try:
        client.get_registered_model(name)
    except Exception:  # MlflowException: not registered yet
        client.create_registered_model(name)
    source, run_id = run.info.artifact_uri, run.info.run_id
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=tags).version)


def _tracking_from_env():
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if "MLFLOW_TRACKING_URI" in os.environ:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return mlflow


def download_model(uri: str, dst: str | os.PathLike | None = None) -> Path:
    """A local copy of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (``/SUBPATH`` for one
    folder of it)."""
    mlflow = _tracking_from_env()
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
    )


def artifact_names(uri: str) -> set[str]:
    """The top-level artifact names of ``models:/NAME/VERSION``, without downloading them."""
    mlflow = _tracking_from_env()
    return {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=uri)}
