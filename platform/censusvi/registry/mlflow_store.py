"""MLflow tracking and registry for pretraining runs.

A run logs its parameters, the resolved config, per-epoch metrics, the gene vocabulary, the git
commit, and the model directory as artifacts (``model/``: config.json + safetensors, no pickle);
the model is then registered as a new version of ``censusvi-scvi`` with lineage tags, and an
``MLmodel`` at the run's artifact root makes the version an MLflow model (registry/pyfunc.py).

Every command reaches the store through ``use_tracking``: ``MLFLOW_TRACKING_URI`` when set, else
``sqlite:///./mlruns/mlflow.db`` under the current directory (``mlflow ui`` reads it). A store
that cannot be reached raises ``RegistryUnreachable`` naming the URI and the cause within seconds.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "censusvi-scvi"
DEFAULT_ALIAS = "production"  # the alias promote moves and serving follows
DEFAULT_EXPERIMENT = "censusvi-pretrain"
DEFAULT_STORE_DIR = "mlruns"  # under the current directory; holds mlflow.db and artifacts/
TRACKING_HELP = (
    "The MLflow store is $MLFLOW_TRACKING_URI (a tracking server http(s)://HOST:PORT or "
    f"sqlite:///PATH), else sqlite:///./{DEFAULT_STORE_DIR}/mlflow.db under the current directory."
)
# MLflow retries an unreachable server 7 times with exponential backoff and waits 120 s per
# request (~4 min before an error). These fail a refused connection in ~2-4 s and a host that
# never answers in ~35 s (3 tries of 10 s); a value the user set wins.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class RegistryUnreachable(ConnectionError):
    """The MLflow store could not be reached or opened (the message names the URI and cause)."""

    def __init__(self, uri: str, cause: str):
        fix = (
            "start the server, or point MLFLOW_TRACKING_URI at a running one"
            if uri.startswith(("http://", "https://"))
            else "point MLFLOW_TRACKING_URI at a store you can open"
        )
        super().__init__(f"cannot reach the MLflow store at {uri}: {cause}; {fix}")
        self.uri = uri


def tracking_uri(default_dir: str | os.PathLike = DEFAULT_STORE_DIR) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the sqlite store in ``default_dir`` (created by
    ``use_tracking`` when a command writes to it, not here: reading creates nothing)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(default_dir).resolve() / 'mlflow.db'}"


def use_tracking(uri: str | None = None) -> str:
    """Point MLflow at ``uri`` (default ``tracking_uri()``) and return it. A server gets short
    HTTP retries; a sqlite file that cannot be opened is refused here (MLflow would retry it for
    ~100 s)."""
    import mlflow

    uri = uri or tracking_uri()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith(("http://", "https://")):
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        retries = logging.getLogger("urllib3.connectionpool")
        if retries.level == logging.NOTSET:  # a warning per retry; the last failure is raised
            retries.setLevel(logging.ERROR)
    elif (path := sqlite_file(uri)) is not None:
        _check_sqlite_file(uri, path)
    mlflow.set_tracking_uri(uri)
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The file a ``sqlite:///`` store URI names (None: another store, or in memory)."""
    if not uri.startswith("sqlite:///") or (path := uri.removeprefix("sqlite:///")) == ":memory:":
        return None
    return Path(path)


def absent_sqlite_store(uri: str | None = None) -> Path | None:
    """The file of a sqlite store that does not exist yet (None: it exists, or not sqlite):
    reading commands report it instead of creating it (a mistyped URI made folders at /)."""
    path = sqlite_file(uri or tracking_uri())
    return None if path is None or path.exists() else path


def _check_sqlite_file(uri: str, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryUnreachable(uri, f"cannot create {path.parent} ({e.strerror})") from e
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.R_OK | os.W_OK):
        raise RegistryUnreachable(uri, f"{target} is not a writable sqlite file or folder")
    if path.is_file() and path.stat().st_size and not _is_sqlite(path):
        raise RegistryUnreachable(uri, f"{path} is not a SQLite database")


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


_NETWORK_ERRORS = {  # requests' and urllib3's names: neither package is imported here
    "ConnectionError",
    "ConnectTimeout",
    "ConnectTimeoutError",
    "MaxRetryError",
    "NewConnectionError",
    "ProtocolError",
    "ReadTimeout",
    "ReadTimeoutError",
    "RetryError",
}


def _short_cause(e: BaseException) -> str | None:
    """Why a registry call failed, in a few words, when the failure is the connection's (the
    innermost socket error, 'timed out', or the retries' last answer); None for anything else."""
    chain, seen = [], e
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(err, RegistryUnreachable) for err in chain[1:]):
        return None  # already explained, and re-raised as something more specific
    text = " ".join(str(err) for err in chain)
    network = re.match(r"API request to \S+ failed with (timeout )?exception", str(e)) or any(
        isinstance(err, (ConnectionError, TimeoutError, socket.gaierror))
        or type(err).__name__ in _NETWORK_ERRORS
        for err in chain
    )
    if not network:
        return (
            "unable to open the database file" if "unable to open database file" in text else None
        )
    if "timed out" in text.lower():
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
        return f"no answer within {timeout} s (MLFLOW_HTTP_REQUEST_TIMEOUT)"
    for err in reversed(chain):  # innermost first: the socket's own words
        if isinstance(err, OSError) and err.strerror:
            return err.strerror
    m = re.search(r"\(Caused by (\w+\(.{0,120}?\))\)", text)
    return m.group(1) if m else str(e).splitlines()[0][:200]


