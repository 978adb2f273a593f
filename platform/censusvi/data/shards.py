"""Shards of whole chunks, and the cells a process reads without obs.

The driver reads obs once and decides the run's cells (``RunPlan``); every other process (Ray
Train workers, their read tasks, the HVG tasks) reads counts by the row ids it was sent, through
``PlannedSource``, and never opens obs.

Cells are cut into chunks of consecutive rows (``chunk`` cells; storage order, so a chunk is one
contiguous read). Each epoch a seeded permutation of all the chunks is dealt out: rank ``r`` takes
the ``r``-th contiguous run of it (``epoch_chunks``), as tiledbsoma-ml's DDP partitioning does.
Ranks are disjoint and cover the corpus; each rank's chunks are spread over it (so its
minibatches mix datasets), and each chunk is read whole (so ranks do not decode each other's
tiles, as ``rows[rank::world]`` made them). The validation cells are whole chunks too
(``split_by_chunks``), each rank a contiguous run of them (``val_slice``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

MIN_CHUNKS_PER_RANK = 16  # a small corpus gets shorter chunks, so that every rank gets many
SPLIT_CHUNKS = 200  # at least this many chunks to split off validation (small corpora)


def chunk_size(n_cells: int, world: int, want: int) -> int:
    """``want`` cells per chunk, shortened so that each of ``world`` ranks gets at least
    ``MIN_CHUNKS_PER_RANK`` chunks (a corpus of a few thousand cells has no locality to keep)."""
    if want < 1:
        raise ValueError(f"shuffle_chunk={want}: a chunk needs at least 1 cell")
    return max(1, min(want, n_cells // (world * MIN_CHUNKS_PER_RANK)))


def n_chunks(n_cells: int, chunk: int) -> int:
    return -(-n_cells // chunk)


def chunk_positions(chunks: np.ndarray, chunk: int, n_cells: int) -> np.ndarray:
    """The positions of ``chunks``' cells, chunk after chunk in the given order."""
    chunks = np.asarray(chunks, dtype=np.int64)
    if not len(chunks):
        return np.zeros(0, dtype=np.int64)
    starts = chunks * chunk
    lengths = np.minimum(starts + chunk, n_cells) - starts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets


