"""One Ray Train worker of a distributed pretraining run (``train_loop_per_worker``): it rebuilds
the driver's plan from the object store (never opening obs), takes its shard of chunks (kept, or
streamed through Ray Data each epoch), and calls ``censusvi.train.loop.run_epochs`` as
``censusvi pretrain`` does. Every rank reports each epoch; rank 0 adds the checkpoint with the
run's ``RunRecord`` and logs to MLflow. The driver side is ``censusvi.train.ray_trainer``."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from censusvi.data.cells import PRELOAD_MAX_CELLS, Cells
from censusvi.data.ray_stream import CellStream, stream_minibatches
from censusvi.model.minibatch import Minibatch
from censusvi.model.vae import VAE
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
from censusvi.train.plan import RunPlan
from censusvi.train.pretrain import RunBatches
from censusvi.train.run_record import RunRecord, RunTracker

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
