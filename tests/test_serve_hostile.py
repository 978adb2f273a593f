"""Hostile requests against the real Serve app over 127.0.0.1: every one is a 4xx with its reason,
no server file leaks, and the same replicas answer the next honest request (no restart)."""

from __future__ import annotations

import json
import os
import select
import socket

import pytest
import ray
import requests

from censusvi.client import Client
from hostile import SECRET, csr_body, hostile_payloads
from test_serve import NO_CPU, query, registry, served  # noqa: F401  (module fixtures)

TOKEN = "hostile-test-token"
APPS = ("Ingress", "Mapper", "Annotator", "Results")


def replicas() -> set[str]:
    """Serve's replica actors now alive: a replica that died is replaced under a new name."""
    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"]
    }


def honest(url: str, **kw) -> None:
    q = query(20, seed=21)
    r = requests.post(f"{url}/v1/annotate", json=csr_body(q), timeout=60, **kw)
    assert r.status_code == 200, r.text
    assert len(r.json()["latent"]) == 20


@pytest.fixture(scope="module")
def secure(served, registry, tmp_path_factory):  # noqa: F811
    """A second app from version 2's files (batch-free encoder), behind a token file."""
    from ray import serve

    from censusvi.server import wait_healthy
    from censusvi.serving.app import build_app

    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    model_dir, index_dir = registry[1]["2"]
    args = {"model": str(model_dir), "index": str(index_dir), "token_file": str(token_file),
            "max_cells": 500, "max_request_mb": 1, "deployments": {d: NO_CPU for d in APPS}}  # fmt: skip
    serve.run(build_app(args), name="secure", route_prefix="/secure", blocking=False)
    wait_healthy(f"{served}/secure", 120)
    yield f"{served}/secure"
    serve.delete("secure")


def test_each_hostile_payload_is_a_4xx_and_the_same_replicas_answer_next(served, tmp_path):  # noqa: F811
    before = replicas()
    assert before, "no Serve replicas found"
    for name, (body, ctype, params, status, text) in hostile_payloads(query(40), tmp_path).items():
        r = requests.post(
            f"{served}/v1/annotate", data=body, params=params,
            headers={"Content-Type": ctype}, timeout=120,
        )  # fmt: skip
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert text in r.json()["error"], (name, r.json()["error"])
        assert SECRET[:8] not in r.content, name
        honest(served)
    assert replicas() == before


def test_bodies_over_the_limit_are_refused_while_they_stream(served):  # noqa: F811
    """300 MiB offered in chunks (no Content-Length) against a 1 MB limit: the 413 arrives
    while the client is still sending, long before the end of the body."""
    host, port = served.removeprefix("http://").split(":")
    sent, answer = 0, b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % 2**20 + b" " * 2**20 + b"\r\n"
        for _ in range(300):
            if select.select([sock], [], [], 0.02)[0]:
                answer = sock.recv(65536)
                break
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection on its 413
                answer = sock.recv(65536)
                break
            sent += 1
        while answer and b"limit of" not in answer:  # the body may follow the headers
            try:
                more = sock.recv(65536)
            except OSError:
                break
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"limit of 1 MB" in answer
    assert sent < 64, f"{sent} MiB were read before the refusal"
    files = {"file": ("q.h5ad", b"\0" * (2 * 2**20))}
    r = requests.post(f"{served}/v1/annotate", params={"batch_key": "batch"}, files=files)
    assert r.status_code == 413
    r = requests.post(f"{served}/v1/annotate", files={"other": ("x", b"abc")}, timeout=30)
    assert r.status_code == 422 and "field named 'file'" in r.json()["error"]
    honest(served)


def answer_of(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or stops for 5 s after a reply)."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
        sock.settimeout(5)
        if b"}" in answer.partition(b"\r\n\r\n")[2]:
            break
    return answer


