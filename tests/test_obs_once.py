"""The driver reads obs once; HVG tasks, Train workers and their read tasks never open it.

Proven on a real SOMA experiment whose obs is moved away as soon as the driver has read it: every
other process then fails if it tries to read obs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from censusvi.data.ingest import ingest
from censusvi.data.soma import SomaSource
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig
from conftest import simulated_adata

ray = pytest.importorskip("ray")


@pytest.fixture
def small_soma(tmp_path) -> Path:
    """A SOMA experiment of two simulated datasets (600 cells, 200 genes)."""
    files = []
    for i in range(2):
        simulated_adata(n_cells=300, seed=i).write_h5ad(f := tmp_path / f"d{i}.h5ad")
        files.append(f)
    return ingest(files, tmp_path / "exp.soma")


def hide_obs_after_the_driver_reads_it(monkeypatch, exp: Path) -> list[str]:
    """Every SomaSource opened in this process (the driver) reads obs, then obs is moved away:
    another process that opens obs later fails (TileDB: the array does not exist)."""
    opened: list[str] = []
    init = SomaSource.__init__

    def once(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self.uri)
        os.rename(exp / "obs", exp / "obs.moved")

    monkeypatch.setattr(SomaSource, "__init__", once)
    return opened


def test_hvg_tasks_read_only_the_count_matrix_and_select_the_serial_genes(
    local_ray, small_soma, monkeypatch
):
    from censusvi.data.hvg import highly_variable_genes
    from censusvi.data.ray_hvg import ray_reducer
    from censusvi.data.shards import planned_source

    serial = highly_variable_genes(SomaSource(str(small_soma)), 60, ["dataset_id"], block_size=70)
    hide_obs_after_the_driver_reads_it(monkeypatch, small_soma)
    src = SomaSource(str(small_soma))
    import tiledbsoma

    with pytest.raises(Exception, match="does not exist"):  # obs is really gone
        tiledbsoma.Experiment.open(str(small_soma)).obs.read()
    for tasks in (3, None):  # 9 blocks over 3 tasks; the default (2 per cluster CPU)
        distributed = highly_variable_genes(
            src,
            60,
            ["dataset_id"],
            block_size=70,
            reducer=ray_reducer(planned_source(src, None, None), tasks=tasks),
        )
        np.testing.assert_array_equal(distributed.genes, serial.genes)
        np.testing.assert_allclose(distributed.variances_norm, serial.variances_norm, rtol=1e-9)


def test_an_hvg_worker_process_runs_a_bounded_number_of_tasks(local_ray, small_soma, tmp_path):
    """A process runs at most ``CALLS_PER_PROCESS`` HVG tasks and then exits, so the object-store
    pages its tasks' arguments mapped do not pile up as a pass gets more tasks (with N): 12
    one-block tasks here, and a sum that still covers every cell once."""
    from censusvi.data.ray_hvg import CALLS_PER_PROCESS, ray_reducer
    from censusvi.data.shards import planned_source

    src = SomaSource(str(small_soma))
    log = tmp_path / "pids.txt"

    def count_cells(x, code):  # one line per block: the process that read it
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return np.array([x.shape[0]], dtype=np.float64)

    blocks = [(a, min(a + 50, 600)) for a in range(0, 600, 50)]
    reduce = ray_reducer(planned_source(src, None, None), tasks=len(blocks))
    total = reduce(count_cells, blocks, np.zeros(600, dtype=np.int64))
    assert total.tolist() == [600.0]
    per_process = pd.Series(log.read_text().split()).value_counts()
    assert per_process.sum() == len(blocks)
    assert per_process.max() <= CALLS_PER_PROCESS, per_process.to_dict()


def test_training_workers_and_read_tasks_never_open_obs(
    local_ray, small_soma, tmp_path, monkeypatch
):
    """The whole distributed run (HVG passes, two workers, streamed epochs, validation) on an
    experiment whose obs is gone once the driver has planned."""
    from censusvi.train.ray_trainer import pretrain_distributed

    opened = hide_obs_after_the_driver_reads_it(monkeypatch, small_soma)
    cfg = PretrainConfig(
        DataConfig(source=str(small_soma), batch_keys=("dataset_id",), n_hvg=100),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(schedule="census", max_epochs=2, lr=1e-2, batch_size=64, seed=0),
    )
    model, history = pretrain_distributed(
        cfg,
        str(tmp_path / "m"),
        num_workers=2,
        storage_path=str(tmp_path / "ray"),
        stream={"mode": "ray_data", "io_batch_cells": 128, "shuffle_buffer_cells": 128},
    )
    assert opened == [str(small_soma)]  # the driver read obs once
    assert not (small_soma / "obs").exists()
    assert len(history.epochs) == 2 and history.epochs[-1].val_elbo is not None
    assert len(model.genes) == 100 and model.provenance["n_cells"] == 600


def test_stream_deals_each_rank_whole_chunks_every_cell_once_mixed(local_ray, soma_exp):
    """Each epoch two ranks stream disjoint runs of whole chunks covering the training cells,
    with the counts ``Cells.read`` gives (only the model's genes read), in minibatches that mix
    the experiment's datasets as well as a global shuffle (>= 0.9); the next epoch deals
    other chunks."""
    from censusvi.data.mixing import mixing_ratio
    from censusvi.data.ray_stream import CellStream, stream_rows
    from censusvi.train.pretrain import plan_from

    exp = str(soma_exp[0])
    cfg = PretrainConfig(
        DataConfig(source=exp, obs_filter="nnz >= 300", batch_keys=("dataset_id",), n_hvg=300)
    )
    plan = plan_from(cfg)
    _, cells = plan.for_workers()
    ref, n = ray.put(cells), len(cells.train_rows)
    train = plan.cells(plan.train_rows)
    dataset = train.covariates_nc[:, 0]
    epochs = []
    for seed in (1, 2):
        got = []
        for rank in (0, 1):
            stream = CellStream(ref, n, plan.alignment(), rank, 2, chunk=16, io_batch_cells=512)
            batches = list(stream_rows(stream.epoch(seed), 256, len(plan.genes), seed, 1024))
            got.append(np.concatenate([pos for _, _, pos in batches]))
            ratio, ours, shuffled = mixing_ratio([dataset[p] for _, _, p in batches], dataset)
            assert ratio >= 0.9, (ours, shuffled)
        assert len(got[0]) == len(got[1]) and not np.intersect1d(*got).size
        assert len(got[0]) + len(got[1]) > n - 2 * 16
        epochs.append(np.sort(got[0]))
    assert not np.array_equal(*epochs)
    x, cov, pos = batches[0]
    expected, expected_cov = train.read(np.sort(pos))
    order = np.argsort(np.argsort(pos))
    assert (x != expected[order]).nnz == 0 and np.array_equal(cov, expected_cov[order])


def test_obs_read_batch_by_batch_equals_one_read(soma_exp):
    """The driver's obs read merges TileDB's batches into categoricals: the same table as one
    read (here many small batches: 4 KiB buffers)."""
    import tiledbsoma

    from censusvi.data.soma import read_obs

    ctx = tiledbsoma.SOMATileDBContext(tiledb_config={"soma.init_buffer_bytes": 4096})
    exp = tiledbsoma.Experiment.open(str(soma_exp[0]), context=ctx)
    obs = exp.obs
    cols = ["soma_joinid", "dataset_id", "donor_id", "nnz"]
    assert len(list(obs.read(column_names=cols, value_filter="nnz >= 300"))) > 5
    got = read_obs(obs, "nnz >= 300", cols)
    whole = obs.read(column_names=cols, value_filter="nnz >= 300").concat().to_pandas()
    assert isinstance(got["donor_id"].dtype, pd.CategoricalDtype)
    for c in cols:
        assert got[c].astype(str).tolist() == whole[c].astype(str).tolist(), c
    assert read_obs(obs, "nnz < 0", cols).empty
