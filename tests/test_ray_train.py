"""Distributed pretraining on a local Ray cluster, tracked and registered in a real MLflow store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.model.io import load_model
from censusvi.train.loop import EpochStats, TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
from conftest import simulated_adata

ray = pytest.importorskip("ray")


def small_cfg(src: str, epochs: int = 3, prior_components: int = 0) -> PretrainConfig:
    return PretrainConfig(
        DataConfig(source=src, batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4, prior_components=prior_components),
        TrainConfig(schedule="census", max_epochs=epochs, lr=1e-2, batch_size=64, seed=0),
    )


def test_two_workers_train_register_and_embed_identically(local_ray, tmp_path, monkeypatch):
    from censusvi.registry.mlflow_store import log_and_register
    from censusvi.train.ray_trainer import pretrain_distributed

    a = simulated_adata(n_cells=400)
    a.write_h5ad(tmp_path / "x.h5ad")
    model, history = pretrain_distributed(
        small_cfg(str(tmp_path / "x.h5ad"), prior_components=3),  # a VampPrior's pseudo-cells too
        str(tmp_path / "m"),
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
        stream={"mode": "ray_data", "io_batch_cells": 64, "shuffle_buffer_cells": 128},
    )
    assert len(history.epochs) == 3 and history.epochs[-1].val_elbo < history.epochs[0].val_elbo
    assert model.provenance["num_workers"] == 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, version = log_and_register(model, history, tmp_path / "m", uri, "censusvi-test")
    assert version == "1"
    assert (tmp_path / "artifacts").is_dir()  # artifacts beside the sqlite store, not in the cwd
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    registered = load_model("models:/censusvi-test/1")
    z_dir = latent_representation(load_model(tmp_path / "m"), H5adSource(tmp_path / "x.h5ad"))[1]
    z_reg = latent_representation(registered, H5adSource(tmp_path / "x.h5ad"))[1]
    np.testing.assert_array_equal(z_dir, z_reg)
    import mlflow

    run = mlflow.get_run(run_id)
    assert {"train_loss", "val_elbo", "val_reconstruction", "val_kl", "cells_per_s"} <= set(
        run.data.metrics
    )
    last = history.epochs[-1]
    assert abs(last.val_reconstruction + last.val_kl - last.val_elbo) < 1e-6 * abs(last.val_elbo)
    assert run.data.params["train.lr"] == "0.01" and "git_commit" in run.data.tags
    info = mlflow.models.get_model_info("models:/censusvi-test/1")  # an MLflow model, no index yet
    assert info.flavors["python_function"]["loader_module"] == "censusvi.registry.pyfunc"
    assert info.signature.outputs is None and info.signature.params.params[0].name == "k"


def test_one_and_two_workers_match_single_process_elbo(local_ray, tmp_path):
    """One worker runs the single-process loop: the same seeds, shard and model give the same
    first epoch (1e-4: the worker computes with one thread, this process with more, so float
    sums round in another order; a wrong seed or shard moves the loss by percents), and the
    final ELBO lands within 1 %. Two workers follow the global-batch rule (train.batch_size is
    the global minibatch, each worker steps on half of it with the same lr): they take the same
    optimiser steps and reach the one worker's best validation ELBO within 1 % (measured: 0.04 %
    after 30 epochs, 0.02 % after the 15 run here; at 30 epochs, 64 cells per worker, the old rule,
    ended 7.6 % worse)."""
    from censusvi.train.ray_trainer import pretrain_distributed

    EPOCHS = 15
    a = simulated_adata(n_cells=600)
    a.write_h5ad(tmp_path / "x.h5ad")
    cfg = small_cfg(str(tmp_path / "x.h5ad"), epochs=EPOCHS)
    cfg = replace(cfg, train=replace(cfg.train, lr=3e-3))  # 1e-2 jumps by percents an epoch
    one, h_ray = pretrain_distributed(
        cfg, str(tmp_path / "m_ray"), num_workers=1, storage_path=str(tmp_path / "ray")
    )
    _, h_local = pretrain(cfg, tmp_path / "m_local", quiet=True)
    first_ray, first_local = h_ray.epochs[0], h_local.epochs[0]
    assert first_ray.train_loss == pytest.approx(first_local.train_loss, rel=1e-4)
    assert first_ray.val_elbo == pytest.approx(first_local.val_elbo, rel=1e-4)
    ray_val, local_val = h_ray.epochs[-1].val_elbo, h_local.epochs[-1].val_elbo
    assert abs(ray_val - local_val) / abs(local_val) < 0.01, (ray_val, local_val)

    two, h_two = pretrain_distributed(  # other storage: the same run name would resume `one`
        cfg, str(tmp_path / "m_two"), num_workers=2, storage_path=str(tmp_path / "ray2")
    )
    assert two.provenance["resubmissions"] == 0 and len(h_two.epochs) == EPOCHS
    assert two.provenance["per_worker_batch_size"] == 32
    assert two.provenance["global_batch_size"] == one.provenance["global_batch_size"] == 64
    steps = two.provenance["schedule"]["optimizer_steps"]
    assert steps == one.provenance["schedule"]["optimizer_steps"] == EPOCHS * 9  # 540 cells / 64
    best_one, best_two = h_ray.best_val, h_two.best_val
    assert abs(best_two - best_one) / abs(best_one) < 0.01, (best_two, best_one)


def test_worker_failure_resumes_from_checkpoint(local_ray, tmp_path):
    from censusvi.train.ray_trainer import pretrain_distributed

    class FailOnce:  # defined here: cloudpickle sends it by value (workers cannot import tests)
        """An ``on_epoch_end`` callback that logs each epoch a worker finishes and fails the worker
        group once, after epoch ``epoch``'s checkpoint (a marker file remembers it failed)."""

        def __init__(self, epoch: int, marker: Path, log: Path) -> None:
            self.epoch, self.marker, self.log = epoch, marker, log

        def __call__(self, stats: EpochStats) -> None:
            with self.log.open("a") as f:
                f.write(f"{stats.epoch}\n")
            if stats.epoch == self.epoch and not self.marker.exists():
                self.marker.write_text(f"worker failed after epoch {stats.epoch}")
                raise RuntimeError(f"injected worker failure after epoch {stats.epoch}")

    a = simulated_adata(n_cells=200)
    a.write_h5ad(tmp_path / "x.h5ad")
    marker, log = tmp_path / "failed.txt", tmp_path / "epochs.txt"
    model, history = pretrain_distributed(
        small_cfg(str(tmp_path / "x.h5ad"), epochs=4),
        str(tmp_path / "m"),
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
        max_failures=2,
        stream={"mode": "ray_data"},
        on_epoch_end=(FailOnce(1, marker, log),),
    )
    assert marker.read_text() == "worker failed after epoch 1"  # it really failed mid-run
    finished = sorted(int(e) for e in log.read_text().split())
    assert finished == [0, 0, 1, 1, 2, 2, 3, 3]  # each epoch once per worker: 0-1 not redone
    assert [e.epoch for e in history.epochs] == [0, 1, 2, 3]
    assert history.epochs[-1].val_elbo < history.epochs[0].val_elbo
    provenance = load_model(tmp_path / "m").provenance
    assert provenance["epochs"] == 4 and provenance["restarts_from_checkpoint"] == 1
    assert provenance["resubmissions"] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]


