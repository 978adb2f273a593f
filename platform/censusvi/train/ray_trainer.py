"""Distributed pretraining with Ray Train: DDP over N workers running the core loop's pieces.

The driver decides the run once (``plan_from``: genes, batch categories, split) and ships that
decision; each worker rebuilds the same plan from the data source, takes an equal shard of the
training cells (DDP needs the same step count on every rank), and runs ``train_epoch`` on the
DDP-wrapped model, so the model and loss are the single-process ones. Rank 0 writes a checkpoint
every epoch; every rank reports; a restarted worker group resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from censusvi.data.ray_stream import CellStream, stream_minibatches
from censusvi.data.vocabulary import GeneVocabulary
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.model.vae import VAE
from censusvi.train import schedule
from censusvi.train.loop import (
    EpochStats,
    History,
    autocast_dtype,
    kl_weight,
    make_optimizer,
    train_epoch,
    validation_terms,
)
from censusvi.train.pretrain import (
    PretrainConfig,
    RunPlan,
    load_pretrain_config,
    plan_from,
    warn_if_undertrained,
)

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


def _config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists: plain data for Ray


def _plan_in_worker(config: dict[str, Any]) -> RunPlan:
    cfg = load_pretrain_config(None, config["cfg"])
    extra = tuple(tuple(c) for c in config["extra_cats"])
    return plan_from(
        cfg, GeneVocabulary.from_dict(config["genes"]), tuple(config["categories"]), extra
    )


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    plan = _plan_in_worker(config)
    t = plan.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    per_rank = len(plan.train_rows) // world
    train_cells = plan.cells(plan.train_rows[rank::world][:per_rank])
    val_cells = plan.cells(plan.val_rows[rank::world]) if len(plan.val_rows) >= world else None
    vae = plan.new_vae(train_cells)
    device = ray.train.torch.get_device()
    vae.to(device)
    opt = make_optimizer(vae, t)
    history = History()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            vae.load_state_dict(load_file(str(Path(d) / "weights.safetensors"), device=str(device)))
            opt.load_state_dict(
                torch.load(Path(d) / "optimizer.pt", weights_only=True, map_location=device)
            )
            history = History.from_dict(json.loads((Path(d) / "history.json").read_text()))
    model = ray.train.torch.prepare_model(vae, move_to_device=False)
    data, opts = plan.cfg.data, {**STREAM_DEFAULTS, **(config.get("stream") or {})}
    # a shard that fits is read once and kept (auto); reading it again each epoch is waste
    in_memory = opts["mode"] == "memory" or (opts["mode"] == "auto" and train_cells.preload)
    stream = None
    if not in_memory:
        stream = CellStream(
            replace(
                train_cells,
                shuffle_chunk=opts["shuffle_chunk"],
                io_batch_cells=opts["io_batch_cells"],
            ),
            (data.source, data.obs_filter, data.layer),
            opts["read_cpus"],
            opts["read_tasks"],
        )

    def batches(cells, shuffle: bool, seed: int):
        for _, x, c in cells.minibatches(t.batch_size, shuffle=shuffle, seed=seed):
            yield minibatch_from_csr(x, c, device, with_counts=vae.needs_dense_counts)

    def train_batches(seed: int):
        if stream is None:
            return batches(train_cells, True, seed)
        return stream_minibatches(
            stream.epoch(seed),
            t.batch_size,
            len(plan.genes),
            device,
            seed,
            opts["shuffle_buffer_cells"],
            with_counts=vae.needs_dense_counts,
        )

    failure = config.get("inject_failure")  # fault-injection hook for tests: {"epoch", "marker"}
    for epoch in range(len(history.epochs), t.max_epochs):
        if (
            failure
            and epoch == failure["epoch"]
            and rank == 0
            and not Path(failure["marker"]).exists()
        ):
            Path(failure["marker"]).write_text(f"worker failed at epoch {epoch}")
            raise RuntimeError(f"injected worker failure at epoch {epoch}")
        torch.manual_seed(t.seed * 100_003 + epoch + rank * 1009)  # rank 0: as `fit`
        kl_w = kl_weight(epoch, t.n_epochs_kl_warmup)
        t0 = time.perf_counter()
        loss, n = train_epoch(
            model,
            opt,
            train_batches(t.seed * 1_000_003 + epoch + rank * 7919),  # rank 0: as `pretrain`
            kl_w,
            autocast=autocast_dtype(t.precision, device),
        )
        seconds = time.perf_counter() - t0
        terms = (
            validation_terms(model, batches(val_cells, False, 0)) if val_cells is not None else None
        )
        has_val = terms is not None and terms.n_cells > 0
        v_n = terms.n_cells if has_val else 0
        v_rec, v_kl = (terms.reconstruction * v_n, terms.kl * v_n) if has_val else (0.0, 0.0)
        loss_sum, n_sum, rec_sum, kl_sum, v_n_sum, rate_sum = _all_reduce_sum(
            [loss * n, n, v_rec, v_kl, v_n, n / seconds]
        )
        rec, kl = (rec_sum / v_n_sum, kl_sum / v_n_sum) if v_n_sum else (None, None)
        stats = EpochStats(
            epoch, loss_sum / n_sum, rec + kl if v_n_sum else None, rate_sum, kl_w, rec, kl
        )
        history.epochs.append(stats)
        monitored = stats.val_elbo if stats.val_elbo is not None else stats.train_loss
        history.best_val = min(history.best_val, monitored)
        metrics = {
            "epoch": epoch,
            "train_loss": stats.train_loss,
            "cells_per_s": rate_sum,
            "cells_per_s_per_worker": rate_sum / world,
            "kl_weight": kl_w,
            "val_elbo": stats.val_elbo if stats.val_elbo is not None else stats.train_loss,
            "val_reconstruction": rec if rec is not None else float("nan"),
            "val_kl": kl if kl is not None else float("nan"),
        }
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()},
                    str(Path(tmp) / "weights.safetensors"),
                )
                torch.save(opt.state_dict(), Path(tmp) / "optimizer.pt")
                (Path(tmp) / "history.json").write_text(json.dumps(history.to_dict()))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def pretrain_distributed(
    cfg: PretrainConfig,
    out: str,
    num_workers: int = 2,
    use_gpu: bool = False,
    storage_path: str | None = None,
    run_name: str | None = None,
    max_failures: int = 2,
    keep_checkpoints: int = 2,
    inject_failure: dict[str, Any] | None = None,
    stream: dict[str, Any] | None = None,
):
    """Train with Ray Train and write the model directory ``out``; returns (model, history).
    ``stream``: Ray Data ingest settings (``STREAM_DEFAULTS``' keys)."""
    unknown = sorted(set(stream or {}) - set(STREAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown stream setting(s) {unknown}; known: {sorted(STREAM_DEFAULTS)}")
    mode = (stream or {}).get("mode", STREAM_DEFAULTS["mode"])
    if mode not in ("auto", "ray_data", "memory"):
        raise ValueError(f"stream.mode={mode!r}: choose auto, ray_data or memory")
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_file

    from censusvi.model.io import save_model

    source = cfg.data.source
    if "://" not in source and Path(source).exists():  # workers run in another directory
        cfg = replace(cfg, data=replace(cfg.data, source=str(Path(source).resolve())))
    from censusvi.data.ray_hvg import ray_reducer

    # the HVG statistics run on the cluster too: Ray Data tasks over row blocks, summed here
    plan = plan_from(
        cfg, hvg_reducer=ray_reducer(cfg.data.source, cfg.data.obs_filter, cfg.data.layer)
    )
    # The schedule is resolved once, here (plan_from); the workers get its values.
    log.info("training schedule %s", schedule.describe(plan.schedule_record(num_workers)))
    config = {
        "cfg": _config_dict(plan.cfg),
        "genes": plan.genes.to_dict(),
        "categories": list(plan.categories),
        "extra_cats": [list(c) for c in plan.extra_cats],
        "inject_failure": inject_failure,
        "stream": dict(stream or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(Path(storage_path).resolve()) if storage_path else None,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints,  # the best k by validation ELBO (and the latest)
                checkpoint_score_attribute="val_elbo",
                checkpoint_score_order="min",
            ),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        vae = VAE(plan.model_cfg)  # a shell for the trained weights
        vae.load_state_dict(load_file(str(Path(d) / "weights.safetensors")))
        history = History.from_dict(json.loads((Path(d) / "history.json").read_text()))
    extra = {
        "num_workers": num_workers,
        "ray_result_path": str(result.path),
        "restarts_from_checkpoint": _restarts(result),
    }
    extra.update(warn_if_undertrained(plan, history, num_workers))
    trained = plan.trained_model(vae.eval(), history, extra, num_workers)
    save_model(trained, out)
    return trained, history


def _restarts(result) -> int:
    """How many times the worker group resumed from a checkpoint (epochs reported twice)."""
    df = getattr(result, "metrics_dataframe", None)
    if df is None or "epoch" not in getattr(df, "columns", ()):
        return 0
    return int(len(df) - df["epoch"].nunique())
