"""Shards of whole chunks (censusvi.data.shards), in the style of tiledbsoma-ml's partition tests:
exact ids per seed and rank, ranks disjoint and covering, reads contiguous, minibatches mixed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from censusvi.data import shards
from censusvi.data.mixing import mixing_ratio
from censusvi.data.ray_stream import pooled_batches


def runs(positions: np.ndarray) -> int:
    """How many contiguous runs of consecutive rows the sorted ``positions`` make."""
    p = np.sort(positions)
    return int(1 + (np.diff(p) != 1).sum()) if len(p) else 0


def test_epoch_chunks_exact_table():
    """10 cells in chunks of 3 (the last one short), 2 ranks: the permutation of seed 0 and 1,
    each rank a contiguous run of it, both cut to the same number of cells."""
    table = {
        (seed, rank): shards.epoch_positions(10, 3, 2, rank, seed).tolist()
        for seed in (0, 1)
        for rank in (0, 1)
    }
    perm0, perm1 = (np.random.default_rng(s).permutation(4).tolist() for s in (0, 1))
    assert perm0 == [2, 0, 1, 3] and perm1 == [0, 1, 2, 3]
    assert table == {
        (0, 0): [6, 7, 8, 0],  # chunks 2, 0 (6 cells), cut to rank 1's 4
        (0, 1): [3, 4, 5, 9],  # chunks 1, 3 (3 is the short one: 1 cell)
        (1, 0): [0, 1, 2, 3],  # chunks 0, 1, cut to 4: cells 4 and 5 sit this epoch out
        (1, 1): [6, 7, 8, 9],
    }


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_are_disjoint_cover_the_corpus_and_read_whole_chunks(world):
    n, chunk = 100_003, 256
    for seed in (0, 7):
        parts = [shards.epoch_positions(n, chunk, world, r, seed) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # equal step counts for DDP
        every = np.concatenate(parts)
        assert len(np.unique(every)) == len(every)  # disjoint
        assert len(every) >= n - world * chunk  # covering, but for < one chunk per rank
        for p in parts:  # whole chunks: one contiguous run per chunk at most
            assert runs(p) <= -(-len(p) // chunk) + 1
    # the old strided shards: every cell of a rank is a run of its own
    assert runs(shards.strided_positions(n, 4, 0)) == n // 4


def test_next_epoch_deals_other_chunks():
    a = shards.epoch_positions(50_000, 256, 4, 1, seed=1)
    b = shards.epoch_positions(50_000, 256, 4, 1, seed=2)
    assert len(np.intersect1d(a, b)) < 0.5 * len(a)


def test_io_groups_hold_whole_chunks_and_stop_at_the_ranks_cells():
    for n in (10_000, 10_050):  # the last chunk whole, or short
        for rank in range(3):
            chunks, cells = shards.epoch_chunks(n, 100, 3, rank, seed=3)
            groups = shards.io_groups(chunks, cells, 100, 8, n)
            got = [shards.chunk_positions(g["chunks"], 100, n)[: g["take"]] for g in groups]
            assert sum(map(len, got)) == cells
            assert np.array_equal(np.concatenate(got), shards.epoch_positions(n, 100, 3, rank, 3))
    assert np.array_equal(np.concatenate([g["chunks"] for g in groups]), chunks[: len(chunks)])
    assert all(len(g["chunks"]) == 8 for g in groups[:-1])


def test_small_corpus_gets_short_chunks():
    assert shards.chunk_size(74_000_000, 8, 256) == 256
    assert shards.chunk_size(3000, 2, 256) == 3000 // (2 * shards.MIN_CHUNKS_PER_RANK)
    assert shards.chunk_size(10, 4, 256) == 1
    with pytest.raises(ValueError, match="shuffle_chunk=0: a chunk needs at least 1 cell"):
        shards.chunk_size(10, 1, 0)


def test_validation_is_whole_chunks_and_the_split_is_exact():
    train, val = shards.split_by_chunks(100_000, 0.9, seed=0)
    assert len(train) == 90_000 and len(val) == 10_000
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100_000))
    assert runs(val) <= 10_000 // 256 + 2  # ~39 chunks, not 10,000 scattered cells
    again = shards.split_by_chunks(100_000, 0.9, seed=0)
    assert np.array_equal(again[1], val)
    parts = [val[shards.val_slice(len(val), 3, r)] for r in range(3)]
    assert np.array_equal(np.concatenate(parts), val)  # contiguous runs per rank, covering
    small_train, small_val = shards.split_by_chunks(1000, 0.9, seed=0)
    assert len(small_val) == 100 and runs(small_val) > 10  # a small corpus: short chunks


def test_chunk_shards_mix_datasets_as_well_as_a_global_shuffle():
    """A Census-like corpus stored dataset after dataset (60 datasets of uneven size): a rank's
    minibatches of 1,024, drawn through the stream's pool from IO groups of 32 chunks of 256,
    mix datasets at >= 0.9 of what a global shuffle of the same cells gives."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(500, 12_000, 60)
    dataset = np.repeat(np.arange(60), sizes)
    n, world, chunk = len(dataset), 4, 256
    for rank in (0, 3):
        chunks, cells = shards.epoch_chunks(n, chunk, world, rank, seed=5)
        blocks = []
        for g in shards.io_groups(chunks, cells, chunk, 32, n):
            pos = np.sort(shards.chunk_positions(g["chunks"], chunk, n)[: g["take"]])
            blocks.append((sp.csr_matrix((len(pos), 1)), dataset[pos][:, None], pos))
        batches = list(pooled_batches(iter(blocks), 1024, 16384, seed=rank))
        got = np.concatenate([p for _, _, p in batches])
        assert len(got) == cells and len(np.unique(got)) == cells
        ratio, ours, shuffled = mixing_ratio([dataset[p] for _, _, p in batches], dataset[got])
        assert ratio >= 0.9, (ours, shuffled)
