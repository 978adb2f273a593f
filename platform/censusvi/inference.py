"""Reading a dataset through a trained model: latent means (``embed``) and decoded expression.

Cells are streamed in blocks (bounded memory); genes are aligned to the model's vocabulary by
whichever names match best (ids or symbols, ``GeneVocabulary.align``); batches must be ones the model knows (new batches are the mapping path's job).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from censusvi.atomic import write_atomic
from censusvi.data.cells import Cells
from censusvi.data.h5ad import H5adSource
from censusvi.data.vocabulary import DEFAULT_MIN_OVERLAP
from censusvi.defaults import EMBED_BATCH_SIZE
from censusvi.model.io import UNKNOWN_BATCH_FIX, TrainedModel
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.numeric import check_library_size
from censusvi.progress import bar

log = logging.getLogger(__name__)


def reference_cells(
    model: TrainedModel,
    source: H5adSource,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    unknown_batch_fix: str = UNKNOWN_BATCH_FIX,
) -> tuple[Cells, dict]:
    """The source's cells aligned to ``model``; raises on no cells, unknown batches (the error
    ending with ``unknown_batch_fix``) or poor gene overlap."""
    if len(source.obs) == 0:
        raise ValueError(f"{source.uri}: 0 cells; there is nothing to embed")
    alignment = model.genes.align(source.var_keys, min_overlap, source.uri)
    codes = model.covariate_codes(source.obs, source.uri, unknown_batch_fix)
    cells = Cells(source, np.arange(len(source.obs)), alignment, codes, preload=False)
    return cells, alignment.report()


def _stream(
    model: TrainedModel, cells: Cells, batch_size: int, device: str, fn
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``fn(vae, minibatch)`` to every non-empty cell; returns (kept positions, stacked rows)."""
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        # 0 failed inside range(), and a negative size read no cells: "all cells have zero counts"
        raise ValueError(f"batch size {batch_size!r}: cells per minibatch must be an integer >= 1")
    vae = model.vae.to(device).eval()
    pos_out, rows_out = [], []
    progress = bar(total=len(cells), desc="embed")
    for pos, x, cov in cells.minibatches(batch_size, shuffle=False):
        if not len(pos):
            continue  # every cell of this minibatch had zero counts and was dropped
        mb = minibatch_from_csr(x, cov, device, with_nonzeros=False)
        with torch.no_grad():
            rows_out.append(fn(vae, mb).cpu().numpy())
        if bad := int((~np.isfinite(rows_out[-1])).any(axis=1).sum()):
            # such cells were left out as "no counts over the model's genes": they had counts
            raise ValueError(
                f"{cells.source.uri}: the model gives NaN or infinite values for {bad} cells "
                "that have counts: its weights overflow on them (edited, or trained on other "
                "data): use another model"
            )
        pos_out.append(pos)
        progress.update(len(pos))
    progress.close()
    if not pos_out:
        raise ValueError(
            f"{cells.source.uri}: all {len(cells)} cells have zero counts over the model's genes; "
            f"none is left to embed{getattr(cells.source, 'elsewhere', '')}"
        )
    return np.concatenate(pos_out), np.concatenate(rows_out)


def stream_latent(
    model: TrainedModel, cells: Cells, batch_size: int = EMBED_BATCH_SIZE, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(positions of cells with counts, their latent means) for prepared cells."""
    return _stream(model, cells, batch_size, device, lambda v, mb: v.latent_mean(mb))


def latent_representation(
    model: TrainedModel,
    source: H5adSource,
    batch_size: int = EMBED_BATCH_SIZE,
    device: str = "cpu",
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    unknown_batch_fix: str = UNKNOWN_BATCH_FIX,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(positions of embedded cells, latent means (n, k), gene report)."""
    cells, report = reference_cells(model, source, min_overlap, unknown_batch_fix)
    pos, z = stream_latent(model, cells, batch_size, device)
    return pos, z, report


def get_latent_representation(
    model: TrainedModel,
    adata: ad.AnnData,
    batch_size: int = EMBED_BATCH_SIZE,
    device: str = "cpu",
    layer: str | None = None,
) -> np.ndarray:
    """Latent means (n_cells, n_latent) of an in-memory AnnData, in its cell order."""
    pos, z, _ = latent_representation(
        model, H5adSource("<AnnData>", adata=adata, layer=layer), batch_size, device
    )
    return _in_cell_order(pos, z, adata.n_obs)


def _in_cell_order(pos: np.ndarray, rows: np.ndarray, n_cells: int) -> np.ndarray:
    """Rows for every cell, in the input's order; a cell without counts is an error here."""
    if len(pos) != n_cells:
        raise ValueError(f"{n_cells - len(pos)} cells have zero counts over the model's genes")
    out = np.empty_like(rows)
    out[pos] = rows
    return out


def get_normalized_expression(
    model: TrainedModel,
    adata: ad.AnnData,
    library_size: float | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
    layer: str | None = None,
) -> np.ndarray:
    """Decoded, library-normalised expression (n_cells, model genes), scvi-tools' equivalent.

    Each cell is decoded under its own batch at the posterior mean of z. ``library_size`` scales
    the gene fractions (e.g. 1e4); None gives fractions summing to 1 per cell.
    """
    if library_size is not None:
        check_library_size(library_size)
    source = H5adSource("<AnnData>", adata=adata, layer=layer)
    cells, _ = reference_cells(model, source)
    pos, scale = _stream(
        model,
        cells,
        batch_size,
        device,
        lambda v, mb: v.normalized_expression(mb, library_size),
    )
    return _in_cell_order(pos, scale, adata.n_obs)


def write_h5ad_atomic(adata: ad.AnnData, out: str | os.PathLike, overwrite: bool = False) -> Path:
    return write_atomic(out, adata.write_h5ad, suffix=".h5ad", overwrite=overwrite)
