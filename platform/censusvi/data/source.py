"""What every cell source (h5ad in memory or backed, TileDB-SOMA on disk or a Census URI) offers.

A source is a table of cells (``obs``, already filtered) and genes (``var_ids``/``var_symbols``;
``var_keys``, every name the genes have, for alignment) and one way to read counts: ``read_rows(rows)`` for sorted row positions into ``obs``, returning
float32 CSR over the source's own genes. Loaders, HVG selection and embedding work on this alone.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd
import scipy.sparse as sp

from censusvi.data.vocabulary import GeneAlignment


class CellSource(Protocol):
    uri: str
    obs: pd.DataFrame
    var_ids: list[str]
    var_symbols: list[str]
    var_keys: dict[str, list[str]]  # every name of the genes, for alignment (data.h5ad.gene_keys)

    def read_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of the cells at these sorted positions of ``obs``, all of the source's genes."""
        ...


def batch_labels(obs: pd.DataFrame, keys: list[str] | tuple[str, ...], where: str) -> np.ndarray:
    """One batch label per cell: the string concatenation of ``keys`` (no separator, as the
    Census); cells of one batch share one string object."""
    labels, codes = batch_categories(obs, keys, where)
    return labels.astype(object)[codes]


def check_batch_given(
    obs: pd.DataFrame, key: str, what: str = "query cells", where: str = "", role: str = "batch"
) -> None:
    """A ValueError counting the cells whose ``key`` is missing (NaN): a NaN is not a batch
    called "nan". One rule for the command line, the Python API and the server's uploads."""
    if missing := int(obs[key].isna().sum()):
        give = "its batch (e.g. its sample or library)" if role == "batch" else "a value"
        raise ValueError(
            f"{where}{': ' if where else ''}{missing} of {len(obs)} {what} have no {key!r} "
            f"(NaN): give every cell {give}, or one shared value, or leave those cells out"
        )


def batch_categories(
    obs: pd.DataFrame,
    keys: list[str] | tuple[str, ...],
    where: str,
    role: str = "batch",
    missing_ok: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct batch labels, sorted; each cell's index into them), as ``np.unique`` of
    ``batch_labels`` gives, without building a string per cell: at Census scale that is 74 M
    strings for a few thousand batches. Each key is factorised, the codes combined, and only
    the combinations that occur are spelled out. A missing value (NaN) in a batch or covariate
    column is refused, not made a batch called "nan"; HVG strata (``role='HVG'``) keep it as a
    category, and ``missing_ok`` leaves the refusal to the caller (``codes_in``)."""
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise ValueError(
            f"{where}: {role} column(s) {missing} not in obs; obs has {sorted(obs.columns)}. "
            f"Choose the {role} columns from those."
        )
    if role != "HVG" and not missing_ok:
        for k in keys:
            check_batch_given(obs, k, "cells", where, role)
    combined = np.zeros(len(obs), dtype=np.int64)  # codes in order of first appearance
    for k in keys:
        codes, uniques = pd.factorize(obs[k], use_na_sentinel=False)
        combined = pd.factorize(combined * len(uniques) + codes)[0]  # stays below n
    first = np.flatnonzero(np.diff(np.maximum.accumulate(combined), prepend=-1))
    labels = np.full(len(first), "", dtype=object)
    for k in keys:
        labels = labels + obs[k].iloc[first].astype(str).to_numpy(dtype=object)
    order = np.argsort(labels.astype(str), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return labels[order].astype(str), rank[combined]


def codes_in(
    obs: pd.DataFrame,
    keys: list[str] | tuple[str, ...],
    known: tuple[str, ...],
    where: str,
    role: str = "batch",
) -> tuple[np.ndarray, list[str]]:
    """(each cell's index into ``known``, a model's categories, for the label ``keys`` spell;
    the labels ``known`` lacks, sorted). Cells with such a label get -1: the caller says what
    that means (map the batch, or refuse). One dictionary lookup per distinct label. A cell with
    a missing value (NaN) is refused as such, unless ``known`` holds the label it spells (an
    older censusvi trained such cells as a batch "nan")."""
    labels, codes = batch_categories(obs, keys, where, role, missing_ok=True)
    lookup = {c: i for i, c in enumerate(known)}
    per_label = np.array([lookup.get(v, -1) for v in labels.tolist()], dtype=np.int64)
    cell = per_label[codes]
    if (cell < 0).any():  # only then can a NaN be what the model lacks
        missing = obs[list(keys)].isna().to_numpy().any(axis=1)
        if (cell[missing] < 0).any():
            for k in keys:
                check_batch_given(obs, k, "cells", where, role)
    return cell, labels[per_label < 0].tolist()


def select_genes(x: sp.csr_matrix, alignment: GeneAlignment) -> sp.csr_matrix:
    """Reorder columns to the model's gene order; absent model genes become all-zero columns.

    Linear in the non-zeros and without a sort (it runs on every block read for training): the
    kept entries keep their row order, so the row pointers are the running count of kept entries.
    """
    index = alignment.data_index
    if len(index) == x.shape[1] and np.array_equal(index, np.arange(len(index))):
        return x.astype(np.float32, copy=False)  # the data's genes are the model's, in order
    remap = np.full(x.shape[1], -1, dtype=np.int64)
    present = np.flatnonzero(index >= 0)
    remap[index[present]] = present
    new_col = remap[x.indices]
    keep = new_col >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    out = sp.csr_matrix(
        (x.data[keep].astype(np.float32, copy=False), new_col[keep], kept_before[x.indptr]),
        shape=(x.shape[0], len(index)),
    )
    if not x.has_canonical_format:
        out.sum_duplicates()  # the input repeated entries (legal in CSR): add them up as before
    return out
