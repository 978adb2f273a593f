"""The censusvi Ray Serve application: HTTP ingress -> mapping (the model) -> annotation (FAISS).

Each deployment is a thin layer over a plain class of ``censusvi.serving`` (load in
``__init__``, parse in ``__call__``): ``Mapper`` over ``ModelHost``, ``Annotator`` over
``IndexHost``, ``Results`` over ``ResultStore``, and the ``Ingress`` (FastAPI: auth, size limits,
decoding) over ``AliasFollower`` and the request parsing; each ingress replica records its metrics
through ``ray.serve.metrics`` (``ReplicaMetrics``) and ``GET /metrics`` sums Ray's exports.
Small requests that arrive together are joined by ``@serve.batch`` (``grouping``). The ingress pins
one version per request; when an alias moves it warms the new version in the mappers and
annotators first, then switches, and replicas keep the previous version, so none is dropped.

``build_app(args)`` is the builder of ``import_path: censusvi.serving.app:build_app`` (the
shipped ``serve_config.yaml``, ``serve run``) and of ``censusvi serve``.
"""

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

# Module-level names the deployments use are bound above them: Serve pickles a deployment's class
# (with the globals it names) where its decorator runs.
from censusvi.serving.annotator import IndexHost
from censusvi.serving.auth import authorised, presented_digest
from censusvi.serving.body import read_body, upload_file
from censusvi.serving.mapper import ModelHost
from censusvi.serving.metrics import ReplicaMetrics, combine, node_exports
from censusvi.serving.parsing import refusal, transfer_options
from censusvi.serving.results import ResultStore
from censusvi.serving.settings import Settings, current_version
from censusvi.serving.versions import AliasFollower

app = FastAPI(
    title="censusvi",
    description="scVI reference mapping and cell-type annotation",
    docs_url=None,  # served below, behind the token like every route but /healthz
    redoc_url=None,
    openapi_url=None,
)
BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}  # join what arrives within 5 ms


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Mapper:
    def __init__(self, settings: dict) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica uses its GPU
        self.host = ModelHost(Settings(**settings), device)

    def load(self, version: str) -> str:
        return self.host.load(version)

    def info(self, version: str) -> dict:
        return self.host.info(version)

    @serve.batch(**BATCH)
    async def map(self, requests: list[tuple[Any, str]]) -> list[dict]:
        """Each call passes one (cells, version) tuple; Serve hands a list of them here."""
        return await asyncio.to_thread(self.host.map_all, requests)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Annotator:
    def __init__(self, settings: dict) -> None:
        self.host = IndexHost(Settings(**settings))

    def load(self, version: str) -> str:
        return self.host.load(version)

    def info(self, version: str) -> dict:
        return self.host.info(version)

    def explore(self, item: dict) -> str:
        return self.host.explore(item)

    @serve.batch(**BATCH)
    async def annotate(self, requests: list[tuple[Any, str, int, float, str]]) -> list[dict]:
        """Each call passes one (latent, version, k, threshold, method) tuple."""
        return await asyncio.to_thread(self.host.annotate_all, requests)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Results:
    """Finished annotations for ``GET /explorer/{id}``: one replica, so any ingress finds them."""

    def __init__(self, settings: dict) -> None:
        s = Settings(**settings)
        self.store = ResultStore(s.results_kept, s.results_max_cells, s.results_ttl_s)

    def put(self, item: dict, owner: str | None) -> str:
        return self.store.put(item, owner)

    def get(self, rid: str, owner: str | None) -> dict | None:
        return self.store.get(rid, owner)


def _json_error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, **kw)


