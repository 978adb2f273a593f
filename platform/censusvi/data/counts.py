"""Checks that a matrix holds raw UMI counts, with errors that say what is wrong and where to look.

scVI's likelihoods are defined on non-negative integers; log-normalised or scaled data train
without error but give a meaningless model, so they are refused here, not downstream.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

MAX_COUNT = 1e9  # no UMI (or read) count of one gene in one cell comes near this


class CountsError(ValueError):
    """The data are not raw counts (or are empty); the message says how to fix it."""


def checked_csr(
    data, indices, indptr, shape: tuple[int, int], where: str, csc: bool = False
) -> sp.csr_matrix:
    """A CSR matrix from its three arrays, built only once their structure is sound.

    scipy trusts ``indices`` and ``indptr``: an index past the last gene or a decreasing
    ``indptr`` later writes out of bounds (``toarray``) or crashes native code, so every decoded
    matrix (wire, .h5ad, SOMA) passes here first. Raises ``CountsError`` saying what is wrong.
    The values are checked apart (``check_counts``), so each caller names where they came from.
    ``csc``: the arrays are a CSC count matrix's, ``shape`` its transpose's (errors say so).
    """
    data, indices, indptr = (np.asarray(a) for a in (data, indices, indptr))
    check_csr(data, indices, indptr, shape, where, csc=csc)
    _check_fits_float32(data, where)
    n, g = int(shape[0]), int(shape[1])
    idx_dtype = np.int64 if max(len(data), g) > np.iinfo(np.int32).max else np.int32
    x = sp.csr_matrix(  # owned, writable copies (sum_duplicates writes into them)
        (np.array(data, np.float32), indices.astype(idx_dtype), indptr.astype(idx_dtype)),
        shape=(n, g),
    )
    x.sum_duplicates()  # a (cell, gene) pair stored twice is one count, summed
    x.eliminate_zeros()  # a stored 0 is no count: a cell of only those is empty, and dropped
    return x


def _check_fits_float32(data: np.ndarray, where: str) -> None:
    """A wider float beyond float32's range would read as infinite after the cast (a count of
    1e308 called "NaN or infinite"): name the count instead."""
    if data.dtype.kind != "f" or data.itemsize <= 4 or not data.size:
        return
    big = data[data > np.finfo(np.float32).max]  # NaN compares False
    if (big := big[np.isfinite(big)]).size:
        raise CountsError(
            f"{where}: a count of {big.max():g} is above {MAX_COUNT:g}; raw UMI counts "
            "are far smaller (the data are scaled or corrupt)"
        )


def check_csr(
    data,
    indices,
    indptr,
    shape: tuple[int, int],
    where: str,
    csc: bool = False,
    axes: tuple[str, str] = ("cell", "gene"),
    numbers: bool = True,
) -> None:
    """Raise ``CountsError`` unless the three arrays are a sound CSR matrix of ``shape`` (for
    CSC, pass the transposed shape and ``csc``); copies nothing, so a file's matrices can be
    checked as read. ``axes`` names the stored matrix's rows and columns (a count matrix's are
    cells and genes, obsp's cells and cells), so the errors speak of what the file holds.
    ``numbers=False`` checks the structure alone (a bool mask layer is sound, just not counts)."""
    n, g = int(shape[0]), int(shape[1])
    index, major, minor = ("row", axes[1], axes[0]) if csc else ("column", *axes)
    data, indices, indptr = (np.asarray(a) for a in (data, indices, indptr))
    for name, a in (("data", data), ("indices", indices), ("indptr", indptr)):
        if a.ndim != 1:
            raise CountsError(f"{where}: CSR {name} must be a flat array, got shape {a.shape}")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):  # indptr: check_indptr
        raise CountsError(f"{where}: CSR indices must hold integers, got {indices.dtype}")
    if numbers and (
        not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating)
    ):
        raise CountsError(f"{where}: CSR data must hold numbers, got {data.dtype}")
    if n < 0 or g < 0:
        raise CountsError(f"{where}: a matrix of shape {(n, g)}; both sides must be >= 0")
    if len(indices) != len(data):
        raise CountsError(
            f"{where}: {len(indices)} {index} indices but {len(data)} values; they pair one to one"
        )
    check_indptr(indptr, n, len(data), where, major)
    if len(indices) and (indices.min() < 0 or indices.max() >= g):
        raise CountsError(
            f"{where}: {index} index out of range ({indices.min()}..{indices.max()}) for {g} "
            f"{minor}s; indices must lie in 0..{g - 1}"
        )


def check_indptr(indptr, n: int, nnz: int, where: str, per: str = "cell") -> None:
    """Raise ``CountsError`` unless ``indptr`` has ``n + 1`` entries rising from 0 to ``nnz``
    (one per ``per``: a count matrix's cell for CSR, gene for CSC). Alone, it checks a backed
    file's pointers once, before any row is read through them."""
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or len(indptr) != n + 1:
        raise CountsError(
            f"{where}: indptr has {len(indptr)} entries for {n} {per}s; it needs {n + 1}"
        )
    if indptr.size and not np.issubdtype(indptr.dtype, np.integer):
        raise CountsError(f"{where}: CSR indptr must hold integers, got {indptr.dtype}")
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise CountsError(
            f"{where}: indptr runs from {indptr[0]} to {indptr[-1]}; it must run from 0 to the "
            f"number of stored values ({nnz})"
        )
    if n and (np.diff(indptr) < 0).any():
        raise CountsError(
            f"{where}: indptr decreases; each {per}'s entries need indptr[i] <= indptr[i + 1]"
        )


def check_counts(x: sp.csr_matrix, where: str) -> None:
    """Raise ``CountsError`` unless every stored value is a finite, non-negative whole number."""
    v = x.data
    if v.size == 0:
        return
    lo, hi = v.min(), v.max()  # NaN propagates into both: no separate finiteness pass
    if lo >= 0 and hi <= MAX_COUNT and np.array_equal(v, np.floor(v)):
        return  # the common case in three passes; the checks below say what is wrong
    if not np.isfinite(v).all():
        n_bad = int((~np.isfinite(v)).sum())
        raise CountsError(
            f"{where}: {n_bad} NaN or infinite values; raw counts are finite integers"
        )
    if hi > MAX_COUNT:
        raise CountsError(
            f"{where}: a count of {hi:g} is above {MAX_COUNT:g}; raw UMI counts are far smaller "
            "(the data are scaled or corrupt)"
        )
    if (v < 0).any():
        raise CountsError(
            f"{where}: negative values (min {v.min():g}); the data look centred or scaled, not raw "
            "counts. Raw counts usually live in .raw.X or layers['counts']."
        )
    frac = v != np.floor(v)
    if frac.any():
        example = v[frac][:3].tolist()
        raise CountsError(
            f"{where}: {int(frac.sum())} non-integer values (e.g. {example}); the data look "
            "log-normalised, not raw UMI counts. Raw counts usually live in .raw.X or "
            "layers['counts']: pass --layer counts (or --layer raw)."
        )


def to_csr32(x, where: str = "the matrix") -> sp.csr_matrix:
    """Any dense or sparse matrix as float32 CSR (the one layout the loaders use); a sparse one
    read from a file has its structure checked first (``checked_csr``)."""
    if sp.issparse(x):
        n, g = x.shape
        if x.format == "csc":  # a CSC matrix is the CSR matrix of its transpose
            t = checked_csr(x.data, x.indices, x.indptr, (g, n), where, csc=True)
            return t.T.tocsr()
        if x.format == "coo":
            rows, cols = np.asarray(x.row), np.asarray(x.col)
            if len(rows) and (
                rows.min() < 0 or rows.max() >= n or cols.min() < 0 or cols.max() >= g
            ):
                raise CountsError(f"{where}: COO coordinates outside the {n} x {g} matrix")
        x = x.tocsr()
        return checked_csr(x.data, x.indices, x.indptr, (n, g), where)
    x = np.asarray(x)
    if x.ndim != 2:
        raise CountsError(f"{where}: a count matrix is 2-D (cells x genes), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise CountsError(f"{where}: counts must be numbers, got {x.dtype}")
    return sp.csr_matrix(x.astype(np.float32, copy=False))
