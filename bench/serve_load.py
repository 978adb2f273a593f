"""Load on the Serve app over loopback: N concurrent clients for T seconds, 100- and 2,000-cell requests.

A Census-architecture model (2 x 128, 50 latent, 2,000 HVGs) is trained on the FACS-sorted PBMC
reference of pbmc_zheng_sorted_donorA_mudan.h5ad, indexed on its 9 sorted types, registered in a
temporary MLflow store and promoted; the app runs with serve/config.yaml's deployments
(autoscaling on) on a local Ray. Requests are the unlabelled donor-A cells (a new batch),
resampled to each request size, sent as Arrow to ``POST /v1/annotate``. Reports throughput
(cells/s), latency p50/p95/p99, errors, and the Mapper/Annotator/Ingress replica counts over time.

The same work in-process (decode the Arrow body, map, transfer labels, encode the answer; the
same model and index files, the same N threads, run between the Serve phases while the app is
idle, so on the same cores under the same outside load) is the baseline: the last line (a contract) is ``serve efficiency vs in-process: E``, the lower over the
request sizes of Serve's cells/s divided by in-process cells/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from censusvi.wire import ARROW, encode_arrow_request  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pbmc_zheng_sorted_donorA_mudan.h5ad"


def register_model(tmp: Path, epochs: int) -> str:
    from censusvi.annotate.index import save_index
    from censusvi.annotate.pipeline import index_reference
    from censusvi.registry.versions import promote, register_version
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    reference = "cell_type != 'unknown'"
    cfg = PretrainConfig(
        DataConfig(source=str(DATA), obs_filter=reference, batch_keys=("batch",), n_hvg=2000),
        ModelSettings(),  # the Census architecture
        TrainConfig(max_epochs=epochs, batch_size=256, lr=1e-3, seed=0, schedule="census"),
    )
    model, _ = pretrain(cfg, tmp / "model", quiet=True)
    save_index(index_reference(model, DATA, ["cell_type"], reference), tmp / "index")
    version = register_version(tmp / "model", tmp / "index", "censusvi-bench")
    promote("censusvi-bench", version, "production")
    return version


def request_bodies(n_cells: int, n_bodies: int = 8) -> list[bytes]:
    import anndata as ad

    from censusvi.data.counts import to_csr32
    from censusvi.data.h5ad import gene_ids_and_symbols

    a = ad.read_h5ad(DATA)
    a = a[a.obs["cell_type"] == "unknown"]
    x, genes = to_csr32(a.X), gene_ids_and_symbols(a.var)[0]
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(n_bodies):
        rows = rng.choice(a.n_obs, n_cells, replace=n_cells > a.n_obs)
        bodies.append(encode_arrow_request(x[rows], genes, ["donorA"] * n_cells))
    return bodies


def replica_counts() -> dict[str, int]:
    import ray
    from ray import serve

    if not ray.is_initialized():  # the in-process phases
        return {}

    app = serve.status().applications.get("censusvi")
    if app is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}


def over_http(url: str):
    """One annotate request through the Serve app: None, or what went wrong."""
    local = threading.local()

    def send(body: bytes) -> str | None:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        try:
            r = local.session.post(
                f"{url}/v1/annotate",
                data=body,
                headers={"Content-Type": ARROW, "Accept": ARROW},
                timeout=120,
            )
        except requests.RequestException as e:
            return repr(e)
        return None if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"

    return send


def in_process(tmp: Path):
    """The same request's work in this process: decode, map, transfer labels, encode."""
    from censusvi.annotate.index import load_index
    from censusvi.annotate.pipeline import transfer_all
    from censusvi.mapping.query import map_query
    from censusvi.model.io import load_model
    from censusvi.serving.settings import Settings
    from censusvi.wire import decode_request, encode_result

    model, index, s = load_model(tmp / "model"), load_index(tmp / "index"), Settings()

    def send(body: bytes) -> str | None:
        cells = decode_request(body, ARROW, limits=s.limits)
        mq = map_query(model, cells.to_anndata(), "batch")
        labels = transfer_all(
            index, mq.latent, s.k, s.unknown_threshold, method=s.method, nll=mq.nll_per_count
        )
        result = {"model": {"name": "bench", "version": "1"}, "n_cells": cells.n_cells,
                  "positions": mq.positions, "latent": mq.latent,
                  "nll_per_count": mq.nll_per_count, "report": mq.report, "labels": labels}  # fmt: skip
        encode_result(result, True)
        return None

    return send


