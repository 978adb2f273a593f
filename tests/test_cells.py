"""Streaming minibatches: every cell once per epoch, in the model's gene order, datasets mixed."""

from __future__ import annotations

import numpy as np
import pytest

from censusvi.data.cells import Cells
from censusvi.data.soma import SomaSource
from censusvi.data.vocabulary import GeneVocabulary


@pytest.fixture(scope="module")
def soma_cells(soma_exp):
    src = SomaSource(str(soma_exp[0]))
    vocab = GeneVocabulary(tuple(src.var_ids[::7]))  # a subset in another order than the source
    al = vocab.align(src.var_ids, min_overlap=1.0)
    datasets, codes = np.unique(src.obs["dataset_id"].to_numpy(), return_inverse=True)
    return src, al, codes.reshape(-1, 1)


def test_streamed_block_shuffle_covers_every_cell_once(soma_cells):
    src, al, cov = soma_cells
    rows = np.arange(len(src.obs))
    streamed = Cells(src, rows, al, cov, shuffle_chunk=16, io_batch_cells=256, preload=False)
    cached = Cells(src, rows, al, cov, preload=True)
    seen, mixed = [], 0
    reference = cached._read(rows)
    for pos, x, c in streamed.minibatches(64, shuffle=True, seed=3):
        seen.append(pos)
        np.testing.assert_array_equal(x.toarray(), reference[pos].toarray())
        np.testing.assert_array_equal(c, cov[pos])
        mixed += len(np.unique(c)) > 1
    seen = np.concatenate(seen)
    n_empty = int((np.diff(reference.indptr) == 0).sum())
    assert len(seen) == len(np.unique(seen)) == len(rows) - n_empty
    assert mixed > len(rows) // 64 // 3  # block shuffling mixes the two datasets in many batches


def test_same_seed_same_order(soma_cells):
    src, al, cov = soma_cells
    cells = Cells(
        src, np.arange(200), al, cov[:200], shuffle_chunk=8, io_batch_cells=64, preload=False
    )
    first = [p for p, _, _ in cells.minibatches(32, shuffle=True, seed=1)]
    again = [p for p, _, _ in cells.minibatches(32, shuffle=True, seed=1)]
    other = [p for p, _, _ in cells.minibatches(32, shuffle=True, seed=2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_block_shuffle_mixes_datasets_nearly_as_well_as_a_global_shuffle(soma_cells):
    from censusvi.data.mixing import mixing_ratio

    src, al, cov = soma_cells
    rows = np.arange(len(src.obs))  # stored dataset by dataset, as the Census is
    contiguous = [cov[rows[i : i + 64], 0] for i in range(0, len(rows), 64)]
    ratio_contiguous, _, _ = mixing_ratio(contiguous, cov[:, 0])
    streamed = Cells(src, rows, al, cov, shuffle_chunk=16, io_batch_cells=512, preload=False)
    batches = [c[:, 0] for _, _, c in streamed.minibatches(64, shuffle=True, seed=0)]
    ratio, loader, global_shuffle = mixing_ratio(batches, cov[:, 0])
    print(f"mixing: block shuffle {loader:.3f} bits vs global {global_shuffle:.3f} (ratio {ratio:.2f}); "
          f"contiguous reads {ratio_contiguous:.2f}")  # fmt: skip
    assert ratio_contiguous < 0.1  # what reading blocks without shuffling would give
    assert ratio >= 0.9


def test_pooled_batches_yield_every_row_once_and_mix_blocks():
    """The Ray stream's consumer-side pool: each row comes out exactly once with its own counts,
    covariates and position, in full minibatches but the last, and a minibatch mixes several
    single-dataset blocks where cutting the blocks in order would give one dataset each."""
    import scipy.sparse as sp

    from censusvi.data.ray_stream import pooled_batches

    def block(b: int):
        pos = np.arange(b * 100, (b + 1) * 100)
        x = sp.csr_matrix((pos.astype(np.float32) + 1, pos % 7, np.arange(101)), shape=(100, 7))
        return x, np.full((100, 1), b), pos

    out = list(pooled_batches((block(b) for b in range(8)), 50, 300, seed=0))
    pos = np.concatenate([p for _, _, p in out])
    assert sorted(pos) == list(range(800)) and not np.array_equal(pos, np.arange(800))
    assert [x.shape[0] for x, _, _ in out] == [50] * 16
    for x, cov, p in out:
        assert np.array_equal(x.toarray()[np.arange(len(p)), p % 7], p + 1)
        assert np.array_equal(cov[:, 0], p // 100)
    distinct = np.mean([len(np.unique(cov)) for _, cov, _ in out])
    assert distinct >= 3.0, distinct
    assert len(list(pooled_batches(iter(()), 50, 300, seed=0))) == 0
