"""The Serve app over real HTTP on 127.0.0.1, serving versions from a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import scipy.sparse as sp

from censusvi import defaults
from censusvi.annotate.index import load_index, save_index
from censusvi.annotate.pipeline import annotate, index_reference
from censusvi.client import Client, ServiceError
from censusvi.model.io import load_model
from censusvi.registry.versions import promote, register_version
from censusvi.server import wait_healthy
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
from censusvi.wire import ARROW, decode_result, encode_arrow_request
from conftest import simulated_adata
from hostile import csr_body

ROOT = Path(__file__).resolve().parents[1]
NAME = "censusvi-test"
POOL = simulated_adata(n_cells=1400, n_batches=3, seed=1)  # one draw: same cell-type programs
BODY_IDLE_S = 3.0  # a stalled body's wait, short for the test that stalls bodies
NO_CPU = {"ray_actor_options": {"num_cpus": 0}}  # share the session's 2-CPU Ray with Ray Train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions: 1 encodes the batch (production), 2 does not (a candidate)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    POOL[:600].copy().write_h5ad(tmp / "ref.h5ad")
    dirs = {}
    for version, (seed, encode, epochs) in {"1": (0, True, 8), "2": (1, False, 2)}.items():
        cfg = PretrainConfig(
            DataConfig(source=str(tmp / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
            ModelSettings(n_hidden=16, n_latent=4, encode_covariates=encode),
            TrainConfig(schedule="census", max_epochs=epochs, lr=1e-2, batch_size=64, seed=seed),
        )
        model, _ = pretrain(cfg, tmp / f"m{version}", quiet=True)
        save_index(index_reference(model, tmp / "ref.h5ad", ["cell_type"]), tmp / f"ix{version}")
        assert register_version(tmp / f"m{version}", tmp / f"ix{version}", NAME, uri) == version
        dirs[version] = (tmp / f"m{version}", tmp / f"ix{version}")
    promote(NAME, "1", "production", uri=uri)
    yield uri, dirs
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def app_args(uri: str, replicas: int = 1) -> dict:
    """The app's args: the production alias, limits small enough to test, no CPUs reserved,
    ``replicas`` Mappers and Annotators."""
    deployments = {d: dict(NO_CPU) for d in ("Ingress", "Mapper", "Annotator", "Results")}
    for d in ("Mapper", "Annotator"):
        deployments[d]["num_replicas"] = replicas
    return {
        "model": f"models:/{NAME}@production",
        "tracking_uri": uri,
        "registry_poll_s": 0.5,
        "tick_s": 0.25,
        "max_cells": 500,
        "max_request_mb": 1,
        "body_idle_s": BODY_IDLE_S,
        "deployments": deployments,
    }


@pytest.fixture(scope="module")
def served(local_ray, registry):
    """The app as serve/app.py builds it, on a free loopback port, limits small enough to test."""
    from ray import serve

    from censusvi.serving.app import build_app

    uri, _ = registry
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(uri)), name="censusvi", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 120)
    yield url
    serve.shutdown()


def query(n: int = 200, seed: int = 2):
    """Cells the reference did not see, of its cell types and batches (b0..b2)."""
    rows = 600 + np.random.default_rng(seed).choice(len(POOL) - 600, n, replace=False)
    return POOL[np.sort(rows)].copy()


def in_process(registry, version: str, adata, method: str | None = None):
    model_dir, index_dir = registry[1][version]
    out, _ = annotate(load_model(model_dir), load_index(index_dir), adata, "batch", method=method)
    return out


def assert_same_annotation(served_out, local_out):
    np.testing.assert_allclose(served_out.obsm["X_scvi"], local_out.obsm["X_scvi"], atol=1e-5)
    assert list(served_out.obs["predicted_cell_type"].astype(str)) == list(
        local_out.obs["predicted_cell_type"].astype(str)
    )
    np.testing.assert_allclose(
        served_out.obs["cell_type_probability"], local_out.obs["cell_type_probability"], atol=1e-5
    )
    np.testing.assert_allclose(
        served_out.obs["cell_type_uncertainty"], local_out.obs["cell_type_uncertainty"], atol=1e-5
    )


def test_client_annotate_equals_in_process_annotate(served, registry):
    q = query()
    out = Client(served, chunk_size=70).annotate(q, batch_key="batch")  # 3 chunked requests
    assert out.uns["censusvi"]["versions"] == ["1"] and out.n_obs == q.n_obs
    assert out.uns["censusvi"]["method"] == defaults.METHOD  # no ?method=: the default
    assert_same_annotation(out, in_process(registry, "1", q))
    assert out.obs["predicted_cell_type"].astype(str).eq(q.obs["cell_type"]).mean() > 0.9
    knn = Client(served).annotate(q, batch_key="batch", method="knn")
    assert knn.uns["censusvi"]["method"] == "knn"
    assert_same_annotation(knn, in_process(registry, "1", q, method="knn"))


def test_client_chunks_of_cells_without_counts_leave_those_cells_out(served, registry):
    """A chunk of cells with no counts over the model's genes was a 422 that failed the whole
    call, where `censusvi annotate` leaves such cells out: so does the Client now."""
    import anndata as ad

    q = query(30, seed=6)
    extra = ad.AnnData(  # a gene the model lacks: cells 10-19 count only there
        sp.csr_matrix(np.r_[np.zeros(10), np.full(10, 5.0), np.zeros(10)].reshape(-1, 1)),
        obs=q.obs[[]], var=pd.DataFrame({"gene_ids": ["ENSG99999999999"]}, index=["NEW"]),
    )  # fmt: skip
    x = q.X.toarray()
    x[10:] = 0  # cells 20-29: no counts at all
    q.X = sp.csr_matrix(x)
    q = ad.concat([q, extra], axis=1, merge="first")
    out = Client(served, chunk_size=10).annotate(q, batch_key="batch")
    assert (
        list(out.obs_names) == list(q.obs_names[:10]) and out.uns["censusvi"]["cells_mapped"] == 10
    )
    assert_same_annotation(out, in_process(registry, "1", q[:10].copy()))
    with pytest.raises(ValueError, match="all 20 query cells have zero counts over the model"):
        Client(served).annotate(q[10:].copy(), batch_key="batch")
    bad = query(10, seed=6)  # a NaN count is the server's to refuse, not a cell to drop
    bad.X = bad.X.toarray()
    bad.X[3] = np.nan
    with pytest.raises(ServiceError, match="NaN"):
        Client(served).annotate(bad, batch_key="batch")


def test_a_repeated_gene_id_beside_unique_symbols_maps_as_in_the_cli(served, registry):
    """Genes are aligned by whichever names match most, and only those must be unique (as
    `censusvi annotate` does): one repeated id beside unique symbols was a 422 over HTTP."""
    q = query(40, seed=7)
    ids = list(q.var["gene_ids"])
    ids[1] = ids[0]
    r = post_json(served, csr_body(q, genes=ids, symbols=list(q.var_names)))
    assert r.status_code == 200, r.text
    local = q.copy()
    local.var["gene_ids"] = ids
    expected = in_process(registry, "1", local)
    np.testing.assert_allclose(r.json()["latent"], expected.obsm["X_scvi"], atol=1e-5)
    r = post_json(served, csr_body(q, genes=ids))  # ids alone: the repeat is the matched key
    assert r.status_code == 422 and f"1 repeat, e.g. {ids[0]}" in r.json()["error"], r.text


def test_json_and_h5ad_bodies_answer_like_arrow(served, registry, tmp_path):
    q = query(60, seed=3)
    local = in_process(registry, "1", q)
    x = sp.csr_matrix(q.X)
    r = requests.post(f"{served}/v1/annotate", json=csr_body(q), timeout=60)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["model"] == {"name": NAME, "version": "1"} and res["n_cells"] == 60
    np.testing.assert_allclose(np.array(res["latent"]), local.obsm["X_scvi"], atol=1e-5)
    assert res["labels"]["cell_type"]["predicted"] == list(
        local.obs["predicted_cell_type"].astype(str)
    )
    q.write_h5ad(tmp_path / "q.h5ad")
    r = requests.post(
        f"{served}/v1/annotate",
        params={"batch_key": "batch"},
        files={"file": ("q.h5ad", (tmp_path / "q.h5ad").read_bytes())},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["latent"]), local.obsm["X_scvi"], atol=1e-5)
    r = requests.post(
        f"{served}/v1/embed",
        data=encode_arrow_request(x, list(q.var["gene_ids"]), q.obs["batch"]),
        headers={"Content-Type": ARROW, "Accept": ARROW},
        timeout=60,
    )
    embedded = decode_result(r.content, r.headers["content-type"])
    assert embedded["labels"] == {}
    np.testing.assert_allclose(embedded["latent"], local.obsm["X_scvi"], atol=1e-5)


def test_concurrent_small_requests_are_batched_without_changing_answers(served, registry):
    parts = [query(30, seed=10 + i) for i in range(8)]
    outs: list = [None] * len(parts)

    def call(i: int) -> None:
        outs[i] = Client(served).annotate(parts[i], batch_key="batch")

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for part, out in zip(parts, outs):
        assert_same_annotation(out, in_process(registry, "1", part))


def post_json(url: str, body: dict | bytes, **kw) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(
        f"{url}/v1/annotate",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
        **kw,
    )


def test_every_error_answers_its_status_and_reason(served):
    q = query(20, seed=4)

    def error_of(r: requests.Response) -> tuple[int, str]:
        return r.status_code, r.json()["error"]

    status, msg = error_of(post_json(served, csr_body(query(600, seed=5))))
    assert status == 413 and "limit is 500 cells" in msg
    status, msg = error_of(post_json(served, b"{" + b" " * (2 * 2**20) + b"}"))
    assert status == 413 and "limit of 1 MB" in msg
    status, msg = error_of(post_json(served, csr_body(q, genes=[f"XYZ{i}" for i in range(200)])))
    assert status == 422 and "ENSG" in msg  # names the id type the model expects
    body = csr_body(q)
    status, msg = error_of(post_json(served, {**body, "data": [v + 0.5 for v in body["data"]]}))
    assert status == 422 and "non-integer" in msg
    status, msg = error_of(post_json(served, {**body, "data": [float("nan")] + body["data"][1:]}))
    assert status == 422 and "NaN" in msg
    status, msg = error_of(post_json(served, {**body, "batch": ["lab-x"] * 20}))
    assert status == 422 and "lab-x" in msg and "censusvi map" in msg
    status, msg = error_of(post_json(served, {**body, "batch": ["b0"] * 3}))
    assert status == 422 and "3 labels for 20 cells" in msg
    status, msg = error_of(post_json(served, {k: v for k, v in body.items() if k != "genes"}))
    assert status == 422 and "'genes'" in msg
    status, msg = error_of(post_json(served, body, params={"k": "0"}))
    assert status == 422 and "k 0: neighbours per cell must be an integer >= 1" in msg
    status, msg = error_of(post_json(served, body, params={"method": "x" * 500}))
    assert status == 422 and "choose one of knn, head, ensemble" in msg and len(msg) < 120
    r = requests.post(f"{served}/v1/annotate", data=b"x", headers={"Content-Type": "text/csv"})
    assert r.status_code == 422 and "unsupported content type" in r.json()["error"]
    with pytest.raises(ServiceError) as e:
        Client(served).annotate(q[:, :10].copy(), batch_key="batch")
    assert e.value.status == 422 and "only 10 of the model's 200 genes" in str(e.value)


def test_models_health_and_metrics(served):
    assert requests.get(f"{served}/healthz", timeout=10).json()["version"] == "1"
    info = requests.get(f"{served}/v1/models", timeout=10).json()
    assert info["name"] == NAME and info["version"] == "1" and info["n_latent"] == 4
    assert info["index"]["label_keys"] == ["cell_type"] and info["limits"]["max_cells"] == 500

    def counter(text: str, line_start: str) -> float:
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_start))

    def scrape() -> str:
        r = requests.get(f"{served}/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return r.text

    ok = 'censusvi_requests_total{endpoint="annotate",status="200"}'
    cells = 'censusvi_cells_total{endpoint="annotate"}'
    err = 'censusvi_errors_total{endpoint="annotate",status="422"}'
    before = scrape()  # settled: earlier tests' requests exported
    while (now := scrape()) != before or "censusvi_requests_total" not in now:
        before = now
        time.sleep(1.5)
    Client(served).annotate(query(40, seed=6), batch_key="batch")
    post_json(served, csr_body(query(20), batch=["b0"]))  # 422
    deadline = time.monotonic() + 60  # Ray exports each replica's metrics every second here,
    while True:  # each metric on its own: wait for all three
        after = scrape()
        grown = [counter(after, m) > counter(before, m) for m in (ok, cells, err)]
        if all(grown) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert counter(after, ok) == counter(before, ok) + 1
    assert counter(after, cells) == counter(before, cells) + 40
    # >=: a 422 of an earlier test can reach Ray's export after the settle window above
    assert counter(after, err) >= counter(before, err) + 1
    assert 'censusvi_request_seconds_bucket{endpoint="annotate",le="+Inf"}' in after
    assert "censusvi_cells_per_second " in after
    assert "application=" not in after and "replica=" not in after  # Ray's own tags dropped
    assert f'censusvi_model_version{{name="{NAME}"}} 1.0' in after


def chromium():
    """Headless Debian Chromium driven by Debian's chromedriver (no browser download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        assert Path(path).exists(), f"{path} missing: `make test` installs chromium-driver"
    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def test_explorer_page_in_a_real_browser(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    q = query(150, seed=9)
    out = Client(served).annotate(q, batch_key="batch")
    (link,) = out.uns["censusvi"]["explorer"]
    predicted = set(out.obs["predicted_cell_type"].astype(str))
    browser = chromium()
    try:
        browser.get(f"{served}{link}")
        WebDriverWait(browser, 120).until(
            lambda b: b.execute_script("return window.censusviReady === true")
        )
        legend = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "#legend li.legend-item")]  # fmt: skip
        assert set(legend) == predicted
        drawn = browser.execute_script("return JSON.parse(document.getElementById('report-data').textContent).query.x.length")  # fmt: skip
        assert drawn == q.n_obs
        browser.save_screenshot(str(tmp_path / "explorer.png"))
    finally:
        browser.quit()
    assert (tmp_path / "explorer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert requests.get(f"{served}/explorer/{'0' * 32}", timeout=10).status_code == 404


def test_a_model_directory_is_served_without_a_registry(served, registry):
    """`--model DIR --index IX`: the same app from files, here as a second app under /local."""
    from ray import serve

    from censusvi.serving.app import build_app

    model_dir, index_dir = registry[1]["1"]
    args = {"model": str(model_dir), "index": str(index_dir),
            "deployments": {d: NO_CPU for d in ("Ingress", "Mapper", "Annotator", "Results")}}  # fmt: skip
    serve.run(build_app(args), name="local", route_prefix="/local", blocking=False)
    try:
        wait_healthy(f"{served}/local", 120)
        q = query(40, seed=11)
        out = Client(f"{served}/local").annotate(q, batch_key="batch")
        assert out.uns["censusvi"]["model"] == model_dir.name
        assert out.uns["censusvi"]["versions"] == ["local"]
        assert_same_annotation(out, in_process(registry, "1", q))
    finally:
        serve.delete("local")


def running_replicas(app: str = "censusvi") -> dict[str, int]:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in deployments.items()}


