"""Training minibatches streamed through Ray Data.

Each epoch, a rank's share of whole chunks (``shards.epoch_chunks``: a global permutation of
chunks, a contiguous run of it per rank) is cut into IO groups of chunks from across the corpus,
each read in storage order by one Ray Data read task, which opens the count matrix itself (for
SOMA: X and var, never obs), keeps only the model's genes and returns the group's cells as one
Arrow block: list columns hold the CSR rows, so
nothing is densified before the device. The worker mixes whole blocks in a pool of CSR rows
(``pooled_batches``) and draws its minibatches from it. Memory stays bounded by Ray Data's
backpressure (blocks in flight) plus the pool, whatever the corpus size; reads run in other
processes while the worker trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from censusvi.data.shards import CellPlan, chunk_size, epoch_chunks, io_groups
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


def arrow_to_csr(table: pa.Table, n_genes: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The inverse of ``csr_to_arrow``: (CSR, covariate codes, positions), zero-copy where Arrow
    allows (slices are respected). Index arrays stay int32 so scipy does not widen them."""
    indices, counts = _one_chunk(table.column("indices")), _one_chunk(table.column("counts"))
    offsets = indices.offsets.to_numpy()
    indptr = offsets - offsets[0] if offsets[0] else offsets
    x = sp.csr_matrix(
        (counts.flatten().to_numpy(), indices.flatten().to_numpy(), indptr),
        shape=(len(table), n_genes),
    )
    cov = _one_chunk(table.column("covariates"))
    width = cov.type.list_size
    cov_nc = cov.flatten().to_numpy().reshape(len(table), width).astype(np.int64)
    return x, cov_nc, table.column("position").to_numpy()


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array; ``combine_chunks`` copies even a single chunk (a whole block's
    counts, every block)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


Rows = tuple[sp.csr_matrix, np.ndarray, np.ndarray]  # counts, covariate codes, positions


def pooled_batches(
    blocks: Iterable[Rows], batch_size: int, pool_cells: int, seed: int
) -> Iterator[Rows]:
    """Minibatches that take an equal share of random rows from every block in the pool.

    A block joins when the rows left in the pool drop under ``pool_cells`` + one minibatch and
    leaves when it is used up; drawing equal shares, the newest blocks outlive the older ones, so
    the pool stays a few blocks from several read tasks (each already spanning many places in the
    corpus) and a minibatch mixes them all. Blocks stay where Ray put them (zero-copy Arrow
    buffers); a row is copied only into its minibatch (a gather per block, then one stack). Ray
    Data's local shuffle buffer, which re-concatenates its buffer, cost the training process
    ~32 µs per cell; with the pool ~14, Ray's iterator included. Every row comes out exactly
    once, in full minibatches but the last."""
    rng = np.random.default_rng(seed)
    blocks = iter(blocks)
    pool: list[tuple[Rows, np.ndarray]] = []  # a block and its rows not yet drawn, shuffled
    exhausted = False
    while True:
        left = sum(len(order) for _, order in pool)
        while not exhausted and left < pool_cells + batch_size:
            block = next(blocks, None)
            if block is None:
                exhausted = True
            elif block[0].shape[0]:
                pool.append((block, rng.permutation(block[0].shape[0])))
                left += block[0].shape[0]
        if not pool:
            return
        take = _equal_shares(np.array([len(order) for _, order in pool]), batch_size)
        parts = [_take(block, order[:k]) for (block, order), k in zip(pool, take) if k]
        pool = [(block, order[k:]) for (block, order), k in zip(pool, take) if len(order) > k]
        yield parts[0] if len(parts) == 1 else _stack(parts)


