"""Training minibatches streamed through Ray Data.

Each epoch, a worker's cells are cut into IO groups (``Cells.io_groups``: random contiguous
chunks from across the corpus, read in storage order) and every group becomes one Ray Data read
task, which opens the count matrix itself (for SOMA: X and var, never obs), aligns the genes to
the model and returns the group's cells
shuffled as one Arrow block: list columns hold the CSR rows, so nothing is densified before the
device. The worker draws minibatches through a local shuffle buffer spanning several blocks.
Memory stays bounded by Ray Data's backpressure (blocks in flight) plus the buffer, whatever the
corpus size; reads run in other processes while the worker trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from censusvi.data.cells import Cells
from censusvi.data.vocabulary import GeneAlignment

if TYPE_CHECKING:  # the read tasks import this module: keep torch out of them
    import torch

    from censusvi.model.minibatch import Minibatch


def csr_to_arrow(x: sp.csr_matrix, covariates_nc: np.ndarray, positions: np.ndarray) -> pa.Table:
    """One row per cell: its position in the worker's cells, gene indices and counts (CSR rows as
    Arrow lists) and covariate codes."""
    offsets = pa.array(x.indptr.astype(np.int32, copy=False))
    cov = np.ascontiguousarray(covariates_nc, dtype=np.int32)
    return pa.table(
        {
            "position": pa.array(positions.astype(np.int64, copy=False)),
            "indices": pa.ListArray.from_arrays(
                offsets, pa.array(x.indices.astype(np.int32, copy=False))
            ),
            "counts": pa.ListArray.from_arrays(
                offsets, pa.array(x.data.astype(np.float32, copy=False))
            ),
            "covariates": pa.FixedSizeListArray.from_arrays(pa.array(cov.ravel()), cov.shape[1]),
        }
    )


def arrow_to_csr(table: pa.Table, n_genes: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """The inverse of ``csr_to_arrow`` (zero-copy where Arrow allows; slices are respected)."""
    indices = table.column("indices").combine_chunks()
    counts = table.column("counts").combine_chunks()
    offsets = indices.offsets.to_numpy()
    indptr = (offsets - offsets[0]).astype(np.int64)
    x = sp.csr_matrix(
        (counts.flatten().to_numpy(), indices.flatten().to_numpy(), indptr),
        shape=(len(table), n_genes),
    )
    cov = table.column("covariates").combine_chunks()
    width = cov.type.list_size
    return x, cov.flatten().to_numpy().reshape(len(table), width).astype(np.int64)


_SOMA_X: dict[tuple[str, str], object] = {}  # one open count matrix per read process


@dataclass(frozen=True)
class ReadPlan:
    """What a read task needs, shipped once through the object store: no source object (tasks
    reopen it) and, for SOMA, joinids instead of obs rows so that tasks never read obs."""

    soma: bool
    rows: np.ndarray  # per position: SOMA joinid, or the h5ad source's row
    alignment: GeneAlignment
    covariates_nc: np.ndarray


def _read_group(
    batch: dict[str, np.ndarray],
    source_args: tuple[str, str | None, str | None],
    plan_ref,
    seed: int,
) -> pa.Table:
    """Ray Data task: the cells of one IO group, read in storage order, shuffled."""
    import ray

    from censusvi.data.counts import check_counts
    from censusvi.data.source import select_genes

    plan: ReadPlan = ray.get(plan_ref)
    positions = np.sort(batch["positions"][0])
    rows = plan.rows[positions]
    uri, obs_filter, layer = source_args
    if plan.soma:
        from censusvi.data.soma import X_LAYER, SomaX

        key = (uri, layer or X_LAYER)
        if key not in _SOMA_X:
            _SOMA_X[key] = SomaX(*key)
        x = _SOMA_X[key].read(rows)
    else:
        from censusvi.data.ray_hvg import _source

        x = _source(uri, obs_filter, layer).read_rows(rows)
    check_counts(x, f"{uri} (cells {rows[0]}..{rows[-1]})")
    x = select_genes(x, plan.alignment)
    cov = plan.covariates_nc[positions]
    perm = np.random.default_rng([seed, int(batch["group"][0])]).permutation(len(positions))
    return csr_to_arrow(x[perm], cov[perm], positions[perm])


class CellStream:
    """One worker's cells as a fresh Ray Dataset each epoch (``epoch(seed)``).

    ``read_cpus`` is what each read task reserves: 0 by default, because the training workers
    usually hold every CPU and the reads mostly wait on storage.
    """

    def __init__(
        self,
        cells: Cells,
        source_args: tuple[str, str | None, str | None],
        read_cpus: float = 0.0,
        concurrency: int = 2,
    ) -> None:
        import ray

        self.cells = replace(cells, preload=False)
        self.source_args = source_args
        self.read_cpus, self.concurrency = read_cpus, concurrency
        from censusvi.data.soma import SomaSource

        src = cells.source
        soma = isinstance(src, SomaSource)
        rows = src.joinids(cells.rows) if soma else cells.rows
        self._plan = ray.put(ReadPlan(soma, rows, cells.alignment, cells.covariates_nc))

    def epoch(self, seed: int):
        import ray

        groups = self.cells.io_groups(True, np.random.default_rng(seed))
        items = [{"group": i, "positions": g} for i, g in enumerate(groups)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(
            _read_group,
            batch_size=1,
            batch_format="numpy",
            fn_args=(self.source_args, self._plan, seed),
            num_cpus=self.read_cpus,
            concurrency=self.concurrency,
        )


def stream_minibatches(
    ds,
    batch_size: int,
    n_genes: int,
    device: torch.device | str,
    seed: int,
    shuffle_buffer_cells: int,
    with_counts: bool = False,
) -> Iterator[Minibatch]:
    """Minibatches of ``batch_size`` rows and a last, smaller one unless it has fewer than 3
    (batch norm needs several; scvi-tools skips them too). Every DDP rank holds the same number
    of cells, so every rank takes the same number of steps. Cells with no counts over the model's
    genes are left out of their minibatch."""
    from censusvi.model.minibatch import minibatch_from_csr

    for table in ds.iter_batches(
        batch_size=batch_size,
        batch_format="pyarrow",
        local_shuffle_buffer_size=shuffle_buffer_cells or None,
        local_shuffle_seed=seed if shuffle_buffer_cells else None,
        prefetch_batches=2,
    ):
        if len(table) < 3:
            continue
        x, cov = arrow_to_csr(table, n_genes)
        keep = np.diff(x.indptr) > 0
        if not keep.all():
            x, cov = x[keep], cov[keep]
        yield minibatch_from_csr(x, cov, device, with_counts=with_counts)