def board_state(app: str = "censusvi") -> dict:
    from ray import serve

    return serve.get_deployment_handle("Versions", app_name=app).state.remote().result()


def test_alias_move_reaches_every_replica_warm_and_drops_nothing(served, registry):
    """Two Mapper and two Annotator replicas serve a request stream while the alias moves: every
    replica answers with the new version after the switch, no request fails, and none waits on
    a cold load (each replica loaded version 2 in the background before it was sent to it).
    Last in this module: it leaves version 2 in production."""
    from ray import serve

    from censusvi.serving.app import SERVED_BY, build_app

    uri, _ = registry
    serve.run(build_app(app_args(uri, replicas=2)), name="censusvi", route_prefix="/", blocking=False)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts, state = running_replicas(), board_state()
        if counts["Mapper"] == counts["Annotator"] == 2 and len(state["replicas"]) == 4:
            break
        time.sleep(0.5)
    assert len(state["replicas"]) == 4, (counts, state)
    body = csr_body(query(25, seed=7))
    answers: list[dict] = []
    stop = threading.Event()

    def stream() -> None:
        session = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = session.post(f"{served}/v1/annotate", json=body, timeout=60)
                ok = r.status_code == 200
                version = r.json()["model"]["version"] if ok else r.text[:200]
                by = r.headers.get(SERVED_BY, "").split()
            except Exception as e:  # any failure is what this test looks for
                ok, version, by = False, repr(e), []
            answers.append({"sent": sent, "done": time.monotonic(), "ok": ok, "version": version, "by": by})  # fmt: skip

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    warm = time.monotonic() + 60  # a baseline of answers before the move, however loaded
    while len(answers) < 12 and time.monotonic() < warm:
        time.sleep(0.1)
    moved = time.monotonic()  # the gate is test_registry's; here the move itself is under test
    promote(NAME, "2", "production", force=True, uri=uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        by_new = {r for a in answers if a["version"] == "2" for r in a["by"]}
        if len(by_new) == 4:
            break
        time.sleep(0.2)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()

    failures = [a for a in answers if not a["ok"]]
    assert not failures, failures[:3]
    replicas = {f"{st['deployment']}#{r}" for r, st in board_state()["replicas"].items()}
    assert {r for a in answers if a["version"] == "1" for r in a["by"]} == replicas
    assert {r for a in answers if a["version"] == "2" for r in a["by"]} == replicas
    first_new = min(a["done"] for a in answers if a["version"] == "2")
    assert {a["version"] for a in answers if a["sent"] > first_new} == {"2"}  # no way back
    for r in replicas:  # every replica's answers end on version 2
        assert [a["version"] for a in answers if r in a["by"]][-1] == "2", r
    cold = {r: st["cold_loads"] for r, st in board_state()["replicas"].items()}
    assert set(cold.values()) == {0}, cold  # no replica loaded a version on a request's path
    before = sorted(a["done"] - a["sent"] for a in answers if a["done"] < moved)
    around = [a["done"] - a["sent"] for a in answers if abs(a["sent"] - first_new) < 3]
    typical = before[len(before) // 2]
    print(f"latency: median {typical * 1e3:.0f} ms before the switch, at most {max(around) * 1e3:.0f} ms around it ({len(around)} requests)")  # fmt: skip
    assert len(before) > 10 and max(around) < max(2.0, 10 * typical)
    q = query(25, seed=7)
    out = Client(served).annotate(q, batch_key="batch")
    assert out.uns["censusvi"]["versions"] == ["2"]
    assert_same_annotation(out, in_process(registry, "2", q))


def test_cli_serve_with_token_until_sigterm(registry, tmp_path):
    """The contract command line: ready on /healthz, bearer auth, stops on SIGTERM."""
    uri, dirs = registry
    port, token = free_port(), "s3cret"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "censusvi.cli", "serve", "--model", f"models:/{NAME}/1",
         "--port", str(port), "--token-file", str(token_file), "--quiet"],
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT / "platform")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 180)
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.get(f"{url}/v1/models", headers=wrong, timeout=10).status_code == 401
        with pytest.raises(ServiceError) as e:
            Client(url).annotate(query(10), batch_key="batch")
        assert e.value.status == 401 and "bearer token" in str(e.value)
        q = query(30, seed=8)
        assert_same_annotation(
            Client(url, token=token).annotate(q, batch_key="batch"), in_process(registry, "1", q)
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "ready at" in out and "stopping" in out
    # --quiet: no Ray or Serve INFO lines, and no Ray noise from a normal stop
    assert " INFO " not in out and "INFO " not in out.split("ready at")[0], out[-2000:]
    assert "graceful_shutdown" not in out and "Traceback" not in out, out[-2000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
