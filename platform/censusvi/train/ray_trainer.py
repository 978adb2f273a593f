"""Distributed pretraining with Ray Train: DDP over N workers, each running the one epoch runner.

The driver decides the run once (``plan_from``: genes, batch categories, split, schedule) and
ships that decision; each worker rebuilds the same plan from the data source, takes an equal shard
of the training cells (DDP needs the same step count on every rank) and calls
``censusvi.train.loop.run_epochs`` as ``censusvi pretrain`` does: the same seeds, KL warm-up,
validation ELBO, early stopping and NaN guard, the same checkpoint save and resume. A worker
differs only in its shard, the DDP wrapper, the sum of the statistics over ranks, and that rank 0
hands its checkpoint to ``ray.train.report`` (every rank reports); a restarted worker group resumes
from the last one.

Storage is a URI or a shared path handed to Ray Train as given (``censusvi.train.storage``), and
the run's name comes from its fingerprint, so a resubmitted job resumes its own run from storage.
Each checkpoint carries the ``RunRecord`` (the MLflow run, restarts, resubmissions); rank 0 opens
or continues the MLflow run through the job's ``RunTracker`` and logs every epoch to it.

The global-batch rule: ``train.batch_size`` is the global minibatch. Each of N workers steps on
``batch_size // N`` cells with the schedule's learning rate; DDP averages the workers' gradients,
so a step sees the cells one process's step sees and N workers take one process's steps.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from censusvi.model.device import device_kind
from censusvi.model.vae import VAE
from censusvi.train import schedule
from censusvi.train.checkpoint import CheckpointStore
from censusvi.train.loop import EpochStats, resume_from
from censusvi.train.plan import plan_from, warn_if_undertrained
from censusvi.train.ray_worker import (  # noqa: F401  (STREAM_DEFAULTS: public here too)
    FINAL_ERRORS,
    STREAM_DEFAULTS,
    per_worker_batch,
    train_loop_per_worker,
)
from censusvi.train.run_config import PretrainConfig
from censusvi.train.run_record import RunRecord, RunTracker
from censusvi.train.storage import StorageTarget, run_name_for, storage_target

log = logging.getLogger(__name__)
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default: one machine only


def _config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: plain data for Ray


def workers_device(device: str, use_gpu: bool) -> str:
    """The device kind Ray workers train on: ``use_gpu`` gives each its own GPU (Ray picks the
    index), so a CUDA ``train.device`` needs it; without it they train on the CPU."""
    if (kind := device_kind(device)) not in ("cpu", "cuda"):
        raise ValueError(f"train.device={device!r}: Ray workers train on cpu or cuda")
    if kind == "cuda" and not use_gpu:
        raise ValueError(
            f"train.device={device!r} but use_gpu is false: Ray gives the workers no GPU; set "
            "train.use_gpu: true (each worker then trains on its own GPU), or train.device: cpu"
        )
    return "cuda" if use_gpu else "cpu"


def check_job(device: str, num_workers: Any, use_gpu: bool, stream: dict[str, Any]) -> str:
    """What a Ray pretraining job can be refused for before Ray starts (``python -m
    censusvi.jobs.pretrain`` checks it while reading its config); the workers' device kind."""
    if not (isinstance(num_workers, int) and num_workers >= 1):
        raise ValueError(f"train.num_workers={num_workers!r}: a whole number of workers >= 1")
    _check_stream(stream)
    return workers_device(device, use_gpu)


def _warn_if_short(num_workers: int, use_gpu: bool) -> None:
    """Ray Train waits for its workers' CPUs (and GPUs): for an autoscaler to add nodes, and
    forever where none will. Said before the wait, not after it."""
    import ray

    have = ray.cluster_resources()
    short = [f"{num_workers} {r}s, the cluster has {have.get(r, 0):g}"
             for r in ("CPU", *(("GPU",) if use_gpu else ())) if have.get(r, 0) < num_workers]  # fmt: skip
    if short:
        log.warning(
            "train.num_workers=%d needs %s: Ray Train waits until an autoscaler adds nodes (and "
            "for ever without one): lower train.num_workers or add nodes",
            num_workers, "; ".join(short),
        )  # fmt: skip


def _check_stream(stream: dict[str, Any]) -> None:
    unknown = sorted(set(stream) - set(STREAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown stream setting(s) {unknown}; known: {sorted(STREAM_DEFAULTS)}")
    mode = stream.get("mode", STREAM_DEFAULTS["mode"])
    if mode not in ("auto", "ray_data", "memory"):
        raise ValueError(f"stream.mode={mode!r}: choose auto, ray_data or memory")


def _start_over(target: StorageTarget, run_name: str) -> str:
    """How to start afresh when a checkpoint is refused: Ray resumes a run of the same name
    and storage from its last checkpoint."""
    return f"pass another run_name to start over (or delete {target.run_uri(run_name)})"


def _run_config(target: StorageTarget, name: str, max_failures: int, keep_checkpoints: int):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        storage_path=target.path,
        storage_filesystem=target.filesystem,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=keep_checkpoints,  # the best k by validation ELBO (and the latest)
            checkpoint_score_attribute="val_elbo",
            checkpoint_score_order="min",
        ),
    )