UNAUTHORISED = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, mapper, annotator, results, settings: dict) -> None:
        self.mapper, self.annotator, self.results = mapper, annotator, results
        self.metrics = ReplicaMetrics()
        self.app_name = serve.get_replica_context().app_name
        self.s = Settings(**settings)
        self.name = self.s.model_name
        self.versions = AliasFollower(self.s, self._warm, self._switched)
        self._switched(self.versions.version)

    def _warm(self, version: str) -> None:  # on the follower's thread: block until loaded
        self.mapper.load.remote(version).result()
        self.annotator.load.remote(version).result()

    def _switched(self, version: str) -> None:
        self.metrics.serving(self.name, version)

    def _denied(self, request: Request) -> Response | None:
        """401 unless the request carries the token (always None without one configured)."""
        if authorised(request.headers.get("authorization"), self.s.token_sha256):
            return None
        return _json_error(401, UNAUTHORISED, headers={"WWW-Authenticate": "Bearer"})

    def _owner(self, request: Request) -> str | None:
        """Whose results: the presented token's digest (None on a server without a token)."""
        bearer = request.headers.get("authorization")
        return presented_digest(bearer) if self.s.token_sha256 else None

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Response:
        return self._denied(request) or JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        denied = self._denied(request)
        return denied or get_swagger_ui_html(openapi_url="openapi.json", title="censusvi")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "version": self.versions.version}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        version = self.versions.version
        info = await self.mapper.info.remote(version)
        info.update(await self.annotator.info.remote(version))
        limits = {"max_cells": self.s.max_cells, "max_request_mb": self.s.max_request_mb}
        return JSONResponse({**info, "uri": self.s.model, "limits": limits})

    @app.get("/explorer/{result_id}")
    async def explorer(self, result_id: str, request: Request) -> Response:
        """The mapping of one finished annotation, as an interactive page. With a token set it
        needs that token, and a result opens only for the token that created it."""
        if denied := self._denied(request):
            return denied
        item = await self.results.get.remote(result_id, self._owner(request))
        if item is None:
            kept = f"{self.s.results_ttl_s:g} s and the last {self.s.results_kept}"
            return _json_error(404, f"no result {result_id!r}: results are kept for {kept}")
        return Response(await self.annotator.explore.remote(item), media_type="text/html")

    @app.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if denied := self._denied(request):
            return denied
        texts, missing = await asyncio.to_thread(node_exports)
        if missing and not texts:
            return _json_error(503, f"no Ray metrics export answered: {'; '.join(missing)}")
        return Response(combine(texts, self.app_name), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed")
    async def embed(self, request: Request) -> Response:
        return await self._answer(request, "embed")

    @app.post("/v1/annotate")
    async def annotate(self, request: Request) -> Response:
        return await self._answer(request, "annotate")

    async def _answer(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        response, cells = await self._compute(request, endpoint)
        self.metrics.record(endpoint, response.status_code, time.perf_counter() - t0, cells)
        return response

    async def _compute(self, request: Request, endpoint: str) -> tuple[Response, int]:
        from censusvi.wire import decode_request

        if denied := self._denied(request):
            return denied, 0
        q = request.query_params
        try:
            body = await read_body(request, int(self.s.max_request_mb * 2**20))
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                body, ctype = await upload_file(request, body), "application/x-hdf5"
            options = transfer_options(q, self.s)
            args = (body, ctype, q.get("batch_key"), q.get("layer"), self.s.limits)
            cells = await asyncio.to_thread(decode_request, *args)
        except Exception as e:
            return _json_error(*refusal(e, self.s)), 0
        return await self._answer_cells(request, endpoint, cells, options)

    async def _answer_cells(self, request: Request, endpoint: str, cells, options: tuple):
        from censusvi.wire import ARROW, encode_result

        version = self.versions.version  # one version answers the whole request
        mapped = await self.mapper.map.remote((cells, version))
        if "error" in mapped:
            return _json_error(mapped["status"], mapped["error"]), 0
        model = {"name": self.name, "version": version}
        result = {"model": model, "n_cells": cells.n_cells, **mapped}
        if endpoint == "annotate":
            labelled = await self.annotator.annotate.remote((mapped["latent"], version, *options))
            if "error" in labelled:
                return _json_error(labelled["status"], labelled["error"]), 0
            result["labels"] = labelled["labels"]
            kept = {**result, "batch": cells.batch[mapped["positions"]]}
            result["result_id"] = await self.results.put.remote(kept, self._owner(request))
            result["explorer"] = f"/explorer/{result['result_id']}"
        arrow = ARROW in request.headers.get("accept", "")
        payload, media = await asyncio.to_thread(encode_result, result, arrow)
        return Response(payload, media_type=media), len(mapped["positions"])


def build_app(args: dict[str, Any]):
    """The application: ``args`` are ``Settings`` fields (strings from ``serve run`` are typed),
    ``token``/``token_file``, and ``deployments`` (name -> options overriding the decorators')."""
    import ray

    s = Settings.from_args(args)
    current_version(s)  # an unset alias or a missing model fails here, with its reason
    options = {name: dict(o) for name, o in (args.get("deployments") or {}).items()}
    mapper = options.setdefault("Mapper", {})
    actor = dict(mapper.get("ray_actor_options", {}))
    if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
        actor.setdefault("num_gpus", 1)  # a GPU per model replica when the cluster has GPUs
        mapper["ray_actor_options"] = actor
    settings = s.to_dict()
    return Ingress.options(**options.get("Ingress", {})).bind(
        Mapper.options(**mapper).bind(settings),
        Annotator.options(**options.get("Annotator", {})).bind(settings),
        Results.options(**options.get("Results", {})).bind(settings),
        settings,
    )