def test_a_stalled_body_is_a_408_and_frees_its_slot(served):  # noqa: F811
    """Uploads that declare a body and send one byte held the ingress's request slots until
    Serve's 300 s timeout: more of them than max_ongoing_requests kept /healthz from answering."""
    import time

    from test_serve import BODY_IDLE_S as IDLE_S

    host, port = served.removeprefix("http://").split(":")
    socks, t0 = [], time.monotonic()
    try:
        for _ in range(12):
            sock = socket.create_connection((host, int(port)), timeout=IDLE_S + 30)
            sock.sendall(
                b"POST /v1/annotate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{"
            )
            socks.append(sock)
        answers = [answer_of(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    waited = time.monotonic() - t0  # 8 slots (max_ongoing_requests): two rounds of IDLE_S
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:300]
    assert all(b"stopped arriving for" in a for a in answers), answers[0]
    assert IDLE_S - 1 < waited < 2 * IDLE_S + 20, waited
    assert requests.get(f"{served}/healthz", timeout=10).status_code == 200
    honest(served)


def test_token_guards_every_route_but_healthz(secure):
    assert requests.get(f"{secure}/healthz", timeout=10).status_code == 200
    assert requests.head(f"{secure}/healthz", timeout=10).status_code == 200  # probes send HEAD too
    for route in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/explorer/abc"):
        r = requests.get(f"{secure}{route}", timeout=10)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", route
        wrong = {"Authorization": "Bearer not-the-token"}
        assert requests.get(f"{secure}{route}", headers=wrong, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{secure}/metrics", headers=auth, timeout=60).status_code == 200
    assert requests.get(f"{secure}/openapi.json", headers=auth, timeout=10).json()["paths"]
    out = Client(secure, token=TOKEN).annotate(query(30, seed=22), batch_key="batch")
    (link,) = out.uns["censusvi"]["explorer"]
    rid = link.rsplit("/", 1)[1]
    assert len(rid) >= 32 and rid.replace("-", "").replace("_", "").isalnum()
    assert requests.get(f"{secure}{link}", timeout=30).status_code == 401
    assert requests.get(f"{secure}{link}", headers=auth, timeout=60).status_code == 200


def test_explorer_shows_hostile_labels_as_text(secure, tmp_path):
    """A batch label that is HTML: the page (saved as a user would, then opened in Chromium)
    shows it as text on hover, and its script never runs. A batch named "__proto__" gets its
    colour (the page's colour map was a plain object, whose "__proto__" key is its prototype:
    those cells were drawn in the previous cell's colour, their legend swatch blank)."""
    from test_serve import chromium

    label = '<img src=x onerror="window.pwned=1">'
    q = query(30, seed=23)
    body = csr_body(q, batch=[label] * 15 + ["__proto__"] * 15)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(f"{secure}/v1/annotate", json=body, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    page = requests.get(f"{secure}{r.json()['explorer']}", headers=auth, timeout=60).text
    assert label not in page  # the embedded data escapes '<' and '>'
    (tmp_path / "explorer.html").write_text(page)
    browser = chromium()
    try:
        browser.get((tmp_path / "explorer.html").as_uri())
        hovered = browser.execute_script(
            """const r = cv.getBoundingClientRect(), texts = [];
            for (let i = 0; i < Q.x.length; i++) {
              cv.dispatchEvent(new MouseEvent('mousemove', {clientX: r.left + px(Q.x[i]), clientY: r.top + py(Q.y[i])}));
              texts.push(document.getElementById('tip').textContent);
            }
            return texts;"""
        )
        assert any(label in t for t in hovered), hovered[:3]
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements("css selector", "#tip img")
        swatches = browser.execute_script(
            """const s = document.getElementById('view'); s.value = 'batch';
            s.dispatchEvent(new Event('change'));
            return [...document.querySelectorAll('#legend li.legend-item')].map(
              li => [li.dataset.label, li.querySelector('.swatch').style.background]);"""
        )
        assert sorted(b for b, _ in swatches) == sorted([label, "__proto__"]), swatches
        assert all(colour.startswith("rgb(") for _, colour in swatches), swatches
    finally:
        browser.quit()


def test_token_file_and_environment_give_the_same_digest(tmp_path, monkeypatch):
    from censusvi.serving.auth import TokenError, authorised, token_digest

    (tmp_path / "t").write_text(" s3cret \n")
    monkeypatch.setenv("CENSUSVI_TOKEN", "s3cret")
    assert token_digest(token_file=str(tmp_path / "t")) == token_digest()
    d = token_digest()
    assert authorised("Bearer s3cret", d) and not authorised("Bearer s3cre", d)
    assert not authorised(None, d) and not authorised("Basic s3cret", d)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="is empty"):
        token_digest(token_file=str(tmp_path / "empty"))
    with pytest.raises(TokenError, match="missing does not exist"):
        token_digest(token_file=str(tmp_path / "missing"))
    os.mkfifo(tmp_path / "fifo")  # read forever (/dev/zero) or hang (a pipe): refused unread
    for odd in ("/dev/zero", str(tmp_path / "fifo"), str(tmp_path)):
        with pytest.raises(TokenError, match="is not a regular file"):
            token_digest(token_file=odd)
    (tmp_path / "big").write_text("x" * 5000)
    with pytest.raises(TokenError, match="is over 4096 bytes"):
        token_digest(token_file=str(tmp_path / "big"))
    (tmp_path / "latin1").write_bytes(b"caf\xe9")
    with pytest.raises(TokenError, match="is not UTF-8 text"):
        token_digest(token_file=str(tmp_path / "latin1"))
    for empty in ("", "  "):  # --token "$TOKEN" with TOKEN unset: not "no authentication"
        with pytest.raises(TokenError, match="the token is empty"):
            token_digest(token=empty)
        with pytest.raises(TokenError, match="the token file is named empty"):
            token_digest(token_file=empty)
        monkeypatch.setenv("CENSUSVI_TOKEN", empty)
        with pytest.raises(TokenError, match="CENSUSVI_TOKEN is set but empty"):
            token_digest()
    with pytest.raises(TokenError, match="the token is not text"):
        token_digest(token=0)  # `token: 0` in a Serve config's YAML
    monkeypatch.delenv("CENSUSVI_TOKEN")
    assert token_digest() is None and authorised(None, None)


def test_fuzzed_bodies_over_http_are_answered_never_5xx(served, tmp_path):  # noqa: F811
    """Hypothesis over real HTTP: mutated JSON, Arrow, .h5ad and multipart bodies, each answered
    200 or a 4xx with a reason; the replicas that started are the ones that finish."""
    from hypothesis import given
    from hypothesis import strategies as st

    from censusvi.wire import ARROW, H5AD, JSON, encode_arrow_request
    from test_fuzz import fuzz, mutations

    q = query(12, seed=24)
    x = csr_body(q)
    q.write_h5ad(tmp_path / "q.h5ad")
    h5ad = (tmp_path / "q.h5ad").read_bytes()
    arrow = encode_arrow_request(q.X, list(q.var["gene_ids"]), q.obs["batch"])
    bodies = st.one_of(
        mutations(json.dumps(x).encode()).map(lambda b: (b, JSON)),
        mutations(arrow).map(lambda b: (b, ARROW)),
        mutations(h5ad).map(lambda b: (b, H5AD)),
        mutations(h5ad[:3000]).map(lambda b: (b, "multipart")),
    )
    before = replicas()

    @fuzz(160)
    @given(bodies)
    def post(case):
        body, ctype = case
        kw = {"params": {"batch_key": "batch"}, "timeout": 120}
        if ctype == "multipart":
            r = requests.post(f"{served}/v1/annotate", files={"file": ("q.h5ad", body)}, **kw)
        else:
            r = requests.post(
                f"{served}/v1/annotate", data=body, headers={"Content-Type": ctype}, **kw
            )
        assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        if r.status_code != 200:
            assert r.json()["error"].strip()

    post()
    honest(served)
    assert replicas() == before