def _outcome(result, vae: VAE, fingerprint: dict[str, Any], submission: str):
    """(history, RunRecord) of a finished ``trainer.fit()``, the last checkpoint's weights in
    ``vae``; a worker's final error raised here."""
    if result.error is not None:
        raise result.error
    returned = getattr(result, "return_value", None) or {}
    if "error" in returned:
        error, message = returned["error"]
        raise FINAL_ERRORS[error](message)
    with result.checkpoint.as_directory() as d:
        store = CheckpointStore(d, fingerprint)
        history = resume_from(store, vae, None)
        written = returned.get("run") or store.read_state().get("run")
    return history, RunRecord.from_dict(written or {"submission": submission})


def pretrain_distributed(
    cfg: PretrainConfig,
    out: str,
    num_workers: int = 2,
    use_gpu: bool = False,
    storage_path: str | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    stream: dict[str, Any] | None = None,
    on_epoch_end: Sequence[Callable[[EpochStats], None]] = (),
    tracker: RunTracker | None = None,
):
    """Train with Ray Train and write the model directory ``out``; returns (model, history).
    ``storage_path``: where the run's checkpoints live, a URI (``s3://``, ``gs://``, ``file://``)
    or a path every node sees (default ``~/ray_results``); ``run_name``: the run there (default:
    from the run's fingerprint, so the same job resumes). ``stream``: Ray Data ingest settings
    (``STREAM_DEFAULTS``' keys). ``on_epoch_end``: called in every worker with each epoch's
    statistics (summed over ranks) after its checkpoint; they travel to the workers, so they must
    pickle (cloudpickle: a function or a class instance). ``tracker``: rank 0 logs the run to it
    (``censusvi.registry.mlflow_store.MlflowTracker``)."""
    device = check_job(cfg.train.device, num_workers, use_gpu, stream or {})
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from censusvi.data.ray_hvg import ray_reducer
    from censusvi.data.shards import planned_source
    from censusvi.model.io import save_model

    _warn_if_short(num_workers, use_gpu)
    target = storage_target(storage_path or DEFAULT_STORAGE)
    t = replace(cfg.train, device=device)
    cfg = replace(cfg, train=t)
    source = cfg.data.source
    if "://" not in source and Path(source).exists():  # workers run in another directory
        cfg = replace(cfg, data=replace(cfg.data, source=str(Path(source).resolve())))
    # obs is read here once; the HVG statistics run on the cluster, as tasks that get only
    # their blocks' joinids and strata codes and return their sums
    plan = plan_from(
        cfg,
        hvg_reducer=lambda src: ray_reducer(
            planned_source(src, cfg.data.obs_filter, cfg.data.layer)
        ),
    )
    per_worker_batch(plan.cfg.train.batch_size, num_workers)  # refused here, not in the workers
    # The schedule is resolved once, here (plan_from); the workers get its values. Under the
    # global-batch rule N workers take one process's optimiser steps (schedule_record(1)).
    log.info("training schedule %s", schedule.describe(plan.schedule_record()))
    fingerprint = plan.fingerprint()
    name = run_name or run_name_for(fingerprint, plan.cfg.data.source)
    log.info("Ray Train run %s", target.run_uri(name))
    decided, cells = plan.for_workers()  # the cells go once into the object store
    config = {
        "plan": decided,
        "cells": ray.put(cells),
        "fingerprint": fingerprint,
        "start_over": _start_over(target, name),
        "stream": dict(stream or {}),
        "on_epoch_end": list(on_epoch_end),
        "submission": uuid.uuid4().hex,
        "tracker": tracker,
        "params": {**_config_dict(plan.cfg), "num_workers": num_workers},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=_run_config(target, name, max_failures, keep_checkpoints),
    )
    vae = VAE(plan.model_cfg)  # a shell for the trained weights
    history, record = _outcome(trainer.fit(), vae, fingerprint, config["submission"])
    extra = {
        "num_workers": num_workers,
        "global_batch_size": plan.cfg.train.batch_size,
        "per_worker_batch_size": per_worker_batch(plan.cfg.train.batch_size, num_workers),
        "storage": target.uri,
        "ray_run_name": name,
        "ray_result_path": target.run_uri(name),
        **record.counts(),
    }
    if record.mlflow_run_id:
        extra["mlflow_run_id"] = record.mlflow_run_id
    extra.update(warn_if_undertrained(plan, history))
    trained = plan.trained_model(vae.eval(), history, extra)
    save_model(trained, out)
    return trained, history
