"""What a ``Mapper`` replica does, without Ray: hold model versions and map queries exactly as
``censusvi map`` does, requests that arrived together joined per (version, gene list)."""

from __future__ import annotations

import logging

from censusvi.serving.grouping import error, groups, join_cells, map_key, split_mapped
from censusvi.serving.settings import Settings
from censusvi.serving.versions import VersionFetcher, VersionStore

log = logging.getLogger("censusvi.serve")


def surgery_refused(new: list[str]) -> dict:
    return error(
        422,
        f"batch(es) {new[:5]} are not batches of the reference, and this model encodes the "
        "batch, so their latent needs surgery training: map the query with `censusvi map` (or "
        "label cells with reference batches); this server runs without allow_surgery",
    )


def warm_up(model) -> None:
    """Map a few made-up cells of a reference batch once, so that a replica's first request
    finds every import done and the model's code paths run before."""
    import numpy as np
    import scipy.sparse as sp

    from censusvi.mapping.query import map_query
    from censusvi.wire import QueryCells

    n = min(len(model.genes), 50)
    x = sp.csr_matrix(np.ones((2, n), dtype=np.float32))
    batch = np.array([model.batch_categories[0]] * 2)
    map_query(
        model, QueryCells(x, list(model.genes.ids[:n]), batch).to_anndata(), "batch", min_overlap=0
    )


class ModelHost:
    """The model versions the version board wants this replica to hold (``store``: loaded
    before requests name them; a missing model fails the replica as it starts)."""

    def __init__(self, s: Settings, device: str = "cpu") -> None:
        from censusvi.model.io import load_model

        self.s = s
        fetch = VersionFetcher(s, "model")

        def load(version: str):
            files = fetch(version)
            model = load_model(files.model_dir, device)
            try:
                warm_up(model)
            except Exception as e:  # best effort: the first request then pays for the imports
                log.warning("version %s not warmed up: %s", version, e)
            return files, model

        self.store = self.models = VersionStore(load)

    def info(self, version: str) -> dict:
        files, m = self.models.get(version)
        return {
            "name": files.name,
            "version": files.version,
            "n_genes": len(m.genes),
            "n_latent": m.config.n_latent,
            "n_batches": len(m.batch_categories),
            "batch_keys": list(m.batch_keys),
            "encode_covariates": m.config.encode_covariates,
            "likelihood": m.config.likelihood,
        }

    def map_all(self, requests: list[tuple]) -> list[dict]:
        """One answer (or error) per ``(QueryCells, version)``, in order."""
        results: list[dict | None] = [None] * len(requests)
        keyed = []
        for i, (cells, version) in enumerate(requests):
            _, model = self.models.get(version)
            new = sorted(set(cells.batch) - set(model.batch_categories))
            surgery = bool(new) and model.config.encode_covariates
            if surgery and not self.s.allow_surgery:
                results[i] = surgery_refused(new)
            else:
                keyed.append((i, map_key(i, version, cells, alone=surgery)))
        for (version, *_), members in groups(keyed).items():
            answers = self._map_group(version, [requests[i][0] for i in members])
            for i, answer in zip(members, answers):
                results[i] = answer
        return results

    def _map_group(self, version: str, parts: list) -> list[dict]:
        if len(parts) == 1:
            return [self._map_safely(version, parts[0])]
        try:
            whole = self._map_one(version, join_cells(parts))
        except ValueError:  # one part's fault: map each alone to say whose
            return [self._map_safely(version, p) for p in parts]
        answers = split_mapped(whole, parts)
        # A part none of whose cells has counts is an error alone (422), so it is one joined too.
        return [
            self._map_safely(version, p) if len(a["positions"]) == 0 else a
            for p, a in zip(parts, answers)
        ]

    def _map_safely(self, version: str, cells) -> dict:
        try:
            return self._map_one(version, cells)
        except ValueError as e:
            return error(422, str(e))
        except Exception as e:  # a request never takes the replica down; the log keeps the trace
            log.exception("mapping failed")
            return error(422, f"the query could not be mapped ({type(e).__name__}: {e})")

    def _map_one(self, version: str, cells) -> dict:
        from censusvi.mapping.query import map_query

        _, model = self.models.get(version)
        mq = map_query(model, cells.to_anndata(), "batch")
        return {
            "positions": mq.positions,
            "latent": mq.latent,
            "nll_per_count": mq.nll_per_count,
            "report": mq.report,
        }
