"""What an ``Annotator`` replica does, without Ray: hold each version's FAISS index and label
table, transfer labels as ``censusvi annotate`` does (requests of one version and options joined
into one search), and draw the explorer page of a kept result."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from censusvi.outputs import NLL_COLUMN, write_answers
from censusvi.serving.grouping import error, groups, split_labels
from censusvi.serving.settings import Settings
from censusvi.serving.versions import VersionFetcher, VersionStore

log = logging.getLogger(__name__)
PAGES_KEPT = 8  # explorer pages an Annotator replica keeps drawn (a few MB each at most)


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


def warm_up(ix) -> None:
    """Transfer labels to two made-up cells once (every method the index has), so that a
    replica's first request finds every import done."""
    from censusvi.annotate.pipeline import transfer_all

    latent = np.zeros((2, ix.index.d), dtype=np.float32)
    for method in ("knn", "ensemble") if ix.heads else ("knn",):
        transfer_all(ix, latent, method=method)


def joined_nll(requests: list[tuple]) -> np.ndarray | None:
    """The requests' NLL per count joined (NaN for a request without one: its cells' other
    signals decide), or None when none has it."""
    if not any(len(r) > 5 and r[5] is not None for r in requests):
        return None
    parts = [
        np.asarray(r[5], dtype=float)
        if len(r) > 5 and r[5] is not None
        else np.full(len(r[0]), np.nan)
        for r in requests
    ]
    return np.concatenate(parts)


class IndexHost:
    """The versions' indexes the version board wants this replica to hold (``store``; None for
    a version without one), and their reference maps for the explorer, fitted in the background
    once an index is loaded (a UMAP takes seconds; a page asked for sooner waits for it)."""

    def __init__(self, s: Settings) -> None:
        from censusvi.annotate.index import load_index
        from censusvi.report.layout import fit_reference_layout

        self.s = s
        self.noted: set[str] = set()  # versions whose method fallback has been logged
        fetch = VersionFetcher(s, "index")

        def load(version: str):
            files = fetch(version)
            ix = load_index(files.index_dir) if files.index_dir else None
            if ix is not None:
                try:
                    warm_up(ix)
                except Exception as e:  # best effort: the first request then pays for the imports
                    log.warning("version %s not warmed up: %s", version, e)
                threading.Thread(target=self._fit_layout, args=(version,), daemon=True).start()
            return ix

        self.store = self.indexes = VersionStore(load)
        self.layouts = VersionStore(lambda v: fit_reference_layout(self.indexes.prepare(v)))
        self.pages: OrderedDict[str, str] = OrderedDict()  # result id -> its explorer page

    def keep(self, versions: list[str]) -> None:
        self.indexes.keep(versions)
        self.layouts.keep(versions)

    def _fit_layout(self, version: str) -> None:
        try:
            self.layouts.prepare(version)
        except Exception as e:  # the page itself reports it (e.g. the report extra missing)
            log.warning("explorer map of version %s not fitted ahead: %s", version, e)

    def info(self, version: str) -> dict:
        ix = self.indexes.get(version)
        if ix is None:
            return {"index": None}
        keys = ("n_cells", "kind", "label_keys", "evaluation")
        return {"index": {k: ix.meta.get(k) for k in keys}}

    def resolve(self, ix, version: str, method: str | None) -> str | None:
        """The method that answers (``annotate.method.resolve_method``; None: a named method
        needs a head the index lacks); a fallback from the default is logged once per version."""
        from censusvi.annotate.method import resolve_method

        try:
            used, note = resolve_method(ix, method)
        except ValueError:
            return None
        if note and version not in self.noted:
            self.noted.add(version)
            log.warning("model version %s: %s", version, note)
        return used

    def annotate_all(self, requests: list[tuple]) -> list[dict]:
        """One ``{"labels": {key: frame}, "method": the method that answered}`` (or error) per
        ``(latent_nk, version, k, threshold, method[, nll_per_count])`` (method None: the
        default, knn for an index without a label head): with the Mapper's ``nll_per_count``
        the out-of-reference detection also reads the cells' reconstruction NLL
        (``annotate.novelty``); without it, their distances and the head's entropy."""
        from censusvi.annotate.pipeline import transfer_all

        results: list[dict | None] = [None] * len(requests)
        keyed = ((i, tuple(r[1:5])) for i, r in enumerate(requests))
        for (version, k, thr, method), members in groups(keyed).items():
            ix = self.indexes.get(version)
            method = None if ix is None else self.resolve(ix, version, method)
            if method is None:
                for i in members:
                    results[i] = no_index(version) if ix is None else no_head(version)
                continue
            latent_nk = np.concatenate([requests[i][0] for i in members])
            nll = joined_nll([requests[i] for i in members])
            labels = (
                transfer_all(ix, latent_nk, k, thr, method=method, nll=nll)
                if len(latent_nk)
                else {}
            )
            sizes = [len(requests[i][0]) for i in members]
            for i, answer in zip(members, split_labels(labels, sizes)):
                results[i] = {**answer, "method": method}
        return results

    def explore(self, item: dict) -> str:
        """The explorer page of a kept result: its cells placed on this version's reference map."""
        import pandas as pd

        from censusvi.report.content import report_content
        from censusvi.report.page import render_page

        if (page := self.pages.get(item["result_id"])) is not None:
            return page  # drawn once: a link is not a way to make the replica redraw 20,000 cells
        version = item["model"]["version"]
        layout = self.layouts.prepare(version)
        key = next(iter(item["labels"]))
        frame = item["labels"][key]
        cells = pd.DataFrame({"batch": item["batch"], NLL_COLUMN: item["nll_per_count"]})
        write_answers(cells, key, frame.reset_index(drop=True))
        title = (
            f"censusvi explorer: {item['model']['name']} version {version}, "
            f"result {item['result_id']}"
        )
        content = report_content(cells, item["latent"], layout, key, item["report"], title=title)
        page = self.pages[item["result_id"]] = render_page(content)
        while len(self.pages) > PAGES_KEPT:
            self.pages.popitem(last=False)
        return page
