"""What an ``Annotator`` replica does, without Ray: hold each version's FAISS index and label
table, transfer labels as ``censusvi annotate`` does (requests of one version and options joined
into one search), and draw the explorer page of a kept result."""

from __future__ import annotations

import logging
import threading

import numpy as np

from censusvi.outputs import NLL_COLUMN, write_answers
from censusvi.serving.grouping import error, groups, split_labels
from censusvi.serving.settings import Settings, current_version
from censusvi.serving.versions import VersionCache, VersionFetcher

log = logging.getLogger(__name__)


def no_head(version: str) -> dict:
    return error(
        422,
        f"model version {version}'s index has no label head (built with --no-head or by an "
        "older censusvi): ask for ?method=knn, or register an index built by `censusvi index`",
    )


def no_index(version: str) -> dict:
    return error(
        409,
        f"model version {version} was registered without an index, so it cannot annotate: "
        "register it with `censusvi models register MODEL --index DIR`",
    )


class IndexHost:
    """The last two versions' indexes (None for a version without one), and their reference maps
    for the explorer, fitted on first use (a UMAP takes seconds)."""

    def __init__(self, s: Settings) -> None:
        from censusvi.annotate.index import load_index
        from censusvi.report.layout import fit_reference_layout

        fetch = VersionFetcher(s, "index")

        def load(version: str):
            files = fetch(version)
            return load_index(files.index_dir) if files.index_dir else None

        self.indexes = VersionCache(load)
        self.layouts = VersionCache(lambda v: fit_reference_layout(self.indexes.get(v)))
        self.load(current_version(s))

    def load(self, version: str) -> str:
        """Load ``version``'s index now and fit its explorer map in the background, so that the
        first explorer page does not wait for a UMAP (a later request for it waits for this one)."""
        if self.indexes.get(version) is not None:
            threading.Thread(target=self._fit_layout, args=(version,), daemon=True).start()
        return version

    def _fit_layout(self, version: str) -> None:
        try:
            self.layouts.get(version)
        except Exception as e:  # the page itself reports it (e.g. the report extra missing)
            log.warning("explorer map of version %s not fitted ahead: %s", version, e)

    def info(self, version: str) -> dict:
        ix = self.indexes.get(version)
        if ix is None:
            return {"index": None}
        keys = ("n_cells", "kind", "label_keys", "evaluation")
        return {"index": {k: ix.meta.get(k) for k in keys}}

    def annotate_all(self, requests: list[tuple[np.ndarray, str, int, float, str]]) -> list[dict]:
        """One ``{"labels": {key: frame}}`` (or error) per
        ``(latent_nk, version, k, threshold, method)``."""
        from censusvi.annotate.pipeline import transfer_all

        results: list[dict | None] = [None] * len(requests)
        keyed = ((i, tuple(r[1:])) for i, r in enumerate(requests))
        for (version, k, thr, method), members in groups(keyed).items():
            ix = self.indexes.get(version)
            if ix is None or (method != "knn" and not ix.heads):
                for i in members:
                    results[i] = no_index(version) if ix is None else no_head(version)
                continue
            latent_nk = np.concatenate([requests[i][0] for i in members])
            labels = transfer_all(ix, latent_nk, k, thr, method=method) if len(latent_nk) else {}
            sizes = [len(requests[i][0]) for i in members]
            for i, answer in zip(members, split_labels(labels, sizes)):
                results[i] = answer
        return results

    def explore(self, item: dict) -> str:
        """The explorer page of a kept result: its cells placed on this version's reference map."""
        import pandas as pd

        from censusvi.report.content import report_content
        from censusvi.report.page import render_page

        version = item["model"]["version"]
        layout = self.layouts.get(version)
        key = next(iter(item["labels"]))
        frame = item["labels"][key]
        cells = pd.DataFrame({"batch": item["batch"], NLL_COLUMN: item["nll_per_count"]})
        write_answers(cells, key, frame.reset_index(drop=True))
        title = (
            f"censusvi explorer: {item['model']['name']} version {version}, "
            f"result {item['result_id']}"
        )
        content = report_content(cells, item["latent"], layout, key, item["report"], title=title)
        return render_page(content)
