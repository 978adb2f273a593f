"""A Python client for the censusvi Serve app: AnnData in, the same AnnData annotated out.

Large AnnData are sent in chunks below the server's cell limit (Arrow bodies: compact and
exact), answers are stitched back in cell order, and calls are retried (urllib3's ``Retry``, with
exponential backoff) on connection errors and on 502/503/504: embedding and annotation are pure
functions of the request, so retrying a POST is safe.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from censusvi.data.counts import to_csr32
from censusvi.data.h5ad import counts_matrix, gene_ids_and_symbols
from censusvi.outputs import LATENT_KEY, NLL_COLUMN, NO_COUNTS, UNS_KEY, write_answers
from censusvi.wire import ARROW, decode_result, encode_arrow_request

RETRY_STATUS = (408, 502, 503, 504)  # 408: the body stalled on its way (a network pause)
BACKOFF_S, BACKOFF_MAX_S = 0.5, 8.0  # retry 1 at once, retry n after BACKOFF_S * 2**(n - 1) s


class _Retry(Retry):
    """urllib3's ``Retry``, except for a read timeout: an answer that did not come within
    ``timeout_s`` is raised (``requests.ReadTimeout``), not asked for again."""

    def increment(
        self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None
    ):
        if isinstance(error, ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


def retry_policy(retries: int) -> Retry:
    """``retries`` more tries after a connection error or a 408/502/503/504 (any method: the calls
    are pure); the last answer is returned rather than raised, for ``Client`` to report."""
    return _Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        allowed_methods=None,
        status_forcelist=RETRY_STATUS,
        backoff_factor=BACKOFF_S,
        backoff_max=BACKOFF_MAX_S,
        raise_on_status=False,
    )


class ServiceError(RuntimeError):
    """The service refused the request; ``status`` is the HTTP code, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


CHUNK_MB = 32.0  # request bodies stay well under the server's default max_request_mb (64)
BYTES_PER_NONZERO = 8  # an Arrow body's int32 gene index + float32 count per non-zero


def chunks(indptr: np.ndarray, max_cells: int, max_nnz: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) row ranges of at most ``max_cells`` cells and ``max_nnz``
    non-zeros each (a single cell above ``max_nnz`` goes alone: the server names the limit)."""
    bounds, start, n = [], 0, len(indptr) - 1
    while start < n:
        stop = min(start + max_cells, n)
        fit = int(np.searchsorted(indptr, indptr[start] + max_nnz, side="right")) - 1
        stop = max(start + 1, min(stop, fit))
        bounds.append((start, stop))
        start = stop
    return bounds


class Client:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        chunk_size: int = 5_000,
        retries: int = 3,
        timeout_s: float = 300.0,
        chunk_mb: float = CHUNK_MB,
    ) -> None:
        self.url = url.rstrip("/")
        self.chunk_size, self.retries, self.timeout_s = chunk_size, retries, timeout_s
        self.chunk_nnz = max(1, int(chunk_mb * 2**20 / BYTES_PER_NONZERO))
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry_policy(retries))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One call, retried by the session's adapter; an error status is a ``ServiceError``."""
        r = self.session.request(method, f"{self.url}{path}", timeout=self.timeout_s, **kw)
        if r.status_code < 400:
            return r
        try:
            message = r.json().get("error", r.text)
        except ValueError:
            message = r.text
        raise ServiceError(r.status_code, message)

    def health(self) -> dict:
        return self._call("GET", "/healthz").json()

    def models(self) -> dict:
        return self._call("GET", "/v1/models").json()

    def embed(self, adata: ad.AnnData, batch_key: str, layer: str | None = None) -> ad.AnnData:
        """The mapped cells with ``obsm["X_scvi"]`` (cells without counts are left out)."""
        return self._run("/v1/embed", adata, batch_key, layer)

    def annotate(
        self,
        adata: ad.AnnData,
        batch_key: str,
        layer: str | None = None,
        k: int | None = None,
        unknown_threshold: float | None = None,
        method: str | None = None,
    ) -> ad.AnnData:
        """A copy of the mapped cells with ``obsm["X_scvi"]`` and, per label key of the served
        index, the columns ``censusvi annotate`` writes (``censusvi.outputs.answer_columns``);
        ``method``: knn, head or ensemble (default: the server's)."""
        options = (("k", k), ("unknown_threshold", unknown_threshold), ("method", method))
        params = {name: v for name, v in options if v is not None}
        return self._run("/v1/annotate", adata, batch_key, layer, params)

    def _run(
        self,
        path: str,
        adata: ad.AnnData,
        batch_key: str,
        layer: str | None,
        params: dict | None = None,
    ) -> ad.AnnData:
        if batch_key not in adata.obs.columns:
            raise ValueError(
                f"batch_key {batch_key!r} is not an obs column; obs has {sorted(adata.obs.columns)}"
            )
        x = to_csr32(counts_matrix(adata, layer), "the query")
        genes, symbols = gene_ids_and_symbols(adata.var)
        batch = adata.obs[batch_key].astype(str).to_numpy()
        # Cells without counts never map (as `censusvi annotate` leaves them out): a chunk of
        # only such cells would be refused, failing the whole call.
        rows = np.flatnonzero((x != 0).getnnz(axis=1))  # NaN, negative: the server says why
        if len(rows) < x.shape[0]:
            x, batch = x[rows], batch[rows]
        answers = []
        for start, stop in chunks(x.indptr, self.chunk_size, self.chunk_nnz):
            body = encode_arrow_request(x[start:stop], genes, batch[start:stop], symbols)
            try:
                r = self._call(
                    "POST",
                    path,
                    data=body,
                    params=params or {},
                    headers={"Content-Type": ARROW, "Accept": ARROW},
                )
            except ServiceError as e:
                if e.status == 422 and NO_COUNTS in str(e):
                    continue  # counts only over genes the model lacks: none of these map
                raise
            res = decode_result(r.content, r.headers.get("content-type", ""))
            res["positions"] = rows[res["positions"] + start]
            answers.append(res)
        if not answers:
            raise ValueError(f"all {adata.n_obs} query cells {NO_COUNTS}: nothing mapped")
        return _annotated_copy(adata, answers)


def _annotated_copy(adata: ad.AnnData, answers: list[dict]) -> ad.AnnData:
    positions = np.concatenate([a["positions"] for a in answers])
    out = adata[positions].copy() if len(positions) < adata.n_obs else adata.copy()
    out.obsm[LATENT_KEY] = np.concatenate([a["latent"] for a in answers]).astype(np.float32)
    out.obs[NLL_COLUMN] = np.concatenate([a["nll_per_count"] for a in answers])
    for key in answers[0]["labels"]:
        frame = pd.concat([a["labels"][key] for a in answers], ignore_index=True)
        write_answers(out.obs, key, frame)
    versions = sorted({str(a["model"]["version"]) for a in answers})
    out.uns[UNS_KEY] = {
        "model": answers[0]["model"]["name"],
        "versions": versions,  # more than one when the alias moved between chunks
        "cells_mapped": int(len(positions)),
        "cells_sent": int(adata.n_obs),
        "explorer": [a["explorer"] for a in answers if a.get("explorer")],  # one page per request
    }
    if answers[0].get("method"):  # /v1/annotate: the label transfer method that answered
        out.uns[UNS_KEY]["method"] = answers[0]["method"]
    return out
