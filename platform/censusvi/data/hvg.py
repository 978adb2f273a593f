"""Highly variable genes, Seurat v3 flavour on raw counts, stratified, from streamed statistics.

Same selection as ``scanpy.pp.highly_variable_genes(flavor="seurat_v3", batch_key=...)`` (what the
Census model used, with strata = suspension_type x assay), but computed in two passes over row
blocks so the matrix is never in memory:
  1. per stratum and gene: n, sum x, sum x^2 -> mean, variance (ddof 1); a loess fit (span 0.3,
     degree 2) of log10 variance on log10 mean gives the expected std of each gene;
  2. per stratum and gene: sums of min(x, mean + std * sqrt(n)) and of its square -> the
     standardised (clipped) variance.
Genes are ranked within each stratum; the top N by median rank (ties: in more strata first) win.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from censusvi.data.counts import check_counts
from censusvi.data.source import CellSource, batch_categories

log = logging.getLogger(__name__)
MIN_STRATUM_CELLS = 2  # a variance needs two cells; the loess fit itself needs many genes
MIN_LOESS_GENES = 10
"""Genes that must vary in a stratum before its loess fit is tried. A quadratic fitted in windows
of 30 % of the genes needs 0.3 n > 3; skmisc's loess kills the process (SIGSEGV) on 3 points or
fewer and raises on most fits under ~14, which skip the stratum like any failed fit."""


@dataclass(frozen=True)
class HvgResult:
    genes: np.ndarray  # source gene positions of the selected genes, in source order
    variances_norm: np.ndarray  # (n_genes,) mean over strata of the standardised variance
    rank: np.ndarray  # (n_genes,) median rank over strata (NaN where never in a stratum's top N)
    n_strata_top: np.ndarray  # (n_genes,) strata in which the gene is in the top N
    strata: tuple[str, ...]


def _column_sums(x: sp.csr_matrix, power: int, n_genes: int) -> np.ndarray:
    return np.bincount(x.indices, weights=x.data.astype(np.float64) ** power, minlength=n_genes)


def _loess_std(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    from skmisc.loess import loess

    not_const = var > 0
    if not_const.sum() < MIN_LOESS_GENES:
        raise ValueError(
            f"only {not_const.sum()} genes vary in it (the loess fit needs {MIN_LOESS_GENES})"
        )
    fitted = np.zeros_like(mean)
    try:
        model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=0.3, degree=2)
        model.fit()
    except ValueError as e:  # skmisc: a singular fit, typical of strata with few cells
        raise ValueError(f"the loess fit failed ({e})") from e
    fitted[not_const] = model.outputs.fitted_values
    return np.sqrt(10**fitted)


BlockFn = Callable[[sp.csr_matrix, np.ndarray], np.ndarray]
"""Partial sums over one block of rows: (its counts, its cells' stratum codes) -> sums."""
Reducer = Callable[[BlockFn, list[tuple[int, int]], np.ndarray], np.ndarray]
"""``reduce(fn, blocks, code)``: the sum of ``fn`` over the source's row blocks [start, stop),
each given its slice of ``code`` (serially here, or on a Ray cluster: ``ray_hvg``)."""


def serial_reducer(source: CellSource) -> Reducer:
    def reduce(fn: BlockFn, blocks: list[tuple[int, int]], code: np.ndarray) -> np.ndarray:
        return running_sum(fn(read_block(source, a, b), code[a:b]) for a, b in blocks)

    return reduce


def running_sum(parts) -> np.ndarray:
    """The sum of the arrays ``parts``, one held at a time."""
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


def read_block(source, start: int, stop: int) -> sp.csr_matrix:
    """Counts of rows [start, stop) of ``source``, checked."""
    x = source.read_rows(np.arange(start, stop))
    check_counts(x, f"{source.uri} (cells {start}..{stop - 1})")
    return x


def _moment_sums(n_strata: int, n_genes: int) -> BlockFn:
    """Pass 1 over a block: per stratum and gene, sum x and sum x^2."""

    def fn(x: sp.csr_matrix, code: np.ndarray) -> np.ndarray:
        out = np.zeros((2, n_strata, n_genes))
        for s in np.unique(code):
            xs = x[code == s]
            out[0, s] = _column_sums(xs, 1, n_genes)
            out[1, s] = _column_sums(xs, 2, n_genes)
        return out

    return fn


def _clipped_sums(clip: np.ndarray, usable: np.ndarray) -> BlockFn:
    """Pass 2 over a block: per stratum and gene, sums of the clipped values and their squares."""

    def fn(x: sp.csr_matrix, code: np.ndarray) -> np.ndarray:
        out = np.zeros((2, *clip.shape))
        for s in np.unique(code):
            if not usable[s]:
                continue
            xs = x[code == s]
            v = np.minimum(xs.data.astype(np.float64), clip[s][xs.indices])
            out[0, s] = np.bincount(xs.indices, weights=v, minlength=clip.shape[1])
            out[1, s] = np.bincount(xs.indices, weights=v**2, minlength=clip.shape[1])
        return out

    return fn


def highly_variable_genes(
    source: CellSource,
    n_top: int,
    strata_keys: list[str] | tuple[str, ...] = (),
    block_size: int = 16384,
    reducer: Reducer | None = None,
) -> HvgResult:
    """Select ``n_top`` genes of ``source``; ``strata_keys`` are obs columns (none: one stratum).
    ``reducer`` runs the two passes (default: serially here; ``ray_hvg.ray_reducer``: Ray tasks
    that read the count matrix only)."""
    n_genes = len(source.var_ids)
    if n_top > n_genes:
        raise ValueError(f"--n-hvg {n_top} is more than the {n_genes} genes in {source.uri}")
    if strata_keys:
        strata, code = batch_categories(source.obs, list(strata_keys), source.uri, "HVG")
    else:
        strata, code = np.array(["0"]), np.zeros(len(source.obs), dtype=np.int64)
    n_s = np.bincount(code, minlength=len(strata)).astype(np.float64)
    n = len(source.obs)
    blocks = [(a, min(a + block_size, n)) for a in range(0, n, block_size)]
    reduce = reducer or serial_reducer(source)
    s1, s2 = reduce(_moment_sums(len(strata), n_genes), blocks, code)

    usable = n_s >= MIN_STRATUM_CELLS
    if not usable.any():
        raise ValueError(f"HVG selection needs at least {MIN_STRATUM_CELLS} cells in some stratum")
    for s in np.flatnonzero(~usable):
        log.warning("HVG: stratum %r has %d cell(s) and is skipped", str(strata[s]), int(n_s[s]))
    mean = s1 / n_s[:, None]
    var = np.where(
        usable[:, None], (s2 - n_s[:, None] * mean**2) / np.maximum(n_s[:, None] - 1, 1), 0.0
    )
    std = np.zeros_like(mean)
    failed: list[str] = []
    for s in np.flatnonzero(usable):
        try:
            std[s] = _loess_std(mean[s], var[s])
        except ValueError as e:  # too few varying genes, or a singular fit
            usable[s] = False
            failed.append(f"{str(strata[s])!r} ({int(n_s[s])} cells): {e}")
            log.warning("HVG: stratum %s; it is skipped", failed[-1])
    if not usable.any():
        if not s1.any():
            raise ValueError(
                f"{source.uri}: every cell has zero counts; there are no genes to select or train on"
            )
        what, fix = (
            (f"every stratum of {list(strata_keys)}", "use fewer --hvg-keys, or ")
            if strata_keys
            else (f"{source.uri}", "")
        )
        raise ValueError(
            f"HVG selection failed in {what}: {'; '.join(failed[:3])}"
            f"{' ...' if len(failed) > 3 else ''}; {fix}keep every gene with --n-hvg 0"
        )
    clip = mean + std * np.sqrt(n_s)[:, None]

    c1, c2 = reduce(_clipped_sums(clip, usable), blocks, code)

    idx = np.flatnonzero(usable)
    n, m, sd = n_s[idx, None], mean[idx], std[idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_var = (n * m**2 + c2[idx] - 2 * c1[idx] * m) / ((n - 1) * sd**2)
    norm_var = np.nan_to_num(norm_var, nan=0.0, posinf=0.0)  # std 0: constant gene, not variable
    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float64)
    n_top_strata = (ranks < n_top).sum(0)
    ranks[ranks >= n_top] = np.nan
    with np.errstate(all="ignore"):
        median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)
    order = np.lexsort((-n_top_strata, np.where(np.isnan(median_rank), np.inf, median_rank)))
    chosen = np.sort(order[:n_top])
    return HvgResult(chosen, norm_var.mean(0), median_rank, n_top_strata, tuple(strata[idx]))
