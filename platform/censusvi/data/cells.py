"""The cells a model reads: a source, which of its rows, the gene alignment and covariate codes.

``Cells.minibatches`` yields shuffled CSR minibatches in the model's gene order. Small selections
are read once and kept (aligned, so ~10 % of dense size); large ones are streamed with block
shuffling as TileDB-SOMA-ML does: rows are cut into contiguous chunks, chunks are shuffled and
grouped into IO batches that are read sorted (contiguous on disk) and shuffled in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from censusvi.data.counts import check_counts
from censusvi.data.source import CellSource, select_genes
from censusvi.data.vocabulary import GeneAlignment

log = logging.getLogger(__name__)
PRELOAD_MAX_CELLS = 2_000_000  # ~1.6 GB of CSR at 8,000 genes and 10 % density


@dataclass
class Cells:
    source: CellSource
    rows: np.ndarray  # sorted positions into source.obs
    alignment: GeneAlignment
    covariates_nc: np.ndarray  # (len(rows), c) integer codes; column 0 is the batch
    shuffle_chunk: int = 256  # shorter runs read slower per cell (whole TileDB tiles decoded)
    io_batch_cells: int = 65536
    preload: bool | None = None
    _cache: sp.csr_matrix | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.covariates_nc):
            raise ValueError(f"{len(self.rows)} rows but {len(self.covariates_nc)} covariate rows")
        if self.preload is None:
            self.preload = len(self.rows) <= PRELOAD_MAX_CELLS

    def __len__(self) -> int:
        return len(self.rows)

    def non_empty_matrix(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """All aligned counts and covariates, cells with no counts left out (for device caches)."""
        x = self._read(np.arange(len(self.rows)))
        keep = np.diff(x.indptr) > 0
        if not keep.all():
            log.warning(
                "%s: left out %d cells with zero counts over the model's genes",
                self.source.uri,
                int((~keep).sum()),
            )
        return x[keep], self.covariates_nc[keep]

    def read(self, positions: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
        """Aligned counts and covariate codes of chosen cells (``positions`` sorted)."""
        return self._read(positions), self.covariates_nc[positions]

    def _read(self, positions: np.ndarray) -> sp.csr_matrix:
        """Aligned counts of ``self.rows[positions]`` (positions sorted)."""
        if self.preload:
            if self._cache is None:
                self._cache = self._read_source(np.arange(len(self.rows)))
            return self._cache[positions]
        return self._read_source(positions)

    def _read_source(self, positions: np.ndarray) -> sp.csr_matrix:
        out = []
        for start in range(0, len(positions), self.io_batch_cells):
            rows = self.rows[positions[start : start + self.io_batch_cells]]
            x = self.source.read_rows(rows)
            check_counts(x, f"{self.source.uri} (cells {rows[0]}..{rows[-1]})")
            out.append(select_genes(x, self.alignment))
        return sp.vstack(out, format="csr") if len(out) != 1 else out[0]

    def io_groups(self, shuffle: bool, rng: np.random.Generator) -> list[np.ndarray]:
        """The positions read together: with ``shuffle``, random contiguous chunks of
        ``shuffle_chunk`` cells, ``io_batch_cells`` per group (each chunk is one contiguous read;
        a group spans the whole corpus, so its cells mix datasets)."""
        n = len(self.rows)
        if self.preload or not shuffle:
            order = rng.permutation(n) if shuffle else np.arange(n)
            if self.preload:
                return [order]
            return np.array_split(order, max(1, -(-n // self.io_batch_cells)))
        starts = np.arange(0, n, self.shuffle_chunk)
        chunks = [np.arange(s, min(s + self.shuffle_chunk, n)) for s in rng.permutation(starts)]
        per_io = max(1, self.io_batch_cells // self.shuffle_chunk)
        return [np.concatenate(chunks[i : i + per_io]) for i in range(0, len(chunks), per_io)]

    def minibatches(
        self, batch_size: int, shuffle: bool, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, sp.csr_matrix, np.ndarray]]:
        """(positions into ``rows``, counts, covariate codes) per minibatch, none empty; cells
        with no counts are dropped and logged."""
        rng = np.random.default_rng(seed)
        groups = self.io_groups(shuffle, rng)
        n_empty = 0
        for group in groups:
            sorted_pos = np.sort(group)
            x = self._read(sorted_pos)
            perm = rng.permutation(len(sorted_pos)) if shuffle else np.arange(len(sorted_pos))
            for start in range(0, len(perm), batch_size):
                sel = perm[start : start + batch_size]
                pos, xb = sorted_pos[sel], x[sel]
                keep = np.diff(xb.indptr) > 0
                if not keep.all():
                    n_empty += int((~keep).sum())
                    pos, xb = pos[keep], xb[keep]
                if shuffle and xb.shape[0] < 3:
                    continue  # batch norm needs >1 cell; scvi-tools also skips tiny last batches
                if not len(pos):
                    continue  # every cell of this slice was empty
                yield pos, xb, self.covariates_nc[pos]
        if n_empty:
            log.warning(
                "%s: skipped %d cells with zero counts over the model's genes",
                self.source.uri,
                n_empty,
            )
