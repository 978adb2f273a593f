"""``censusvi report``: an annotated query (from ``censusvi annotate``) + its index -> one HTML file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad

from censusvi.annotate.index import load_index
from censusvi.atomic import write_atomic
from censusvi.progress import bar
from censusvi.report.content import report_content
from censusvi.report.layout import fit_reference_layout
from censusvi.report.page import render_page


def mapped_cells_table(adata: ad.AnnData, label_key: str, batch_key: str | None):
    """The per-cell columns a report draws, with the batch under a fixed name."""
    needed = [f"predicted_{label_key}", f"{label_key}_probability", f"{label_key}_uncertainty"]
    missing = [c for c in needed if c not in adata.obs.columns]
    if missing or "X_scvi" not in adata.obsm:
        raise ValueError(
            f"{missing or ['obsm X_scvi']} missing: the report reads the output of "
            "`censusvi annotate` (or the Serve app), which writes them"
        )
    key = batch_key or adata.uns.get("censusvi", {}).get("batch_key")
    if key is None or key not in adata.obs.columns:
        raise ValueError(f"batch column {key!r} not in obs: pass --batch-key")
    cells = adata.obs.copy()
    cells["batch"] = adata.obs[key].astype(str)
    return cells


def build_report(
    mapped: str | os.PathLike,
    index_dir: str | os.PathLike,
    out: str | os.PathLike,
    label_key: str | None = None,
    truth_key: str | None = None,
    batch_key: str | None = None,
    png_dir: str | os.PathLike | None = None,
    per_type: int = 300,
    scib: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    adata = ad.read_h5ad(mapped)
    index = load_index(index_dir)
    key = label_key or index.labels.columns[0]
    cells = mapped_cells_table(adata, key, batch_key)
    truth = truth_key or (key if key in adata.obs.columns else None)
    uns = adata.uns.get("censusvi", {})
    mapping = {
        k: uns[k] for k in ("genes", "cells_per_batch", "new_batches", "cells_mapped") if k in uns
    }
    with bar(total=2, desc="report", unit="step") as progress:
        layout = fit_reference_layout(index, key, per_type)  # the UMAP: most of the time
        progress.update(1)
        content = report_content(
            cells, adata.obsm["X_scvi"], layout, key, mapping, truth,
            json.loads(Path(scib).read_text()) if scib else uns.get("scib"),
            title=f"censusvi mapping report: {Path(mapped).name}",
        )  # fmt: skip
        progress.update(1)
    page = render_page(content)
    write_atomic(out, lambda tmp: tmp.write_text(page), suffix=".html", overwrite=overwrite)
    if png_dir:
        from censusvi.report.figures import write_pngs

        write_pngs(content, png_dir)
    return content