def _runs(n_items: int, world: int) -> np.ndarray:
    """Bounds of ``world`` contiguous runs of ``n_items`` (sizes differ by at most one)."""
    return np.array([(n_items * r) // world for r in range(world + 1)])


def epoch_chunks(
    n_cells: int, chunk: int, world: int, rank: int, seed: int
) -> tuple[np.ndarray, int]:
    """(rank ``rank``'s chunks this epoch, in the order drawn; the cells every rank takes).

    One permutation of all chunks from ``seed`` (the same on every rank), then contiguous runs
    of it. The runs differ by one chunk at most, and the last chunk may be short, so every rank
    takes only the first ``cells`` of its chunks' cells: DDP needs equal step counts."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    perm = np.random.default_rng(seed).permutation(n_chunks(n_cells, chunk))
    bounds = _runs(len(perm), world)
    last = n_chunks(n_cells, chunk) - 1
    tail = n_cells - last * chunk  # cells of the last (maybe short) chunk
    cells = []
    for r in range(world):
        run = perm[bounds[r] : bounds[r + 1]]
        cells.append(len(run) * chunk - (chunk - tail if (run == last).any() else 0))
    return perm[bounds[rank] : bounds[rank + 1]], int(min(cells))


def epoch_positions(n_cells: int, chunk: int, world: int, rank: int, seed: int) -> np.ndarray:
    """The positions rank ``rank`` trains on this epoch (chunk after chunk, as drawn)."""
    chunks, cells = epoch_chunks(n_cells, chunk, world, rank, seed)
    return chunk_positions(chunks, chunk, n_cells)[:cells]


def io_groups(
    chunks: np.ndarray, cells: int, chunk: int, per_group: int, n_cells: int
) -> list[dict]:
    """The epoch's read tasks: ``per_group`` consecutive drawn chunks each (so each spans the
    corpus), and how many of their cells to keep (the last group is cut at ``cells``)."""
    out, taken = [], 0
    for i in range(0, len(chunks), per_group):
        group = np.asarray(chunks[i : i + per_group], dtype=np.int64)
        size = int((np.minimum(group * chunk + chunk, n_cells) - group * chunk).sum())
        take = min(size, cells - taken)
        if take <= 0:
            break
        out.append({"chunks": group, "take": take})
        taken += take
    return out


def split_by_chunks(
    n_cells: int, train_fraction: float, seed: int, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions), both sorted: chunks in a ``seed`` order, the
    first ``train_fraction`` of the cells for training. Validation is whole chunks (but one),
    so it is read in contiguous runs too; a small corpus gets chunks short enough to give
    ``SPLIT_CHUNKS`` of them."""
    n_train = n_cells if train_fraction >= 1 else max(1, int(round(n_cells * train_fraction)))
    chunk = max(1, min(chunk, n_cells // SPLIT_CHUNKS))
    perm = np.random.default_rng(seed).permutation(n_chunks(n_cells, chunk))
    order = chunk_positions(perm, chunk, n_cells)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def val_slice(n_val: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s contiguous run of the (sorted) validation positions."""
    bounds = _runs(n_val, world)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def strided_positions(n_cells: int, world: int, rank: int) -> np.ndarray:
    """The shards before chunk shards (``rows[rank::world]``), kept for bench/ingest.py's
    comparison only: every chunk of a rank spans ``world`` times as many rows."""
    per_rank = n_cells // world
    return np.arange(rank, n_cells, world)[:per_rank]


@dataclass
class PlannedSource:
    """A cell source without obs, for processes other than the driver: row ``i`` is the
    driver's ``ids[i]`` (a SOMA joinid; for an .h5ad, its row after the filter). It opens the
    count matrix (and var) on first read, in the process that reads; pickles small but for
    ``ids`` (zero-copy out of Ray's object store)."""

    uri: str
    obs_filter: str | None
    layer: str | None
    soma: bool
    ids: np.ndarray
    var_ids: list[str]
    var_symbols: list[str]
    _reader: object = field(default=None, repr=False, compare=False)

    obs = None  # never read here: the driver's plan holds the cells

    @property
    def var_keys(self) -> dict[str, list[str]]:
        from censusvi.data.vocabulary import var_column_key

        return {
            var_column_key("feature_id"): self.var_ids,
            var_column_key("feature_name"): self.var_symbols,
        }

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def reader(self):
        if self._reader is None:
            self._reader = open_reader(self.uri, self.obs_filter, self.layer, self.soma)
        return self._reader

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of rows ``rows`` (sorted), every gene of the source."""
        return read_ids(self.reader(), self.soma, self.ids[rows])


_READERS: dict[tuple, object] = {}  # one open count matrix per process and source


def open_reader(uri: str, obs_filter: str | None, layer: str | None, soma: bool):
    """SOMA: the count matrix and var (``SomaX``), never obs. An .h5ad (a file, not a corpus)
    opens as a source, its obs included."""
    key = (uri, obs_filter, layer, soma)
    if key not in _READERS:
        from censusvi.data.soma import X_LAYER, SomaX, open_source

        _READERS[key] = (
            SomaX(uri, layer or X_LAYER) if soma else open_source(uri, obs_filter, layer)
        )
    return _READERS[key]


def read_ids(reader, soma: bool, ids: np.ndarray) -> sp.csr_matrix:
    """Counts of the cells ``ids`` (sorted) through ``open_reader``'s reader."""
    return reader.read(ids) if soma else reader.read_rows(ids)


def planned_source(source, obs_filter: str | None, layer: str | None) -> PlannedSource:
    """The driver's ``source`` (opened with ``obs_filter`` and ``layer``) as a
    ``PlannedSource`` over the same rows."""
    from censusvi.data.soma import SomaSource

    soma = isinstance(source, SomaSource)
    n = len(source.obs)
    ids = source.joinids(np.arange(n)) if soma else np.arange(n, dtype=np.int64)
    return PlannedSource(
        source.uri, obs_filter, layer, soma, ids, list(source.var_ids), list(source.var_symbols)
    )


@dataclass(frozen=True)
class CellPlan:
    """The run's cells as the driver decided them, shipped once through Ray's object store to
    every worker and read task (zero-copy there): rows of ``source`` (positions into its
    ``ids``) and covariate codes, for training and for validation."""

    source: PlannedSource
    train_rows: np.ndarray
    train_cov: np.ndarray
    val_rows: np.ndarray
    val_cov: np.ndarray