def reaches_registry(fn):
    """Turn ``fn``'s connection failures into one ``RegistryUnreachable`` naming the store."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RegistryUnreachable:
            raise
        except Exception as e:
            cause = _short_cause(e)
            if cause is None:
                raise
            import mlflow

            raise RegistryUnreachable(mlflow.get_tracking_uri(), cause) from e

    return wrapper


def is_not_found(e: BaseException) -> bool:
    """MLflow's 'no such model / version / alias' (a store that answered), as opposed to one that
    could not be asked. A missing alias is INVALID_PARAMETER_VALUE in MLflow 3's stores."""
    from mlflow.exceptions import MlflowException  # RestException too: a server's answer

    code = getattr(e, "error_code", None)
    return isinstance(e, MlflowException) and (
        code == "RESOURCE_DOES_NOT_EXIST"
        or (code == "INVALID_PARAMETER_VALUE" and bool(re.search(r"alias \S+ not found", str(e))))
    )


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


MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
# On a run whose model is registered: "NAME/VERSION/EPOCHS", so a retried registration of the
# same model returns that version instead of registering it twice.
REGISTERED_TAG = "censusvi.registered"


def epoch_metrics(e) -> dict[str, float]:
    """One epoch's MLflow metrics (``train.loop.EpochStats``), as the tracker and the
    registration log them."""
    metrics = {"train_loss": e.train_loss, "cells_per_s": e.cells_per_s, "kl_weight": e.kl_weight}
    for metric in ("val_elbo", "val_reconstruction", "val_kl"):
        if getattr(e, metric) is not None:
            metrics[metric] = getattr(e, metric)
    return metrics


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(use_tracking(uri))


@reaches_registry
def open_run(uri: str, run_id: str | None, run_name: str | None = None):
    """The MLflow run ``run_id`` (None, or not in this store: a new run of the pretraining
    experiment), RUNNING again if it had ended; returns (client, run)."""
    client = _client(uri)
    run = None
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except Exception as e:
            if not is_not_found(e):
                raise
            log.warning("MLflow run %s is not in %s: starting a new run", run_id, uri)
    if run is None:
        run = client.create_run(_experiment_id(uri), run_name=run_name)
    elif run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    return client, run


def log_missing_params(client, run, params: dict[str, Any]) -> None:
    """Log the flattened ``params`` the run does not hold yet (MLflow refuses a changed value,
    e.g. a resubmission's larger ``train.max_epochs``: the first value stays)."""
    from mlflow.entities import Param

    new = [Param(k, str(v)) for k, v in _flatten(params).items() if k not in run.data.params]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])


def _log_missing_epochs(client, run_id: str, history) -> None:
    from mlflow.entities import Metric

    logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, e.epoch)
        for e in history.epochs
        if e.epoch not in logged
        for k, v in epoch_metrics(e).items()
    ]
    for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])


RUN_TAGS = ("num_workers", "restarts_from_checkpoint", "resubmissions", "storage", "ray_run_name")


@reaches_registry
def log_and_register(
    trained,
    history,
    model_dir: str | os.PathLike,
    uri: str,
    name: str = DEFAULT_MODEL_NAME,
    run_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Log a finished run and register its model; returns (run_id, model version).

    The run the training opened (``provenance["mlflow_run_id"]``: the Ray job's live tracking)
    is continued: the epochs it lacks are logged, then the model. A retry after a failure is
    safe: a run whose model is registered already for as many epochs returns that version."""
    import mlflow

    prov = trained.provenance
    client, run = open_run(uri, prov.get("mlflow_run_id"), run_name)
    done = run.data.tags.get(REGISTERED_TAG)
    if done:
        registered_as, version, epochs = done.rsplit("/", 2)
        if registered_as == name and int(epochs) == len(history.epochs):
            client.set_terminated(run.info.run_id)
            return run.info.run_id, version
        client, run = open_run(uri, None, run_name)  # the registered version keeps its files
    run_id = run.info.run_id
    log_missing_params(client, run, prov.get("config", {}))
    _log_missing_epochs(client, run_id, history)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(prov.get("config", {}), "pretrain_config.json")
        mlflow.log_dict(trained.genes.to_dict(), "genes.json")
        run_tags = {"git_commit": git_commit(), **(extra_tags or {})}
        run_tags.update({key: str(prov[key]) for key in RUN_TAGS if key in prov})
        if isinstance(prov.get("schedule"), dict):  # the training schedule train/ chose
            run_tags["schedule"] = str(prov["schedule"].get("name"))
        mlflow.set_tags(run_tags)
    log_folder(client, run_id, model_dir, "model")
    from censusvi.registry.pyfunc import log_mlmodel

    log_mlmodel(client, run_id, None)  # an MLflow model; an index is attached later
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
    version = new_version(client, name, run, tags)
    client.set_tag(run_id, REGISTERED_TAG, f"{name}/{version}/{len(history.epochs)}")
    return run_id, version


def log_folder(client, run_id: str, folder: str | os.PathLike, kind: str) -> None:
    """Upload a censusvi model or index folder as the run's ``kind/`` artifacts: only the files
    its format defines (``artifacts.artifact_files``); any other entry is left out, and said."""
    from censusvi.artifacts import artifact_files

    files, other = artifact_files(folder, kind)
    if other:
        log.warning("%s: not registered (not part of a censusvi %s): %s", folder, kind, other)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=kind)


def new_version(client, name: str, run, tags: dict[str, str]) -> str:
    """A version of ``name`` (registered on first use) whose files are ``run``'s artifacts
    (``model/``, and ``index/`` for a servable version)."""
    try:
        client.get_registered_model(name)
    except Exception as e:
        if not is_not_found(e):
            raise
        client.create_registered_model(name)
    source, run_id = run.info.artifact_uri, run.info.run_id
    return str(client.create_model_version(name, source=source, run_id=run_id, tags=tags).version)
