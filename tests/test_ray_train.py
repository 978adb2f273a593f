"""Distributed pretraining on a local Ray cluster, tracked and registered in a real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest

from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.model.io import load_model
from censusvi.train.loop import TrainConfig
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


def test_one_worker_matches_single_process_elbo(local_ray, tmp_path):
    from censusvi.train.ray_trainer import pretrain_distributed

    a = simulated_adata(n_cells=300)
    a.write_h5ad(tmp_path / "x.h5ad")
    cfg = small_cfg(str(tmp_path / "x.h5ad"), epochs=15)
    _, h_ray = pretrain_distributed(
        cfg, str(tmp_path / "m_ray"), num_workers=1, storage_path=str(tmp_path / "ray")
    )
    _, h_local = pretrain(cfg, tmp_path / "m_local", quiet=True)
    ray_val, local_val = h_ray.epochs[-1].val_elbo, h_local.epochs[-1].val_elbo
    assert abs(ray_val - local_val) / abs(local_val) < 0.01, (ray_val, local_val)


def test_worker_failure_resumes_from_checkpoint(local_ray, tmp_path):
    from censusvi.train.ray_trainer import pretrain_distributed

    a = simulated_adata(n_cells=200)
    a.write_h5ad(tmp_path / "x.h5ad")
    marker = tmp_path / "failed.txt"
    model, history = pretrain_distributed(
        small_cfg(str(tmp_path / "x.h5ad"), epochs=4),
        str(tmp_path / "m"),
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
        max_failures=2,
        inject_failure={"epoch": 2, "marker": str(marker)},
        stream={"mode": "ray_data"},
    )
    assert marker.read_text() == "worker failed at epoch 2"  # it really failed mid-run
    assert [e.epoch for e in history.epochs] == [0, 1, 2, 3]  # and resumed: epochs 0-1 not redone
    assert history.epochs[-1].val_elbo < history.epochs[0].val_elbo
    assert load_model(tmp_path / "m").provenance["epochs"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp")]


def test_hvg_passes_on_ray_data_select_the_same_genes(local_ray, soma_exp):
    """The HVG statistics as Ray Data map_batches + a driver-side reduce equal the serial passes."""
    from censusvi.data.hvg import highly_variable_genes
    from censusvi.data.ray_hvg import ray_reducer
    from censusvi.data.soma import SomaSource

    exp = str(soma_exp[0])
    src = SomaSource(exp)
    serial = highly_variable_genes(src, 500, ["dataset_id"], block_size=700)
    distributed = highly_variable_genes(
        src, 500, ["dataset_id"], block_size=700, reducer=ray_reducer(exp)
    )
    np.testing.assert_array_equal(distributed.genes, serial.genes)
    np.testing.assert_allclose(distributed.variances_norm, serial.variances_norm, rtol=1e-9)


def test_ray_data_stream_yields_every_cell_once_and_mixes_datasets(local_ray, soma_exp):
    """The training stream: each epoch every cell of the worker's shard arrives exactly once,
    with the counts ``Cells.read`` gives, in minibatches that mix the experiment's datasets as
    well as a global shuffle (within 10 %); the next epoch comes in another order."""
    from dataclasses import replace

    from censusvi.data.mixing import mixing_ratio
    from censusvi.data.ray_stream import CellStream, stream_rows
    from censusvi.train.pretrain import plan_from

    exp = str(soma_exp[0])
    cfg = PretrainConfig(
        DataConfig(source=exp, obs_filter="nnz >= 300", batch_keys=("dataset_id",), n_hvg=300)
    )
    plan = plan_from(cfg)
    cells = replace(plan.cells(plan.train_rows), io_batch_cells=512, shuffle_chunk=16)
    stream = CellStream(cells, (exp, "nnz >= 300", None))
    orders = []
    for seed in (1, 2):
        batches = list(stream_rows(stream.epoch(seed), 256, len(plan.genes), seed, 1024))
        orders.append(np.concatenate([pos for _, _, pos in batches]))
    assert sorted(orders[0]) == list(range(len(cells))) and not np.array_equal(*orders)
    assert all(x.shape[0] == 256 for x, _, _ in batches[:-1])
    x, cov, pos = batches[0]
    expected, expected_cov = cells.read(np.sort(pos))
    rank = np.argsort(np.argsort(pos))
    assert (x != expected[rank]).nnz == 0 and np.array_equal(cov, expected_cov[rank])
    dataset = cells.covariates_nc[:, 0]
    ratio, ours, shuffled = mixing_ratio([dataset[pos] for _, _, pos in batches], dataset)
    assert ratio > 0.9, (ours, shuffled)