def test_file_uri_storage_resumes_a_resubmitted_run(local_ray, tmp_path):
    """Storage given as a file:// URI reaches Ray Train as a URI; the run's name comes from its
    fingerprint, so submitting the same run again (with more epochs: the stopping rules are no
    part of a run's identity) resumes it from storage instead of starting at epoch 0."""
    from censusvi.train.ray_trainer import pretrain_distributed

    class LogEpochs:
        def __init__(self, log: Path) -> None:
            self.log = log

        def __call__(self, stats: EpochStats) -> None:
            with self.log.open("a") as f:
                f.write(f"{stats.epoch}\n")

    src, log = tmp_path / "x.h5ad", tmp_path / "epochs.txt"
    simulated_adata(n_cells=150).write_h5ad(src)
    storage = f"file://{tmp_path}/store"

    def submit(epochs: int):
        cfg = small_cfg(str(src), epochs=epochs)
        return pretrain_distributed(
            cfg,
            str(tmp_path / "m"),
            num_workers=1,
            storage_path=storage,
            on_epoch_end=(LogEpochs(log),),
        )

    first, h1 = submit(2)
    second, h2 = submit(3)
    assert [int(e) for e in log.read_text().split()] == [0, 1, 2]  # epochs 0-1 not redone
    assert [e.epoch for e in h2.epochs] == [0, 1, 2] and h2.epochs[:2] == h1.epochs
    name = first.provenance["ray_run_name"]
    assert second.provenance["ray_run_name"] == name and name.startswith("censusvi-x.h5ad-")
    assert second.provenance["resubmissions"] == 1
    assert second.provenance["restarts_from_checkpoint"] == 0
    assert second.provenance["ray_result_path"] == f"{storage}/{name}"
    assert (tmp_path / "store" / name).is_dir()


