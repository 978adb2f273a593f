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

import functools
import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from censusvi.data.cells import PRELOAD_MAX_CELLS, Cells
from censusvi.data.ray_stream import CellStream, stream_minibatches
from censusvi.model.minibatch import Minibatch
from censusvi.model.vae import VAE
from censusvi.train import schedule
from censusvi.train.checkpoint import CheckpointStore
from censusvi.train.loop import (
    EpochStats,
    History,
    TrainConfig,
    epoch_seeds,
    make_optimizer,
    resume_from,
    run_epochs,
    save_to,
)
from censusvi.train.pretrain import (
    PretrainConfig,
    RunBatches,
    RunPlan,
    plan_from,
    warn_if_undertrained,
)
from censusvi.train.run_record import RunRecord, RunTracker
from censusvi.train.storage import StorageTarget, run_name_for, storage_target

log = logging.getLogger(__name__)
# Ray Data ingest; read tasks reserve no CPU (the workers hold them all).
STREAM_DEFAULTS = {
    "mode": "auto",  # ray_data | memory | auto: memory when the worker's shard fits (Cells.preload)
    # One read task = 32 random 256-cell chunks read in storage order (runs of 64 cells cost
    # TileDB twice as much per cell: each read decompresses whole tiles); the worker's pool
    # draws every minibatch from the blocks of several tasks. bench/ingest.py measured these
    # on 2 CPUs: two reads in flight keep both cores busy while the consumer mixes.
    "io_batch_cells": 8192,
    "shuffle_chunk": 256,
    "shuffle_buffer_cells": 16384,
    "read_cpus": 0.0,
    "read_tasks": 2,  # read tasks in flight per worker, each a process holding one IO group
}
CHECKPOINT_DIR = "run"  # the CheckpointStore inside each reported Ray checkpoint
DEFAULT_STORAGE = "~/ray_results"  # Ray's own default: one machine only


def _config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: plain data for Ray


def _plan_in_worker(config: dict[str, Any]) -> RunPlan:
    """The driver's plan: its decisions (``config["plan"]``) and its cells (``config["cells"]``,
    a ``CellPlan`` in the object store, zero-copy here). Workers never open obs."""
    import ray

    return config["plan"].with_cells(ray.get(config["cells"]), config["cells"])


def _streams(plan: RunPlan, world: int, stream_opts: dict[str, Any]) -> bool:
    """Whether the training cells stream through Ray Data (else each rank reads its shard once)."""
    mode = stream_opts["mode"]
    return mode == "ray_data" or (
        mode == "auto" and len(plan.train_rows) // world > PRELOAD_MAX_CELLS
    )


def _rank_cells(
    plan: RunPlan, rank: int, world: int, config: dict[str, Any]
) -> tuple[Cells, Cells | None]:
    """This rank's (training, validation) cells. Streamed: every training cell (views of the
    shipped plan; each epoch's stream takes the rank's chunks) and the rank's run of the
    validation cells, read per minibatch; else the rank's fixed shard of chunks, kept."""
    opts = {**STREAM_DEFAULTS, **(config.get("stream") or {})}
    if _streams(plan, world, opts):
        train = plan.split_cells(plan.train_rows, plan.train_cov, preload=False)
        val = plan.rank_val(rank, world, preload=False)
        if val is not None:  # read in the stream's group size: bounded, like the stream
            val.io_batch_cells = opts["io_batch_cells"]
        return train, val
    return plan.rank_cells(rank, world, opts["shuffle_chunk"])


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def workers_device(device: str, use_gpu: bool) -> str:
    """The device kind Ray workers train on: ``use_gpu`` gives each its own GPU (Ray picks the
    index), so a CUDA ``train.device`` needs it; without it they train on the CPU."""
    if torch.device(device).type not in ("cpu", "cuda"):
        raise ValueError(f"train.device={device!r}: Ray workers train on cpu or cuda")
    if torch.device(device).type == "cuda" and not use_gpu:
        raise ValueError(
            f"train.device={device!r} but use_gpu is false: Ray gives the workers no GPU; set "
            "train.use_gpu: true (each worker then trains on its own GPU), or train.device: cpu"
        )
    return "cuda" if use_gpu else "cpu"


def _worker_batches(
    plan: RunPlan,
    t: TrainConfig,
    train_cells: Cells,
    val_cells: Cells | None,
    stream_opts: dict[str, Any],
    with_counts: bool,
) -> tuple[Callable[[int], Iterable[Minibatch]], Callable[[], Iterable[Minibatch]] | None]:
    """This worker's ``train_batches(seed)`` and ``val_batches()``: a shard that fits is read once
    and kept (``RunBatches``, as in one process); else each epoch streams the rank's run of a
    global permutation of chunks through Ray Data (``CellStream``; the permutation's seed is
    rank 0's shuffle seed of the epoch, the pool's this rank's)."""
    import ray.train

    batches = RunBatches(t, with_counts)
    val = (lambda: batches(val_cells, False, 0)) if val_cells is not None else None
    if stream_opts["mode"] == "memory" or train_cells.preload:
        return (lambda seed: batches(train_cells, True, seed)), val
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stream = CellStream(
        plan.cells_ref,
        len(plan.train_rows),
        train_cells.alignment,
        rank,
        world,
        stream_opts["shuffle_chunk"],
        stream_opts["io_batch_cells"],
        stream_opts["read_cpus"],
        stream_opts["read_tasks"],
    )

    def streamed(seed: int) -> Iterable[Minibatch]:
        epoch = seed - epoch_seeds(t.seed, 0, rank).shuffle  # the seeds are linear in the epoch
        assert epoch_seeds(t.seed, epoch, rank).shuffle == seed, "epoch_seeds changed form"
        return stream_minibatches(
            stream.epoch(epoch_seeds(t.seed, epoch, 0).shuffle),
            t.batch_size,
            len(plan.genes),
            t.device,
            seed,
            stream_opts["shuffle_buffer_cells"],
            with_counts=with_counts,
        )

    return streamed, val


