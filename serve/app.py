"""The censusvi Ray Serve application: HTTP ingress -> mapping (the model) -> annotation (FAISS).

- ``Mapper`` holds model versions and maps queries exactly as ``censusvi map`` does; small
  requests arriving together with the same gene list are joined into one forward pass
  (``@serve.batch``). Mapping is row-independent, so a joined answer equals a lone one.
- ``Annotator`` holds each version's FAISS index and label table and transfers labels as
  ``censusvi annotate`` does, also batched.
- ``Metrics`` keeps the Prometheus counters for ``GET /metrics`` (one replica, fed by every ingress).
- ``Ingress`` (FastAPI): auth, size limits, payload decoding, and the served version. It pins one
  version per request and polls the registry; when the alias moves it warms the new version in
  the mappers and annotators first, then switches. Replicas keep the previous version loaded, so
  requests already under way finish on it: none is dropped.

``build_app(args)`` is the builder ``serve run serve/config.yaml`` and ``censusvi serve`` call.
"""

import asyncio
import logging
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

log = logging.getLogger("censusvi.serve")
app = FastAPI(
    title="censusvi",
    description="scVI reference mapping and cell-type annotation",
    docs_url=None,  # served below, behind the token like every route but /healthz
    redoc_url=None,
    openapi_url=None,
)


@dataclass(frozen=True)
class Settings:
    """What ``build_app`` accepts (the ``args`` of serve/config.yaml)."""

    model: str = "models:/censusvi-scvi@production"  # a models:/ URI or a model directory
    index: str | None = None  # only with a model directory: its index directory
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI
    token_sha256: str | None = (
        None  # of the bearer token (args: token_file or token); None: no auth
    )
    max_cells: int = 50_000  # per request (413 above)
    max_request_mb: float = 512.0  # per request body (413 above)
    registry_poll_s: float = 10.0  # how often an alias is re-resolved
    allow_surgery: bool = (
        False  # train new batch columns per request (models that encode the batch)
    )
    k: int = 15
    unknown_threshold: float = 1.0
    results_kept: int = 100  # annotations kept for GET /explorer/{id}: at most this many,
    results_max_cells: int = 500_000  # this many cells in all,
    results_ttl_s: float = 3600.0  # and this long

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "Settings":
        from censusvi.serving.auth import token_digest

        known = {f for f in cls.__dataclass_fields__} - {"token_sha256"}
        accepted = known | {"deployments", "token", "token_file"}
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(accepted)}")
        s = cls(**{k: v for k, v in args.items() if k in known})
        tracking = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        digest = token_digest(args.get("token"), args.get("token_file"))
        return cls(**{**asdict(s), "tracking_uri": tracking, "token_sha256": digest})

    @property
    def limits(self):
        from censusvi.untrusted import DecodeLimits

        return DecodeLimits.for_body_limit(self.max_cells, int(self.max_request_mb * 2**20))

    @property
    def registered(self) -> bool:
        return self.model.startswith("models:/")


def current_version(s: Settings) -> str:
    from censusvi.registry.versions import resolve_version

    return resolve_version(s.model, s.tracking_uri) if s.registered else "local"


class VersionCache:
    """Whatever ``load(version)`` builds, for the last ``capacity`` versions, built once each
    (threads asking together wait for one). Two: the version served and the one before it,
    which requests still under way finish on."""

    def __init__(self, load: Callable[[str], Any], capacity: int = 2) -> None:
        self.load, self.capacity = load, capacity
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, version: str) -> Any:
        with self.lock:
            if version not in self.items:
                self.items[version] = self.load(version)
                while len(self.items) > self.capacity:
                    self.items.popitem(last=False)
            self.items.move_to_end(version)
            return self.items[version]


class VersionFetcher:
    """A local copy of a version's files (a registry download), or the model directory given."""

    def __init__(self, s: Settings, part: str) -> None:
        self.s, self.part = s, part  # "model" or "index": what this replica reads
        self.tmp = tempfile.TemporaryDirectory(prefix="censusvi-serve-")

    def __call__(self, version: str):
        from censusvi.registry.versions import VersionFiles, fetch_version, parse_model_uri

        if not self.s.registered:
            return VersionFiles(self.s.model, "local", self.s.model, self.s.index)
        name = parse_model_uri(self.s.model)[0]
        dst, uri, part = f"{self.tmp.name}/{version}", self.s.tracking_uri, self.part
        return fetch_version(name, version, dst, uri, model=part == "model", index=part == "index")