def test_early_stopping_stops_every_worker(local_ray, tmp_path):
    """The Ray path stops early as ``pretrain`` does (test_train's twin), on every rank."""
    from censusvi.train.ray_trainer import pretrain_distributed

    simulated_adata(n_cells=200).write_h5ad(tmp_path / "x.h5ad")
    cfg = small_cfg(str(tmp_path / "x.h5ad"), epochs=10)
    # min_delta so large that no epoch after the first counts as an improvement
    cfg = replace(cfg, train=replace(cfg.train, early_stopping=True, patience=2, min_delta=1e9))
    model, history = pretrain_distributed(
        cfg, str(tmp_path / "m"), num_workers=2, storage_path=str(tmp_path / "ray")
    )
    assert history.stopped_early and [e.epoch for e in history.epochs] == [0, 1, 2]
    assert model.provenance["epochs"] == 3


def test_nan_guard_stops_every_worker_without_retries(local_ray, tmp_path):
    """A diverged run raises the single-process guard's error; the workers stop together (the
    guard reads the loss summed over ranks) and are not restarted to diverge again."""
    from censusvi.train.ray_trainer import pretrain_distributed

    simulated_adata(n_cells=200).write_h5ad(tmp_path / "x.h5ad")
    cfg = small_cfg(str(tmp_path / "x.h5ad"), epochs=3)
    cfg = replace(cfg, train=replace(cfg.train, lr=1e6))
    message = r"training loss became nan at epoch 0; lower the learning rate \(lr=1000000.0\)"
    with pytest.raises(FloatingPointError, match=message):
        pretrain_distributed(
            cfg, str(tmp_path / "m"), num_workers=2, storage_path=str(tmp_path / "ray")
        )
    assert not (tmp_path / "m").exists()


def test_rerun_of_a_run_name_on_changed_data_is_refused(local_ray, tmp_path):
    """Ray resumes a run of the same name from its last checkpoint, which carries the run's
    fingerprint: on changed data the workers refuse it as ``censusvi pretrain`` does."""
    from censusvi.train.ray_trainer import pretrain_distributed

    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120).write_h5ad(src)
    ray_dir = tmp_path / "ray"
    run = {"num_workers": 1, "storage_path": str(ray_dir), "run_name": "r", "max_failures": 0}
    pretrain_distributed(small_cfg(str(src), epochs=1), str(tmp_path / "m1"), **run)
    simulated_adata(n_cells=120, seed=1).write_h5ad(src)  # same cells and genes, other counts
    with pytest.raises(ValueError) as refused:
        pretrain_distributed(small_cfg(str(src), epochs=2), str(tmp_path / "m2"), **run)
    message = str(refused.value)
    assert f"the source {src.resolve()} changed since checkpoint" in message
    assert f"pass another run_name to start over (or delete {ray_dir / 'r'})" in message


@pytest.mark.parametrize(
    ("device", "use_gpu", "workers_on"),
    [
        ("cpu", False, "cpu"),
        ("cpu", True, "cuda"),
        ("cuda", True, "cuda"),
        ("cuda:1", True, "cuda"),
    ],
)
def test_workers_device(device, use_gpu, workers_on):
    from censusvi.train.ray_trainer import workers_device

    assert workers_device(device, use_gpu) == workers_on


def test_cuda_without_gpus_is_refused_before_training(tmp_path):
    from censusvi.train.ray_trainer import pretrain_distributed

    cfg = small_cfg(str(tmp_path / "x.h5ad"))
    cfg = replace(cfg, train=replace(cfg.train, device="cuda"))
    with pytest.raises(ValueError, match=r"train.device='cuda' but use_gpu is false"):
        pretrain_distributed(cfg, str(tmp_path / "m"), num_workers=1)
    with pytest.raises(ValueError, match=r"train.device='mps': Ray workers train on cpu or cuda"):
        pretrain_distributed(
            replace(cfg, train=replace(cfg.train, device="mps")), str(tmp_path / "m")
        )


def test_more_workers_than_the_cluster_holds_is_said_before_ray_train_waits(local_ray, caplog):
    """train.num_workers=4 on a 2-CPU local Ray: Ray Train retried its worker group for ever
    with nothing in the job's log to say why (a hostile probe, session 21)."""
    from censusvi.train.ray_trainer import _warn_if_short

    with caplog.at_level("WARNING", logger="censusvi.train.ray_trainer"):
        _warn_if_short(10_000, use_gpu=True)
    assert "train.num_workers=10000 needs 10000 CPUs, the cluster has" in caplog.text
    assert (
        "10000 GPUs, the cluster has 0" in caplog.text and "lower train.num_workers" in caplog.text
    )
