"""The client's retries (urllib3's Retry on its session): connection errors and 408/502/503/504 are
tried again, a POST included; other errors and read timeouts are not; the last answer is the
error raised. A real HTTP server on 127.0.0.1 answers as scripted."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests

from censusvi.client import Client, ServiceError
from conftest import simulated_adata


class Scripted(BaseHTTPRequestHandler):
    """Answers the server's ``script`` in turn (its last entry from then on): a status, or
    ``"slow"`` (no answer for two seconds, then 200); every request is appended to ``seen``."""

    def _answer(self) -> None:
        server = self.server
        if length := int(self.headers.get("Content-Length", 0)):
            self.rfile.read(length)
        server.seen.append((self.command, self.path))
        step = server.script[min(len(server.seen), len(server.script)) - 1]
        if step == "slow":
            time.sleep(2)
            step = 200
        body = json.dumps({"ok": True} if step < 400 else {"error": f"scripted {step}"}).encode()
        self.send_response(step)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # "slow": the client stopped waiting
            pass

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    server.daemon_threads = True  # a "slow" answer does not hold up the test's end
    server.seen, server.script = [], [200]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_unavailable_then_up_is_one_answer(scripted):
    scripted.script = [503, 408, 200]  # 408: the server stopped waiting for a stalled body
    assert Client(url(scripted), retries=3).health() == {"ok": True}
    assert scripted.seen == [("GET", "/healthz")] * 3


def test_the_last_answer_is_the_error_and_a_post_is_retried(scripted):
    scripted.script = [504, 503]
    with pytest.raises(ServiceError) as e:
        Client(url(scripted), retries=2).annotate(simulated_adata(n_cells=5), batch_key="batch")
    assert e.value.status == 503 and "scripted 503" in str(e.value)
    assert scripted.seen == [("POST", "/v1/annotate")] * 3


def test_a_refusal_is_not_retried(scripted):
    scripted.script = [400, 200]
    with pytest.raises(ServiceError, match="HTTP 400: scripted 400"):
        Client(url(scripted), retries=3).models()
    assert len(scripted.seen) == 1


def test_a_read_timeout_is_not_retried(scripted):
    scripted.script = ["slow"]
    with pytest.raises(requests.ReadTimeout):
        Client(url(scripted), retries=3, timeout_s=0.5).health()
    assert len(scripted.seen) == 1


def test_no_server_is_a_connection_error_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        Client(f"http://127.0.0.1:{port}", retries=2).health()
    assert 0.9 < time.monotonic() - start < 10  # the backoff waited (0 s, then 1 s)


def test_chunks_bound_cells_and_body_size():
    """Wide or deep cells are sent in smaller chunks, so a body stays under the server's
    max_request_mb; a single cell above the bound goes alone (the server names the limit)."""
    from censusvi.client import chunks

    indptr = np.array([0, 10, 20, 100, 105, 106, 200])
    assert chunks(indptr, 5000, 30) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert chunks(indptr, 2, 1000) == [(0, 2), (2, 4), (4, 6)]
    covered = [r for a, b in chunks(indptr, 3, 50) for r in range(a, b)]
    assert covered == list(range(6))
