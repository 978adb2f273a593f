"""``python -m censusvi.jobs.pretrain --config NAME|PATH [--set KEY=VALUE ...]``: pretrain on Ray.

Reads the config (``censusvi.config_files``: a packaged name such as ``local`` or ``census``, or a
YAML path; ``--set`` overrides any key), then calls the library: builds the SOMA experiment
``data.source`` from ``data.ingest`` (.h5ad glob patterns) when it does not exist yet, trains with
Ray Train (the cluster of ``ray job submit``, else a local Ray), writes the model directory
``out``, logs the run to MLflow (``mlflow.tracking_uri``, else the store every ``censusvi``
command uses: ``MLFLOW_TRACKING_URI``, else ``sqlite:///./mlruns/mlflow.db``) and registers a
version of ``mlflow.model_name``. Prints one JSON line. A config that cannot be read or used, or
data that cannot be: one ``error:`` line, exit 2. An MLflow store unreachable at registration:
one ``error:`` line, exit 3; the model and the run's checkpoints (``storage``) stay, and
resubmitting the same job registers it without training again.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from censusvi.atomic import check_folder
from censusvi.config_files import ConfigError, is_uri, packaged_names, read_config
from censusvi.extras import MissingExtra, needs_extras
from censusvi.registry.mlflow_store import DEFAULT_MODEL_NAME
from censusvi.train.loop import EpochStats
from censusvi.train.pretrain import PretrainConfig, pretrain_config_from
from censusvi.typed import typed

PROG = "python -m censusvi.jobs.pretrain"
MLFLOW_KEYS = ("model_name", "tracking_uri")


@dataclass(frozen=True)
class PretrainJob:
    """What a run needs, decided from the config before any work."""

    cfg: PretrainConfig
    out: str  # the model directory
    # the Ray run's checkpoints: a URI or a shared path (None: ray_results beside out)
    storage: str | None = None
    ingest: tuple[str, ...] = ()  # .h5ad glob patterns data.source is built from when missing
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 2  # worker-group restarts from the last checkpoint (-1: no limit)
    stream: dict[str, Any] = field(default_factory=dict)  # ray_trainer.STREAM_DEFAULTS' keys
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db
    model_name: str = DEFAULT_MODEL_NAME
    ingest_layer: str | None = None  # data.layer with data.ingest: the .h5ad files' counts


def _setting(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """``doc``'s ``section.key`` of type ``kind`` (``default`` when absent)."""
    section, name = key.split(".")
    try:
        return typed(key, (doc.get(section) or {}).get(name, default), kind)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def job_from(doc: dict[str, Any]) -> PretrainJob:
    """The job a config document (``read_config``) describes; ConfigError names what is wrong."""
    from censusvi.registry.uris import check_model_name
    from censusvi.train.ray_trainer import STREAM_DEFAULTS, check_job

    cfg = pretrain_config_from(doc)
    if not cfg.data.source:
        raise ConfigError(
            "no data.source: --set data.source=PATH (a SOMA experiment, built from data.ingest "
            "when missing; an .h5ad) or census://VERSION; on a cluster an absolute path"
        )
    if not doc.get("out"):
        raise ConfigError(
            "no out: --set out=PATH for the model directory (absolute on a cluster: a job runs "
            "in Ray's copy of the working dir)"
        )
    mlf, stream = doc.get("mlflow") or {}, doc.get("stream") or {}
    for name, given, known in (("mlflow", mlf, MLFLOW_KEYS), ("stream", stream, STREAM_DEFAULTS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ConfigError(f"unknown {name} setting(s) {unknown}; known: {sorted(known)}")
    storage = doc.get("storage")
    if storage is not None and not isinstance(storage, str):
        raise ConfigError(f"storage: expected a URI or a path, got {storage!r}")
    ingest = tuple((doc.get("data") or {}).get("ingest") or ())
    ingest_layer = None
    if ingest:  # data.layer is where the .h5ad files keep counts; the experiment's X holds them
        ingest_layer, cfg = cfg.data.layer, replace(cfg, data=replace(cfg.data, layer=None))
    job = PretrainJob(
        cfg,
        doc["out"],
        storage,
        ingest,
        _setting(doc, "train.num_workers", int, 1),
        _setting(doc, "train.use_gpu", bool, False),
        _setting(doc, "train.max_failures", int, 2),
        dict(stream),
        _setting(doc, "mlflow.tracking_uri", str | None, None),
        _setting(doc, "mlflow.model_name", str, DEFAULT_MODEL_NAME),
        ingest_layer,
    )
    try:  # before Ray starts and hours of training: not at the end, when registering
        check_job(cfg.train.device, job.num_workers, job.use_gpu, job.stream)
        check_model_name(job.model_name)
        if not is_uri(job.out) and not is_uri(cfg.data.source):  # not inside the experiment
            check_folder(job.out, "out", [cfg.data.source])
        if job.max_failures < -1:
            raise ValueError(f"train.max_failures={job.max_failures}: -1 (no limit) or more")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return job


def ingest_if_missing(job: PretrainJob) -> None:
    """Build the SOMA experiment ``data.source`` from ``data.ingest`` unless it exists."""
    from censusvi.data.ingest import ingest

    source = job.cfg.data.source
    if not job.ingest or is_uri(source) or Path(source).exists():
        return
    files = sorted({f for pattern in job.ingest for f in glob.glob(pattern)})
    if not files:
        raise ValueError(f"data.ingest: no file matches {list(job.ingest)} (to build {source})")
    print(f"ingesting {len(files)} files into {source}", flush=True)
    ingest(files, source, job.ingest_layer)


class RegistrationFailed(RuntimeError):
    """Training finished and the model is saved, but it could not be registered (exit 3)."""


def run(job: PretrainJob, on_epoch_end: Sequence[Callable[[EpochStats], None]] = ()) -> dict:
    """Ingest, train, save, register; ``on_epoch_end``: called in every Ray worker after each
    epoch's checkpoint (``pretrain_distributed``; the tests inject faults there)."""
    from censusvi.ray_session import init_ray
    from censusvi.registry.mlflow_store import RegistryUnreachable, log_and_register, tracking_uri
    from censusvi.registry.tracker import MlflowTracker
    from censusvi.train.ray_trainer import pretrain_distributed

    ingest_if_missing(job)
    # The store every censusvi command uses (MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db), so
    # that `censusvi models list` run from here shows this run.
    uri = job.tracking_uri or tracking_uri()
    storage = job.storage or str(Path(job.out).parent / "ray_results")
    init_ray()
    model, history = pretrain_distributed(
        job.cfg,
        job.out,
        num_workers=job.num_workers,
        use_gpu=job.use_gpu,
        storage_path=storage,
        max_failures=job.max_failures,
        stream=job.stream,
        on_epoch_end=on_epoch_end,
        tracker=MlflowTracker(uri),  # rank 0 logs each epoch to the run its checkpoint names
    )
    try:  # a step of its own: the model and the run's checkpoints stay whatever happens here
        run_id, version = log_and_register(model, history, job.out, uri, job.model_name)
    except RegistryUnreachable as e:
        raise RegistrationFailed(
            f"training finished and the model is saved in {job.out} (checkpoints in {storage}), "
            f"but registering it failed: {e}. Resubmit the same job to retry (it resumes at its "
            "last epoch, trains nothing and registers in the training's MLflow run), or run "
            f"`censusvi models register {job.out}`"
        ) from e
    return {
        "model": str(job.out),
        "epochs": len(history.epochs),
        "final_val_elbo": history.epochs[-1].val_elbo,
        "mlflow_run_id": run_id,
        "model_version": version,
        "tracking_uri": uri,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        required=True,
        help=f"a packaged config ({', '.join(packaged_names())}) or the path to a YAML file",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a key (out=/abs/model, train.max_epochs=2); VALUE is YAML; repeatable",
    )
    a = p.parse_args(argv)
    try:
        with needs_extras(PROG):
            result = run(job_from(read_config(a.config, a.set)))
    except (ValueError, FileNotFoundError, FileExistsError, MissingExtra) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except RegistrationFailed as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
