"""Checks that a matrix holds raw UMI counts, with errors that say what is wrong and where to look.

scVI's likelihoods are defined on non-negative integers; log-normalised or scaled data train
without error but give a meaningless model, so they are refused here, not downstream.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class CountsError(ValueError):
    """The data are not raw counts (or are empty); the message says how to fix it."""


def check_counts(x: sp.csr_matrix, where: str) -> None:
    """Raise ``CountsError`` unless every stored value is a finite, non-negative whole number."""
    v = x.data
    if v.size == 0:
        return
    lo, hi = v.min(), v.max()  # NaN propagates into both: no separate finiteness pass
    if lo >= 0 and np.isfinite(hi) and np.array_equal(v, np.floor(v)):
        return  # the common case in three passes; the checks below say what is wrong
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


def to_csr32(x) -> sp.csr_matrix:
    """Any dense or sparse matrix as float32 CSR (the one layout the loaders use)."""
    if sp.issparse(x):
        x = x.tocsr()
    else:
        x = sp.csr_matrix(np.asarray(x))
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x