def _equal_shares(left: np.ndarray, total: int) -> np.ndarray:
    """How many rows to draw from each block: ``total`` split as evenly as the rows ``left``
    in each allow (all of them when fewer than ``total`` are left)."""
    take = np.zeros_like(left)
    want = min(total, int(left.sum()))
    while (gap := want - int(take.sum())) > 0:
        open_ = np.flatnonzero(take < left)
        share = np.full(len(open_), gap // len(open_))
        share[: gap % len(open_)] += 1
        take[open_] = np.minimum(left[open_], take[open_] + share)
    return take


def _stack(parts: list[Rows]) -> Rows:
    return (
        sp.vstack([p[0] for p in parts], format="csr"),
        np.concatenate([p[1] for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )


def _take(rows: Rows, idx: np.ndarray) -> Rows:
    return rows[0][idx], rows[1][idx], rows[2][idx]


# glibc gives each of TileDB's decoding threads its own heap arena and keeps what they free: two
# arenas held a reading process at 0.6 GiB instead of 0.9 (8,192-cell reads). Ray merges these
# variables into the job's own.
READ_TASK_ENV = {"env_vars": {"MALLOC_ARENA_MAX": "2"}}


def _read_group(
    batch: dict[str, np.ndarray], cells_ref, alignment_ref, chunk: int, n_cells: int
) -> pa.Table:
    """Ray Data task: one IO group, whole chunks of the training cells read in storage order
    (the worker's pool shuffles them). It gets the driver's ``CellPlan`` by reference (Ray's
    object store, zero-copy) and opens only the count matrix: never obs."""
    import ray

    from censusvi.data.counts import check_counts
    from censusvi.data.shards import chunk_positions
    from censusvi.data.source import select_genes

    plan: CellPlan = ray.get(cells_ref)
    alignment: GeneAlignment = ray.get(alignment_ref)
    take = int(batch["take"][0])
    positions = np.sort(chunk_positions(batch["chunks"][0], chunk, n_cells)[:take])
    rows = plan.train_rows[positions]
    src = plan.source
    x = src.read_rows(rows)
    check_counts(x, f"{src.uri} (cells {src.ids[rows[0]]}..{src.ids[rows[-1]]})")
    x = select_genes(x, alignment)
    return csr_to_arrow(x, plan.train_cov[positions], positions)


class CellStream:
    """One rank's training cells as a fresh Ray Dataset each epoch (``epoch(seed)``).

    ``cells_ref``: the driver's ``CellPlan`` in the object store. Each epoch the training cells'
    chunks (``chunk`` cells) are permuted by ``seed`` (the same on every rank) and the rank takes
    its contiguous run of them (``shards.epoch_chunks``); ``io_batch_cells`` of them make one read
    task. This process holds only chunk numbers, never a per-cell array. ``read_cpus`` is what
    each read task reserves: 0 by default, because the training workers usually hold every CPU
    and the reads mostly wait on storage; ``concurrency``: read tasks in flight.
    """

    def __init__(
        self,
        cells_ref,
        n_cells: int,
        alignment: GeneAlignment,
        rank: int = 0,
        world: int = 1,
        chunk: int = 256,
        io_batch_cells: int = 8192,
        read_cpus: float = 0.0,
        concurrency: int = 2,
    ) -> None:
        import ray

        self.cells_ref, self.n_cells, self.rank, self.world = cells_ref, n_cells, rank, world
        self.chunk = chunk_size(n_cells, world, chunk)
        self.per_group = max(1, io_batch_cells // self.chunk)
        self.read_cpus, self.concurrency = read_cpus, concurrency
        self._alignment = ray.put(alignment)

    def groups(self, seed: int) -> list[dict]:
        """The epoch's read tasks: chunk numbers and how many of their cells to keep."""
        chunks, cells = epoch_chunks(self.n_cells, self.chunk, self.world, self.rank, seed)
        return io_groups(chunks, cells, self.chunk, self.per_group, self.n_cells)

    def epoch(self, seed: int):
        import ray

        items = self.groups(seed)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        return ds.map_batches(
            _read_group,
            batch_size=1,
            batch_format="numpy",
            fn_args=(self.cells_ref, self._alignment, self.chunk, self.n_cells),
            num_cpus=self.read_cpus,
            concurrency=self.concurrency,
            runtime_env=READ_TASK_ENV,
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

    for x, cov, _ in stream_rows(ds, batch_size, n_genes, seed, shuffle_buffer_cells):
        if x.shape[0] < 3:
            continue
        keep = np.diff(x.indptr) > 0
        if not keep.all():
            x, cov = x[keep], cov[keep]
        yield minibatch_from_csr(x, cov, device, with_counts=with_counts)


def stream_rows(
    ds, batch_size: int, n_genes: int, seed: int, shuffle_buffer_cells: int
) -> Iterator[Rows]:
    """The epoch's cells as (CSR, covariates, positions) minibatches, mixed through the pool."""
    blocks = (
        arrow_to_csr(t, n_genes)
        for t in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    )
    return pooled_batches(blocks, batch_size, shuffle_buffer_cells, seed)