def per_worker_batch(batch_size: int, world: int) -> int:
    """The global-batch rule: each of ``world`` workers steps on ``batch_size // world`` cells."""
    per = batch_size // world
    if per < 3:
        raise ValueError(
            f"train.batch_size={batch_size} is the global minibatch: over {world} workers it "
            f"leaves {per} cells per worker (need >= 3); raise train.batch_size or lower train.num_workers"
        )
    return per


def _reporter(
    vae: VAE,
    opt: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
    rank: int,
    world: int,
    record: RunRecord,
) -> Callable[[History], None]:
    """Every rank reports the epoch's metrics; rank 0 adds the checkpoint (``save_to``), with the
    run's ``record``."""
    import ray.train

    def report(history: History) -> None:
        s = history.epochs[-1]
        metrics = {
            "epoch": s.epoch,
            "train_loss": s.train_loss,
            "cells_per_s": s.cells_per_s,
            "cells_per_s_per_worker": s.cells_per_s / world,
            "kl_weight": s.kl_weight,
            "val_elbo": s.val_elbo if s.val_elbo is not None else s.train_loss,
            "val_reconstruction": s.val_reconstruction
            if s.val_reconstruction is not None
            else float("nan"),
            "val_kl": s.val_kl if s.val_kl is not None else float("nan"),
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                store = CheckpointStore(Path(tmp) / CHECKPOINT_DIR, fingerprint)
                save_to(store, vae, opt, history, {"run": record.to_dict()})
                ckpt = ray.train.Checkpoint.from_directory(Path(tmp) / CHECKPOINT_DIR)
            ray.train.report(metrics, checkpoint=ckpt)

    return report


def _resumed(
    config: dict[str, Any], vae: VAE, opt: torch.optim.Optimizer
) -> tuple[History, dict[str, Any] | None]:
    """The history of Ray's last checkpoint of this run, its state loaded (``resume_from``), and
    the checkpoint's run record (None: no checkpoint, or one written before records)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return History(), None
    with checkpoint.as_directory() as d:
        store = CheckpointStore(d, config["fingerprint"], config["start_over"])
        history = resume_from(store, vae, opt)
        return history, store.read_state().get("run")


def _tracked(
    config: dict[str, Any], record: RunRecord, epoch: int
) -> tuple[RunRecord, list[Callable[[EpochStats], None]]]:
    """Rank 0's record after opening (or continuing) its MLflow run, and the epoch hook that logs
    to it (none without a tracker or a reachable store)."""
    tracker: RunTracker | None = config.get("tracker")
    if tracker is None:
        return record, []
    run_id = tracker.open(record.mlflow_run_id, config["params"], record, epoch)
    if run_id is None:
        return record, []
    return replace(record, mlflow_run_id=run_id), [functools.partial(tracker.log_epoch, run_id)]


# What a worker returns instead of raising, for errors every rank raises alike and a restart would
# raise again: the driver raises them (``pretrain_distributed``), and Ray restarts nothing.
FINAL_ERRORS = {"ValueError": ValueError, "FloatingPointError": FloatingPointError}


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray worker's run; returns ``{"run": RunRecord dict}``, or ``{"error": [name,
    message]}`` when it stopped on one of the ``FINAL_ERRORS`` (another run's checkpoint; the NaN
    guard). Ray hands the driver rank 0's."""
    import ray.train
    import ray.train.torch

    plan = _plan_in_worker(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t = replace(
        plan.cfg.train,
        device=str(ray.train.torch.get_device()),
        batch_size=per_worker_batch(plan.cfg.train.batch_size, world),
    )
    train_cells, val_cells = _rank_cells(plan, rank, world, config)
    vae = plan.new_vae(train_cells).to(t.device)
    opt = make_optimizer(vae, t)
    try:
        history, prior = _resumed(config, vae, opt)
    except ValueError as e:  # another run's checkpoint: refused before any collective
        return {"error": ["ValueError", str(e)]}
    record = RunRecord.at_start(prior, config["submission"])
    hooks: list[Callable[[EpochStats], None]] = []
    if rank == 0:
        record, hooks = _tracked(config, record, len(history.epochs))
    model = ray.train.torch.prepare_model(vae, move_to_device=False)
    stream_opts = {**STREAM_DEFAULTS, **(config.get("stream") or {})}
    train_batches, val_batches = _worker_batches(
        plan, t, train_cells, val_cells, stream_opts, vae.needs_dense_counts
    )
    save = _reporter(vae, opt, config["fingerprint"], rank, world, record)
    if history.epochs and (history.stopped_early or len(history.epochs) >= t.max_epochs):
        save(history)  # nothing left to train: the checkpoint again, with this run's record
    try:
        run_epochs(
            model,
            opt,
            train_batches,
            val_batches,
            t,
            history,
            rank=rank,
            sum_over_ranks=_all_reduce_sum,
            save=save,
            on_epoch_end=[*hooks, *(config.get("on_epoch_end") or ())],
        )
    except FloatingPointError as e:  # the guard reads the sum over ranks: all stop here
        return {"error": ["FloatingPointError", str(e)]}
    return {"run": record.to_dict()}


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
    _check_stream(stream or {})
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from censusvi.data.ray_hvg import ray_reducer
    from censusvi.data.shards import planned_source
    from censusvi.model.io import save_model

    target = storage_target(storage_path or DEFAULT_STORAGE)
    t = replace(cfg.train, device=workers_device(cfg.train.device, use_gpu))
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