def _error(status: int, message: str) -> dict:
    return {"error": message, "status": status}


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Mapper:
    def __init__(self, settings: dict) -> None:
        import torch

        from censusvi.model.io import load_model

        self.s = Settings(**settings)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica uses its GPU
        fetch = VersionFetcher(self.s, "model")

        def load(version: str):
            files = fetch(version)
            return files, load_model(files.model_dir, device)

        self.models = VersionCache(load)
        self.models.get(current_version(self.s))  # fail at start, not on the first request

    def load(self, version: str) -> str:
        self.models.get(version)
        return version

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

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def map(self, requests: list[tuple[Any, str]]) -> list[dict]:
        """Each call passes one (cells, version) tuple; Serve hands a list of them here."""
        return await asyncio.to_thread(self._map_all, requests)

    def _map_all(self, requests: list[tuple[Any, str]]) -> list[dict]:
        results: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (cells, version) in enumerate(requests):
            _, model = self.models.get(version)
            new = sorted(set(cells.batch) - set(model.batch_categories))
            if new and model.config.encode_covariates:
                if not self.s.allow_surgery:
                    results[i] = _error(
                        422,
                        f"batch(es) {new[:5]} are not batches of the reference, and this model "
                        "encodes the batch, so their latent needs surgery training: map the query "
                        "with `censusvi map` (or label cells with reference batches); this server "
                        "runs without allow_surgery",
                    )
                    continue
                groups[(version, i)] = [i]  # surgery trains on one query's cells only
            else:
                groups.setdefault((version, tuple(cells.genes)), []).append(i)
        for (version, _), members in groups.items():
            for i, res in zip(members, self._map_group(version, [requests[i][0] for i in members])):
                results[i] = res
        return results

    def _map_group(self, version: str, parts: list) -> list[dict]:
        from censusvi.wire import QueryCells

        if len(parts) > 1:
            joined = QueryCells(
                sp.vstack([p.x for p in parts]).tocsr(),
                parts[0].genes,
                np.concatenate([p.batch for p in parts]),
            )
            try:
                whole = self._map_one(version, joined)
            except ValueError:  # one part's fault: map each alone to say whose
                return [self._map_safely(version, p) for p in parts]
            return self._split(whole, parts)
        return [self._map_safely(version, parts[0])]

    def _map_safely(self, version: str, cells) -> dict:
        try:
            return self._map_one(version, cells)
        except ValueError as e:
            return _error(422, str(e))
        except Exception as e:  # a request never takes the replica down; the log keeps the trace
            log.exception("mapping failed")
            return _error(422, f"the query could not be mapped ({type(e).__name__}: {e})")

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

    @staticmethod
    def _split(whole: dict, parts: list) -> list[dict]:
        out, start = [], 0
        for p in parts:
            stop = start + p.n_cells
            keep = (whole["positions"] >= start) & (whole["positions"] < stop)
            labels, counts = np.unique(p.batch, return_counts=True)
            report = {
                **whole["report"],
                "cells_per_batch": {str(b): int(c) for b, c in zip(labels, counts)},
                "new_batches": [b for b in whole["report"]["new_batches"] if b in set(labels)],
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


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Annotator:
    def __init__(self, settings: dict) -> None:
        from censusvi.annotate.index import load_index
        from censusvi.report.layout import fit_reference_layout

        self.s = Settings(**settings)
        fetch = VersionFetcher(self.s, "index")

        def load(version: str):
            files = fetch(version)
            return load_index(files.index_dir) if files.index_dir else None

        self.indexes = VersionCache(load)
        self.indexes.get(current_version(self.s))
        # The explorer's reference map, fitted on first use per version (a UMAP takes seconds).
        self.layouts = VersionCache(lambda v: fit_reference_layout(self.indexes.get(v)))

    def load(self, version: str) -> str:
        self.indexes.get(version)
        return version

    def explore(self, item: dict) -> str:
        """The explorer page of a kept result: its cells placed on this version's reference map."""
        import pandas as pd

        from censusvi.report.content import report_content
        from censusvi.report.page import render_page

        version = item["model"]["version"]
        layout = self.layouts.get(version)
        key = next(iter(item["labels"]))
        frame = item["labels"][key]
        cells = pd.DataFrame(
            {
                f"predicted_{key}": frame["predicted"].to_numpy(),
                f"{key}_probability": frame["probability"].to_numpy(),
                f"{key}_uncertainty": frame["uncertainty"].to_numpy(),
                "batch": item["batch"],
                "censusvi_nll_per_count": item["nll_per_count"],
            }
        )
        content = report_content(
            cells, item["latent"], layout, key, item["report"],
            title=f"censusvi explorer: {item['model']['name']} version {version}, "
            f"result {item['result_id']}",
        )  # fmt: skip
        return render_page(content)

    def info(self, version: str) -> dict:
        ix = self.indexes.get(version)
        if ix is None:
            return {"index": None}
        return {
            "index": {k: ix.meta.get(k) for k in ("n_cells", "kind", "label_keys", "evaluation")}
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def annotate(self, requests: list[tuple[np.ndarray, str, int, float]]) -> list[dict]:
        return await asyncio.to_thread(self._annotate_all, requests)

    def _annotate_all(self, requests: list[tuple[np.ndarray, str, int, float]]) -> list[dict]:
        from censusvi.annotate.pipeline import transfer_all

        results: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, (_, version, k, thr) in enumerate(requests):
            groups.setdefault((version, k, thr), []).append(i)
        for (version, k, thr), members in groups.items():
            ix = self.indexes.get(version)
            if ix is None:
                for i in members:
                    results[i] = _error(
                        409,
                        f"model version {version} was registered without an index, so it cannot "
                        "annotate: register it with `censusvi models register MODEL --index DIR`",
                    )
                continue
            latent = np.concatenate([requests[i][0] for i in members])
            labels = transfer_all(ix, latent, k, thr) if len(latent) else {}
            start = 0
            for i in members:
                stop = start + len(requests[i][0])
                results[i] = {
                    "labels": {
                        key: frame.iloc[start:stop].reset_index(drop=True)
                        for key, frame in labels.items()
                    }
                }
                start = stop
        return results


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Metrics:
    """Prometheus counters for the whole app (ingress replicas report here)."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "censusvi_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "censusvi_errors",
            "requests answered with an error status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "censusvi_request_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.cells = Counter(
            "censusvi_cells", "cells answered", ["endpoint"], registry=self.registry
        )
        self.rate = Gauge(
            "censusvi_cells_per_second",
            "cells answered per second over the last 60 s",
            registry=self.registry,
        )
        self.served = Gauge(
            "censusvi_model_version",
            "the model version being served",
            ["name"],
            registry=self.registry,
        )
        self.recent: deque[tuple[float, int]] = deque()

    def record(self, endpoint: str, status: int, seconds: float, cells: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if cells:
            self.cells.labels(endpoint).inc(cells)
            self.recent.append((time.monotonic(), cells))

    def serving(self, name: str, version: str) -> None:
        if version.isdigit():
            self.served.clear()
            self.served.labels(name).set(int(version))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()
        self.rate.set(sum(c for _, c in self.recent) / self.WINDOW_S)
        return generate_latest(self.registry)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Results:
    """Finished annotations for ``GET /explorer/{id}``, bounded in count, cells and age."""

    def __init__(self, settings: dict) -> None:
        self.s = Settings(**settings)
        self.items: OrderedDict[str, dict] = OrderedDict()

    def put(self, item: dict, owner: str | None) -> str:
        """Keep ``item`` for the token digest ``owner`` (None: a server without a token)."""
        rid = secrets.token_urlsafe(24)  # 192 random bits: unguessable
        self.items[rid] = {**item, "result_id": rid, "owner": owner, "kept_at": time.monotonic()}
        self._evict()
        return rid

    def get(self, rid: str, owner: str | None) -> dict | None:
        """The result, only for the token that created it (None for any other)."""
        import hmac

        self._evict()
        item = self.items.get(rid)
        if item is None or not hmac.compare_digest(str(item["owner"]), str(owner)):
            return None
        return item

    def _evict(self) -> None:
        now = time.monotonic()
        while self.items and (
            len(self.items) > self.s.results_kept
            or sum(len(i["latent"]) for i in self.items.values()) > self.s.results_max_cells
            or now - next(iter(self.items.values()))["kept_at"] > self.s.results_ttl_s
        ):
            self.items.popitem(last=False)


# Module functions the deployments call are defined above them: Serve pickles a deployment's class
# (with the globals it names) where the decorator runs.
def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _positive(value: str | None, default, kind: type, name: str, low, high):
    if value is None:
        return default
    try:
        v = kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a {kind.__name__}") from None
    if not low <= v <= high:
        raise ValueError(f"{name}={v} is outside [{low}, {high}]")
    return v


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, mapper, annotator, metrics, results, settings: dict) -> None:
        self.mapper, self.annotator, self.metrics = mapper, annotator, metrics
        self.results = results
        self.s = Settings(**settings)
        self.version = current_version(self.s)
        self.model_name = (
            self.s.model.removeprefix("models:/").split("@")[0].split("/")[0]
            if self.s.registered
            else os.path.basename(os.path.normpath(self.s.model))  # a model directory
        )
        self.metrics.serving.remote(self.model_name, self.version)
        if self.s.registered and "@" in self.s.model:
            threading.Thread(target=self._follow_alias, daemon=True).start()

    def _follow_alias(self) -> None:
        """Re-resolve the alias; warm a new version everywhere it is needed, then switch."""
        while True:
            time.sleep(self.s.registry_poll_s)
            try:
                version = current_version(self.s)
                if version != self.version:
                    self.mapper.load.remote(version).result()
                    self.annotator.load.remote(version).result()
                    log.info("alias %s moved: serving version %s", self.s.model, version)
                    self.version = version
                    self.metrics.serving.remote(self.model_name, version)
            except Exception as e:  # the registry being briefly unreachable must not stop serving
                log.warning("registry poll failed (still serving %s): %s", self.version, e)

    def _authorised(self, request: Request) -> bool:
        from censusvi.serving.auth import authorised

        return authorised(request.headers.get("authorization"), self.s.token_sha256)

    def _owner(self, request: Request) -> str | None:
        from censusvi.serving.auth import presented_digest

        return (
            presented_digest(request.headers.get("authorization")) if self.s.token_sha256 else None
        )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        if not self._authorised(request):
            return self._unauthorised()
        return get_swagger_ui_html(openapi_url="openapi.json", title="censusvi")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_name, "version": self.version}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if not self._authorised(request):
            return self._unauthorised()
        version = self.version
        info = await self.mapper.info.remote(version)
        info.update(await self.annotator.info.remote(version))
        info.update(
            uri=self.s.model,
            limits={"max_cells": self.s.max_cells, "max_request_mb": self.s.max_request_mb},
        )
        return JSONResponse(info)

    @app.get("/explorer/{result_id}")
    async def explorer(self, result_id: str, request: Request) -> Response:
        """The mapping of one finished annotation, as an interactive page. With a token set it
        needs that token, and a result opens only for the token that created it."""
        if not self._authorised(request):
            return self._unauthorised()
        item = await self.results.get.remote(result_id, self._owner(request))
        if item is None:
            return JSONResponse(
                {"error": f"no result {result_id!r}: results are kept for "
                 f"{self.s.results_ttl_s:g} s and the last {self.s.results_kept}"},
                status_code=404,
            )  # fmt: skip
        page = await self.annotator.explore.remote(item)
        return Response(page, media_type="text/html")

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if not self._authorised(request):
            return self._unauthorised()
        return Response(await self.metrics.render.remote(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed")
    async def embed(self, request: Request) -> Response:
        return await self._answer(request, "embed")

    @app.post("/v1/annotate")
    async def annotate(self, request: Request) -> Response:
        return await self._answer(request, "annotate")

    @staticmethod
    def _unauthorised() -> Response:
        return JSONResponse(
            {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _answer(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        response, cells = await self._compute(request, endpoint)
        self.metrics.record.remote(endpoint, response.status_code, time.perf_counter() - t0, cells)
        return response

    async def _read_body(self, request: Request) -> tuple[bytes, str]:
        from censusvi.serving.body import read_body, upload_file

        body = await read_body(request, int(self.s.max_request_mb * 2**20))
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            return await upload_file(request, body), "application/x-hdf5"
        return body, ctype

    async def _compute(self, request: Request, endpoint: str) -> tuple[Response, int]:
        from censusvi.serving.body import BadUpload, BodyTooLarge, too_large_message
        from censusvi.wire import PayloadTooLarge, decode_request

        if not self._authorised(request):
            return self._unauthorised(), 0
        q = request.query_params
        try:
            body, ctype = await self._read_body(request)
            k = _positive(q.get("k"), self.s.k, int, "k", 1, 1000)
            thr = _positive(
                q.get("unknown_threshold"),
                self.s.unknown_threshold,
                float,
                "unknown_threshold",
                0.0,
                1.0,
            )
            args = (body, ctype, q.get("batch_key"), q.get("layer"), self.s.limits)
            cells = await asyncio.to_thread(decode_request, *args)
        except BodyTooLarge:
            return _json_error(413, too_large_message(self.s.max_request_mb)), 0
        except PayloadTooLarge as e:
            return _json_error(413, str(e)), 0
        except (ValueError, BadUpload) as e:
            return _json_error(422, str(e)), 0
        except Exception as e:  # whatever a decoder missed is the body's fault, not the server's
            log.exception("request decoding failed")
            return _json_error(422, f"the body cannot be decoded ({type(e).__name__}: {e})"), 0
        return await self._answer_cells(request, endpoint, cells, k, thr)

    async def _answer_cells(self, request: Request, endpoint: str, cells, k: int, thr: float):
        from censusvi.wire import ARROW, encode_result

        version = self.version  # one version answers the whole request
        mapped = await self.mapper.map.remote((cells, version))
        if "error" in mapped:
            return _json_error(mapped["status"], mapped["error"]), 0
        result = {
            "model": {"name": self.model_name, "version": version},
            "n_cells": cells.n_cells,
            **mapped,
        }
        if endpoint == "annotate":
            labelled = await self.annotator.annotate.remote((mapped["latent"], version, k, thr))
            if "error" in labelled:
                return _json_error(labelled["status"], labelled["error"]), 0
            result["labels"] = labelled["labels"]
            kept = {**result, "batch": cells.batch[mapped["positions"]]}
            result["result_id"] = await self.results.put.remote(kept, self._owner(request))
            result["explorer"] = f"/explorer/{result['result_id']}"
        payload, media = await asyncio.to_thread(
            encode_result, result, ARROW in request.headers.get("accept", "")
        )
        return Response(payload, media_type=media), len(mapped["positions"])


def build_app(args: dict[str, Any]):
    """The application for ``serve run serve/config.yaml`` / ``censusvi serve``. ``args`` are
    ``Settings`` fields; ``deployments`` (name -> options) overrides deployment options."""
    import ray

    s = Settings.from_args(args)
    current_version(s)  # an unset alias or a missing model fails here, with its reason
    overrides = dict(args.get("deployments") or {})
    mapper_opts = dict(overrides.get("Mapper", {}))
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    if has_gpu and "num_gpus" not in mapper_opts.get("ray_actor_options", {}):
        mapper_opts["ray_actor_options"] = {
            **mapper_opts.get("ray_actor_options", {}),
            "num_gpus": 1,
        }
    settings = asdict(s)
    mapper = Mapper.options(**mapper_opts).bind(settings)
    annotator = Annotator.options(**overrides.get("Annotator", {})).bind(settings)
    metrics = Metrics.options(**overrides.get("Metrics", {})).bind()
    results = Results.options(**overrides.get("Results", {})).bind(settings)
    return Ingress.options(**overrides.get("Ingress", {})).bind(
        mapper, annotator, metrics, results, settings
    )
