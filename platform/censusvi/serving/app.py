"""The censusvi Ray Serve application: HTTP ingress -> mapping (the model) -> annotation (FAISS).

Each deployment is a thin layer over a plain class of ``censusvi.serving`` (load in
``__init__``, parse in ``__call__``): ``Mapper`` over ``ModelHost``, ``Annotator`` over
``IndexHost``, ``Results`` over ``ResultStore``, ``Versions`` over ``VersionBoard``, and the
``Ingress`` (FastAPI: auth, size limits, decoding) over the request parsing; each ingress replica
records its metrics through ``ray.serve.metrics`` (``ReplicaMetrics``) and ``GET /metrics`` sums
Ray's exports. Small requests that arrive together are joined by ``@serve.batch`` (``grouping``).
The ingress pins one version per request: the one the board serves. When an alias moves, every
Mapper and Annotator replica loads the new version in the background and the board serves it only
once all hold it (``versions``), so no request waits on a cold load and none is dropped.

``build_app(args)`` is the builder of ``import_path: censusvi.serving.app:build_app`` (the
shipped ``serve_config.yaml``, ``serve run``) and of ``censusvi serve``.
"""

import asyncio
import logging
import threading
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
from censusvi.serving.deploy import (
    configured_options,
    deployment_options,
    held_bytes,
    ingress_ongoing,
    replica_memory_check,
)
from censusvi.serving.mapper import ModelHost
from censusvi.serving.metrics import ReplicaMetrics, combine, node_exports
from censusvi.serving.parsing import refusal, transfer_options, wants_arrow
from censusvi.serving.results import ResultStore, explorer_path, kept_result, new_result_id
from censusvi.serving.settings import Settings, check_servable, current_version
from censusvi.serving.versions import HELD, VersionBoard, sync

log = logging.getLogger("censusvi.serve")

app = FastAPI(
    title="censusvi",
    description="scVI reference mapping and cell-type annotation",
    docs_url=None,  # served below, behind the token like every route but /healthz
    redoc_url=None,
    openapi_url=None,
)
# join what arrives within 20 ms: at 5 ms, 100-cell requests under load went alone and the
# Mapper spent ~33 ms of CPU on each; at 20 ms ~26 ms (bench/RESULTS.md, serve efficiency)
BATCH = {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}
SERVED_BY = "censusvi-served-by"  # answer header: the Mapper and Annotator replicas that answered


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Versions:
    """The version board (one replica): follows the alias and serves a new version once every
    Mapper and Annotator replica reports holding it."""

    def __init__(self, settings: dict) -> None:
        self.s = Settings(**settings)
        self.app_name = serve.get_replica_context().app_name
        self.board = VersionBoard(self.s, self._running)
        threading.Thread(target=self._tick, daemon=True).start()

    def _running(self) -> dict[str, int]:
        app = serve.status().applications.get(self.app_name)
        deployments = app.deployments if app else {}
        running = {
            d: deployments[d].replica_states.get("RUNNING", 0) for d in HELD if d in deployments
        }
        return {d: int(n) for d, n in running.items()}

    def _tick(self) -> None:
        while True:
            time.sleep(self.s.tick_s)
            try:
                self.board.tick()
            except Exception as e:  # the registry briefly unreachable must not stop serving
                log.warning("version board: %s (still serving %s)", e, self.board.served)

    def report(self, deployment: str, replica: str, versions: list[str], cold: int) -> dict:
        return self.board.report(deployment, replica, versions, cold)

    def state(self) -> dict:
        return self.board.state()

    def served(self) -> str:
        return self.board.served