def load_phase(send, bodies, n_cells: int, clients: int, seconds: float, rounds=None) -> dict:
    """``clients`` threads sending back to back for ``seconds``; with ``rounds`` (earlier
    phases of the same work), the figures are over all of them together."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        j = i
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            err = send(bodies[j % len(bodies)])
            with lock:
                if err:
                    errors.append(err)
                else:
                    latencies.append(time.perf_counter() - t0)
            j += clients

    timeline: list[dict] = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        timeline.append({"t": round(time.monotonic() - t_start, 1), **replica_counts()})
        time.sleep(1.0)
    for t in threads:
        t.join()
    wall = time.monotonic() - t_start
    for earlier in rounds or []:
        wall += earlier["seconds"]
        latencies += earlier["latencies_s"]
        errors += earlier["error_examples"][: earlier["errors"]]
        timeline = earlier["replicas_over_time"] + timeline
    lat = np.array(latencies) * 1000
    return {
        "cells_per_request": n_cells,
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors,
        "latencies_s": latencies,
        "cells_per_s": round(len(latencies) * n_cells / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "replicas_over_time": timeline,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--sizes", default="100,2000")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of untimed load first")
    p.add_argument("--rounds", type=int, default=2, help="in-process and Serve phases in turn")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--logical-cpus", type=int, default=8, help="Ray CPUs (room to autoscale)")
    p.add_argument("--port", type=int, default=8765, help="the app's HTTP port on 127.0.0.1")
    p.add_argument("--out", type=Path, default=ROOT / ".bench" / "serve_load.json")
    a = p.parse_args()
    import ray
    from ray import serve

    from censusvi.server import deployment_options, wait_healthy

    tmp = Path(tempfile.mkdtemp(prefix="censusvi-serve-load-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    version = register_model(tmp, a.epochs)
    sizes = [int(s) for s in a.sizes.split(",")]
    bodies = {n: request_bodies(n) for n in sizes}
    ray.init(
        num_cpus=a.logical_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path[:2])}},
    )
    from censusvi.serving.app import build_app

    port = a.port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": "models:/censusvi-bench@production", "deployments": deployment_options()}
    serve.run(build_app(args), name="censusvi", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 300)
    local_send, http_send = in_process(tmp), over_http(url)
    phases, local = [], {}
    for n in sizes:  # in-process, then through Serve (idle meanwhile): the same cores, in turn
        load_phase(http_send, bodies[n], n, a.clients, a.warmup)  # autoscaling settles
        here, there, part = None, None, a.seconds / a.rounds
        for _ in range(a.rounds):  # alternated: outside load drifts over minutes
            here = load_phase(local_send, bodies[n], n, a.clients, part, here and [here])
            there = load_phase(http_send, bodies[n], n, a.clients, part, there and [there])
        local[n] = here
        phases.append(there)
        show(f"{n:>5}-cell requests, in-process, {a.clients} threads", local[n])
        show(f"{n:>5}-cell requests, Serve, {a.clients} clients", phases[-1])
    serve.shutdown()
    ray.shutdown()
    ratios = {
        n: ph["cells_per_s"] / max(local[n]["cells_per_s"], 1e-9) for n, ph in zip(sizes, phases)
    }
    for ph in phases + list(local.values()):
        del ph["latencies_s"]
        ph["error_examples"] = ph["error_examples"][:3]
    result = {"model_version": version, "cpu_count": os.cpu_count(), "phases": phases,
              "in_process": list(local.values()), "efficiency": ratios}  # fmt: skip
    a.out.parent.mkdir(exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    errors = sum(ph["errors"] for ph in phases)
    print(f"serve load errors: {errors} (details in {a.out})")
    for n, e in ratios.items():
        print(f"{n:>5}-cell requests: Serve / in-process = {e:.2f}")
    print(f"serve efficiency vs in-process: {min(ratios.values()):.2f}", flush=True)
    return 0 if errors == 0 else 1


def show(what: str, ph: dict) -> None:
    peak = max((row.get("Mapper", 0) for row in ph["replicas_over_time"]), default=0)
    print(
        f"{what}, {ph['seconds']} s: {ph['cells_per_s']:,.0f} cells/s, p50 {ph['p50_ms']} ms, "
        f"p95 {ph['p95_ms']} ms, p99 {ph['p99_ms']} ms, errors {ph['errors']}"
        + (f", Mapper replicas up to {peak}" if peak else ""),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
