"""Checks that a matrix holds raw UMI counts, with errors that say what is wrong and where to look.

scVI's likelihoods are defined on non-negative integers; log-normalised or scaled data train
without error but give a meaningless model, so they are refused here, not downstream.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


class CountsError(ValueError):
    """The data are not raw counts (or are empty); the message says how to fix it."""


def check_counts(x: sp.csr_matrix, where: str) -> None:
    """Raise ``CountsError`` unless every stored value is a finite, non-negative whole number."""
    v = x.data
    if v.size == 0:
        return
    if not np.isfinite(v).all():
        n_bad = int((~np.isfinite(v)).sum())
        raise CountsError(
            f"{where}: {n_bad} NaN or infinite values; raw counts are finite integers"
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


def nonempty_rows(x: sp.csr_matrix, where: str) -> np.ndarray:
    """Boolean mask of cells with at least one count; logs how many are dropped, raises if all."""
    keep = np.diff(x.indptr) > 0
    if x.nnz:
        keep &= np.add.reduceat(np.append(x.data, 0), x.indptr[:-1]) > 0
    n_drop = int((~keep).sum())
    if n_drop == x.shape[0] and x.shape[0] > 0:
        raise CountsError(
            f"{where}: all {x.shape[0]} cells have zero counts over the model's genes; check that "
            "the gene ids match the model and that X holds counts"
        )
    if n_drop:
        log.warning("%s: dropped %d of %d cells with zero counts", where, n_drop, x.shape[0])
    return keep


def to_csr32(x) -> sp.csr_matrix:
    """Any dense or sparse matrix as float32 CSR (the one layout the loaders use)."""
    if sp.issparse(x):
        x = x.tocsr()
    else:
        x = sp.csr_matrix(np.asarray(x))
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x