class Holder:
    """A Mapper or Annotator replica's side of the board: before it takes requests it loads the
    versions wanted; then, each tick, it reports and loads (in the background) what is wanted."""

    async def join(self, board, host, reserved: int | None) -> None:
        ctx = serve.get_replica_context()
        self.board, self.host, self.s = board, host, host.s
        self.deployment, self.replica = ctx.replica_id.deployment_id.name, ctx.replica_id.unique_id
        host.store.fits = replica_memory_check(self.s, self.deployment, reserved)
        for _ in range(3):  # the board may have moved on while this replica loaded
            wanted = await self.board.report.remote(*self._report_args())
            missing = [v for v in wanted["keep"] if v not in host.store.held()]
            if not missing:
                break
            for v in missing:
                if host.store.admits(v):
                    await asyncio.to_thread(host.store.prepare, v)
        threading.Thread(target=self._follow, daemon=True).start()

    def _report_args(self, held: list[str] | None = None) -> tuple:
        store = self.host.store
        held = store.held() if held is None else held
        return self.deployment, self.replica, held, store.cold_loads

    def _report(self, held: list[str]) -> dict:  # on the follower's thread
        return self.board.report.remote(*self._report_args(held)).result()

    def _follow(self) -> None:
        keep = getattr(self.host, "keep", None)
        while True:
            time.sleep(self.s.tick_s)
            try:
                sync(self.host.store, self._report, keep)
            except Exception as e:  # a failed load is tried again next tick; the old one serves
                log.warning("%s %s: %s", self.deployment, self.replica, e)

    def info(self, version: str) -> dict:
        return self.host.info(version)


@serve.deployment(ray_actor_options={"num_cpus": 1})
class Mapper(Holder):
    async def __init__(self, settings: dict, board, reserved: int | None = None) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica uses its GPU
        await self.join(board, ModelHost(Settings(**settings), device), reserved)

    @serve.batch(**BATCH)
    async def map(self, requests: list[tuple[Any, str]]) -> list[dict]:
        """Each call passes one (cells, version) tuple; Serve hands a list of them here."""
        answers = await asyncio.to_thread(self.host.map_all, requests)
        return [{**a, "replica": self.replica} for a in answers]


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Annotator(Holder):
    async def __init__(self, settings: dict, board, results, reserved: int | None = None) -> None:
        self.results = results
        await self.join(board, IndexHost(Settings(**settings)), reserved)

    def explore(self, item: dict) -> str:
        return self.host.explore(item)

    @serve.batch(**BATCH)
    async def annotate(
        self, mapped: list[dict], versions: list[str], options: list[tuple], keeps: list[dict]
    ):
        """Each call passes the Mapper's answer, its version, (k, threshold, method) and what
        the explorer keeps (``kept_result``'s arguments from the ingress); a request the Mapper
        refused is answered with nothing (the ingress sends its error). The explorer's copies of
        the batch go to ``Results`` in one call, before the answers name them. The Mapper's NLL
        goes along for the out-of-reference detection."""
        asked = [
            (m["latent"], v, *o, m.get("nll_per_count"))
            for m, v, o in zip(mapped, versions, options)
            if "error" not in m
        ]
        answers = iter(await asyncio.to_thread(self.host.annotate_all, asked))
        out = [{"labels": {}} if "error" in m else next(answers) for m in mapped]
        kept = [
            (kept_result(m, a, v, **keep), keep["owner"])
            for m, a, v, keep in zip(mapped, out, versions, keeps)
            if "error" not in m and "error" not in a
        ]
        if kept:
            await self.results.put_many.remote(kept)
        return [{**a, "replica": self.replica} for a in out]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class Results:
    """Finished annotations for ``GET /explorer/{id}``: one replica, so any ingress finds them."""

    def __init__(self, settings: dict) -> None:
        s = Settings(**settings)
        self.store = ResultStore(s.results_kept, s.results_max_cells, s.results_ttl_s)

    def put_many(self, items: list[tuple[dict, str | None]]) -> list[str]:
        return [self.store.put(item, owner, item["result_id"]) for item, owner in items]

    def get(self, rid: str, owner: str | None) -> dict | None:
        return self.store.get(rid, owner)


def _json_error(status: int, message: str, **kw) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, **kw)


