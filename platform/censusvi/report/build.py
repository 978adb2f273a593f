"""``censusvi report``: an annotated query (from ``censusvi annotate``) + its index -> one HTML file."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import anndata as ad
import numpy as np

from censusvi.annotate.index import LabelIndex, load_index
from censusvi.atomic import check_folder, check_output, write_atomic
from censusvi.data.h5ad import check_uns_writable, read_h5ad
from censusvi.defaults import REPORT_PER_TYPE
from censusvi.numeric import is_whole
from censusvi.outputs import (
    LATENT_KEY,
    UNS_KEY,
    predicted_column,
    probability_column,
    uncertainty_column,
)
from censusvi.progress import bar
from censusvi.report.content import report_content
from censusvi.report.layout import fit_reference_layout
from censusvi.report.page import batch_counts, render_page
from censusvi.untrusted import read_small_file

log = logging.getLogger(__name__)
MAX_SCIB_BYTES = 16 << 20  # an scib table is a few KB: a row per method


def _is_table(rows) -> bool:
    """A list of objects with the same columns: what jobs/evaluate.py writes as scib.json."""
    return (
        isinstance(rows, list | tuple)
        and len(rows) > 0
        and all(isinstance(r, Mapping) for r in rows)
        and all(set(r) == set(rows[0]) for r in rows)
    )


def _is_batch_counts(stored) -> bool:
    try:
        return isinstance(stored, Mapping) and bool(batch_counts(stored))
    except (TypeError, ValueError):
        return False


RECORDED = {  # what annotate writes in uns["censusvi"], and how to tell it is that
    "latent_key": lambda v: isinstance(v, str),
    "batch_key": lambda v: isinstance(v, str),
    "genes": lambda v: isinstance(v, Mapping),
    "cells_per_batch": _is_batch_counts,
    "new_batches": lambda v: np.ndim(v) == 1,
    "cells_mapped": lambda v: np.isscalar(v) and is_whole(v),
    "scib": _is_table,
}


def recorded(adata: ad.AnnData) -> dict:
    """What annotate recorded in ``uns["censusvi"]``, each entry as annotate writes it; an entry
    of another type (the file edited, or written by another tool) is left out with a warning,
    where it was a traceback."""
    uns = adata.uns.get(UNS_KEY, {})
    if not isinstance(uns, Mapping):
        log.warning("uns[%r] is a %s, not annotate's record: not read", UNS_KEY, type(uns).__name__)
        return {}
    kept = {k: uns[k] for k, ok in RECORDED.items() if k in uns and ok(uns[k])}
    if odd := sorted(set(uns) & set(RECORDED) - set(kept)):
        log.warning("uns[%r] entries %s are not as annotate writes them: not read", UNS_KEY, odd)
    return kept


def latent_key_of(uns: dict, latent_key: str | None = None) -> str:
    """The obsm key of the latent: ``latent_key``, else the one annotate recorded (``uns``)."""
    return latent_key or uns.get("latent_key", LATENT_KEY)


def mapped_cells_table(
    adata: ad.AnnData,
    uns: dict,
    label_key: str,
    batch_key: str | None,
    latent_key: str | None = None,
):
    """The per-cell columns a report draws, with the batch under a fixed name; ``uns``: what
    annotate recorded (``recorded``)."""
    needed = [predicted_column(label_key), probability_column(label_key)]
    needed.append(uncertainty_column(label_key))
    missing = [c for c in needed if c not in adata.obs.columns]
    latent = latent_key_of(uns, latent_key)
    if missing or latent not in adata.obsm:
        raise ValueError(
            f"{missing or [f'obsm {latent}']} missing: the report reads the output of "
            "`censusvi annotate` (or the Serve app), which writes them"
        )
    key = batch_key or uns.get("batch_key")
    if key is None:
        raise ValueError("the file records no batch column: pass --batch-key")
    if key not in adata.obs.columns:
        raise ValueError(f"batch column {key!r} not in obs: pass --batch-key")
    cells = adata.obs.copy()
    cells["batch"] = adata.obs[key].astype(str)
    return cells


def checked_latent(adata: ad.AnnData, key: str, width: int, umap_key: str | None) -> np.ndarray:
    """``obsm[key]`` as the index's latent: as many columns (a latent of another model, or a
    UMAP, was placed on the reference's UMAP as if it were one), numbers, and not the slot the
    report's UMAP is written to (``umap_key``), which would replace it."""
    if umap_key == key:
        raise ValueError(
            f"--umap-key {key} is the latent the report reads: the UMAP would replace it; "
            "choose another key (e.g. X_umap)"
        )
    latent = np.asarray(adata.obsm[key])
    if latent.ndim != 2 or latent.shape[1] != width or latent.dtype.kind not in "fiu":
        raise ValueError(
            f"obsm[{key!r}] is {latent.dtype} of shape {latent.shape}, but the index's latent "
            f"has {width} columns: give the latent annotate wrote with this index (--latent-key)"
        )
    return latent


