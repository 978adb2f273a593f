"""Requests that arrive together (``@serve.batch``) joined into one forward pass or one search,
and the joined answer split back per request. Mapping and label transfer are row-independent, so
a joined answer equals the lone ones (tested over HTTP)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from censusvi.outputs import cells_per_batch


def error(status: int, message: str) -> dict:
    """An answer that is an HTTP error (the ingress turns it into one)."""
    return {"error": message, "status": status}


def groups(keyed: Iterable[tuple[int, Hashable]]) -> dict[Hashable, list[int]]:
    """The positions sharing each key, from (position, key) pairs; keys in first-seen order."""
    out: dict[Hashable, list[int]] = {}
    for i, key in keyed:
        out.setdefault(key, []).append(i)
    return out


def map_key(i: int, version: str, cells, alone: bool) -> tuple:
    """Requests of one version with the same gene names map together; ``alone`` (surgery trains
    on one query's cells only) keys a request by its own position."""
    return (version, i) if alone else (version, tuple(cells.genes), tuple(cells.symbols or ()))


def join_cells(parts: list):
    """One ``QueryCells`` of the parts' cells in order (they share the gene list)."""
    from censusvi.wire import QueryCells

    x_ng = sp.vstack([p.x for p in parts]).tocsr()  # (sum of cells, genes)
    batch = np.concatenate([p.batch for p in parts])
    return QueryCells(x_ng, parts[0].genes, batch, parts[0].symbols)


def split_mapped(whole: dict, parts: list) -> list[dict]:
    """``map_query``'s answer for the joined cells as one answer per part: rows renumbered from
    0, the report's batch counts and cell counts the part's own."""
    out, start = [], 0
    for p in parts:
        stop = start + p.n_cells
        keep = (whole["positions"] >= start) & (whole["positions"] < stop)
        batches = cells_per_batch(p.batch)
        present = set(batches["batch"])
        report = {
            **whole["report"],
            "cells_per_batch": batches,
            "new_batches": [b for b in whole["report"]["new_batches"] if b in present],
            "cells_mapped": int(keep.sum()),
            "cells_without_counts": int(p.n_cells - keep.sum()),
        }
        out.append(
            {
                "positions": whole["positions"][keep] - start,
                "latent": whole["latent"][keep],
                "nll_per_count": whole["nll_per_count"][keep],
                "report": report,
            }
        )
        start = stop
    return out


def split_labels(labels: dict[str, pd.DataFrame], sizes: Sequence[int]) -> list[dict]:
    """Label frames of joined latents as ``{"labels": ...}`` per request of ``sizes`` rows."""
    out, start = [], 0
    for n in sizes:
        stop = start + n
        frames = {key: f.iloc[start:stop].reset_index(drop=True) for key, f in labels.items()}
        out.append({"labels": frames})
        start = stop
    return out