UNAUTHORISED = "missing or wrong bearer token: send 'Authorization: Bearer <token>'"


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    async def __init__(self, mapper, annotator, results, board, settings: dict) -> None:
        self.mapper, self.annotator, self.results, self.board = mapper, annotator, results, board
        self.metrics = ReplicaMetrics()
        self.app_name = serve.get_replica_context().app_name
        self.s = Settings(**settings)
        # a config's max_ongoing_requests must fit the memory budget (Serve applies it after
        # build_app, so it is checked here too): a clear error instead of an unbounded ingress
        config = getattr(serve.get_replica_context(), "_deployment_config", None)
        ingress_ongoing(self.s, getattr(config, "max_ongoing_requests", None))
        self.name = self.s.model_name
        self.version = await board.served.remote()
        self.metrics.serving(self.name, self.version)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        """Pin new requests to the version the board serves (checked every tick)."""
        while True:
            time.sleep(self.s.tick_s)
            try:
                served = self.board.served.remote().result()
            except Exception as e:
                log.warning("version board unreachable (still serving %s): %s", self.version, e)
                continue
            if served != self.version:
                log.info("serving version %s", served)
                self.version = served
                self.metrics.serving(self.name, served)

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

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # probes send either
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.name, "version": self.version}

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        version = self.version
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
            body = await read_body(request, int(self.s.max_request_mb * 2**20), self.s.body_idle_s)
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
        """Map, then annotate: the Mapper's answer goes to the Annotator as an object reference
        (not through this replica), which also keeps the explorer's copy (``Results``)."""
        from censusvi.wire import encode_result

        version = self.version  # one version answers the whole request
        mapping = self.mapper.map.remote((cells, version))
        if endpoint == "annotate":
            rid, owner = new_result_id(), self._owner(request)
            keep = {"result_id": rid, "owner": owner, "name": self.name, "batch": cells.batch}
            labelling = self.annotator.annotate.remote(mapping, version, options, keep)
        mapped = await mapping
        if "error" in mapped:
            return _json_error(mapped["status"], mapped["error"]), 0
        model = {"name": self.name, "version": version}
        result = {"model": model, "n_cells": cells.n_cells, **mapped}
        served_by = [f"Mapper#{mapped['replica']}"]
        if endpoint == "annotate":
            labelled = await labelling  # kept for the explorer by then: the link works at once
            if "error" in labelled:
                return _json_error(labelled["status"], labelled["error"]), 0
            served_by.append(f"Annotator#{labelled['replica']}")
            result.update(labels=labelled["labels"], method=labelled.get("method"))
            result.update(result_id=rid, explorer=explorer_path(rid))
        arrow = wants_arrow(request.headers.get("accept"))
        payload, media = await asyncio.to_thread(encode_result, result, arrow)
        headers = {SERVED_BY: " ".join(served_by)}
        return Response(payload, media_type=media, headers=headers), len(mapped["positions"])


def build_app(args: dict[str, Any]):
    """The application: ``args`` are ``Settings`` fields (strings from ``serve run`` are typed),
    ``token``/``token_file``, and ``deployments`` (name -> options merged over the code's:
    ``deploy.deployment_options``). Serve's builder: one parameter."""
    check_servable(Settings.from_args(args))
    return checked_app(args)


def checked_app(args: dict[str, Any]):
    """``build_app`` for settings ``check_servable`` has passed already (``censusvi serve``
    checks them before Ray starts), so the driver does not load the model twice."""
    import ray

    s = Settings.from_args(args)
    version = current_version(s)  # an unset alias or a missing model fails here, with its reason
    gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    configured = configured_options(args)
    options = deployment_options(s, configured, held_bytes(s, version), gpus)
    settings = s.to_dict()
    memory = {d: options[d]["ray_actor_options"].get("memory") for d in HELD}  # bytes reserved
    board = Versions.options(**options["Versions"]).bind(settings)
    results = Results.options(**options["Results"]).bind(settings)
    return Ingress.options(**options["Ingress"]).bind(
        Mapper.options(**options["Mapper"]).bind(settings, board, memory["Mapper"]),
        Annotator.options(**options["Annotator"]).bind(
            settings, board, results, memory["Annotator"]
        ),
        results,
        board,
        settings,
    )