def placed_cells(latent: np.ndarray) -> np.ndarray:
    """Positions of the cells the report can place: the Python API's ``annotate`` keeps cells
    without counts as NaN rows (the command line leaves them out); they are left out here too,
    with a warning that counts them."""
    finite = np.isfinite(latent).all(axis=1)
    if not finite.any():
        raise ValueError(
            "no cell has a latent (every row is NaN: cells without counts); annotate cells "
            "with counts, then report"
        )
    if n := int((~finite).sum()):
        log.warning("%d cells have no latent (NaN: no counts); left out of the report", n)
    return np.flatnonzero(finite)


def build_report(
    mapped: str | os.PathLike | ad.AnnData,
    index_dir: str | os.PathLike | LabelIndex,
    out: str | os.PathLike,
    label_key: str | None = None,
    truth_key: str | None = None,
    batch_key: str | None = None,
    png_dir: str | os.PathLike | None = None,
    per_type: int = REPORT_PER_TYPE,
    scib: str | os.PathLike | None = None,
    overwrite: bool = False,
    latent_key: str | None = None,
    umap_key: str | None = None,
    umap_out: str | os.PathLike | None = None,
) -> dict:
    """Write the report page; ``mapped`` is annotate's output (a path or the AnnData itself),
    ``index_dir`` the index it was annotated with. ``umap_key``: also store the query's place
    on the report's UMAP in ``obsm[umap_key]`` of the AnnData (changed in place when given as
    one); ``umap_out``: then write that AnnData to this .h5ad."""
    if not (is_whole(per_type) and per_type >= 1):
        raise ValueError(f"per_type={per_type!r}: reference cells drawn per label, an integer >= 1")
    scib_rows = read_scib(scib) if scib else None
    # what the page may replace, before the work (the command line asked already; the Python
    # API had not, and a page refused at the end left the PNGs without it)
    inputs = [p for p in (mapped, index_dir, scib) if isinstance(p, str | os.PathLike)]
    check_output(out, ".html", overwrite, inputs)
    if png_dir:
        check_folder(png_dir, "png_dir", [*inputs, out])
    adata = mapped if isinstance(mapped, ad.AnnData) else read_h5ad(mapped)  # names the file
    if umap_out:  # the AnnData is written back: refuse what would fail there, before the work
        check_uns_writable(adata, str(mapped) if not isinstance(mapped, ad.AnnData) else "mapped")
    index = index_dir if isinstance(index_dir, LabelIndex) else load_index(index_dir)
    key = label_key or index.labels.columns[0]
    uns = recorded(adata)
    cells = mapped_cells_table(adata, uns, key, batch_key, latent_key)
    if truth_key is not None and truth_key not in adata.obs.columns:
        raise ValueError(
            f"truth key {truth_key!r} is not an obs column of the mapped file; it has "
            f"{sorted(adata.obs.columns)[:20]}"
        )
    truth = truth_key or (key if key in adata.obs.columns else None)
    mapping = {
        k: uns[k] for k in ("genes", "cells_per_batch", "new_batches", "cells_mapped") if k in uns
    }
    name = "AnnData" if isinstance(mapped, ad.AnnData) else Path(mapped).name
    latent = checked_latent(adata, latent_key_of(uns, latent_key), index.index.d, umap_key)
    placed = placed_cells(latent)
    cells, latent = cells.iloc[placed], latent[placed]
    with bar(total=2, desc="report", unit="step") as progress:
        layout = fit_reference_layout(index, key, per_type)  # the UMAP: most of the time
        xy = layout.place(latent)
        progress.update(1)
        content = report_content(
            cells, latent, layout, key, mapping, truth,
            scib_rows if scib else uns.get("scib"),
            title=f"censusvi mapping report: {name}", xy=xy,
        )  # fmt: skip
        progress.update(1)
    page = render_page(content)
    if png_dir:  # drawn before the page is written: a figure that fails leaves no page either
        from censusvi.report.figures import write_pngs

        write_pngs(content, png_dir)
    write_atomic(out, lambda tmp: tmp.write_text(page), suffix=".html", overwrite=overwrite)
    if umap_key:  # cells left out of the report have no place: NaN, as their latent
        full = np.full((adata.n_obs, 2), np.nan, dtype=np.float32)
        full[placed] = xy
        adata.obsm[umap_key] = full
        if umap_out:
            from censusvi.inference import write_h5ad_atomic

            write_h5ad_atomic(adata, umap_out, overwrite)
    return content


def read_scib(path: str | os.PathLike) -> list[dict]:
    """The integration table ``jobs/evaluate.py`` writes (scib.json): a JSON list of rows, each
    an object with the same columns; anything else is a ValueError naming the file."""
    hint = "give the scib.json jobs/evaluate.py wrote"
    raw = read_small_file(Path(path), MAX_SCIB_BYTES, "--scib", hint, regular=False)
    try:
        rows = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"--scib {path} is not JSON ({e}): give the scib.json jobs/evaluate.py wrote"
        ) from None
    if not _is_table(rows):
        raise ValueError(
            f"--scib {path} is not a table (a JSON list of objects with the same columns): give "
            "the scib.json jobs/evaluate.py wrote"
        )
    return rows
