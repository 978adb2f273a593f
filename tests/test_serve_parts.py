"""The Serve app's parts without Ray: how a version switch reaches every replica (the version
board, a replica's store), what each deployment reserves (code options merged with config), and
how GET /metrics sums Ray's exports."""

from __future__ import annotations

import threading
import time

import pytest

from censusvi.serving.deploy import (
    CPU_DOWNSCALE_DELAY_S,
    GPU_DOWNSCALE_DELAY_S,
    REPLICA_BASE_MB,
    MiB,
    configured_options,
    deployment_options,
    files_bytes,
    memory_check,
    reserved_memory,
)
from censusvi.serving.settings import Settings
from censusvi.serving.versions import VersionBoard, VersionStore, sync
from censusvi.wire import ARROW


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def board_with(alias: list[str], running: dict[str, int], clock: Clock) -> VersionBoard:
    s = Settings(model="models:/m@production", registry_poll_s=1, tick_s=1, retire_after_s=30)
    return VersionBoard(s, lambda: running, resolve=lambda _: alias[0], clock=clock)


def test_the_board_serves_a_new_version_only_once_every_replica_holds_it():
    alias, clock = ["1"], Clock()
    board = board_with(alias, {"Mapper": 2, "Annotator": 2}, clock)
    stores = {r: VersionStore(lambda v: f"loaded {v}") for r in ("m1", "m2", "a1", "a2")}

    def report(r: str):
        deployment = "Mapper" if r.startswith("m") else "Annotator"
        return lambda held: board.report(deployment, r, held, stores[r].cold_loads)

    for r, store in stores.items():
        sync(store, report(r))
    assert all(s.held() == ["1"] for s in stores.values()) and board.served == "1"
    alias[0] = "2"
    clock.now = 1.0
    assert board.tick() == {"served": "1", "target": "2", "keep": ["1", "2"]}
    for r in ("m1", "m2", "a1"):  # three replicas load it; the fourth has not yet
        sync(stores[r], report(r))
    clock.now = 2.0
    assert board.tick()["served"] == "1"  # a2 does not hold 2: nobody is sent to it yet
    sync(stores["a2"], report("a2"))
    clock.now = 3.0
    assert board.tick() == {"served": "2", "target": "2", "keep": ["2", "1"]}
    alias[0] = "3"  # the next move waits until the previous version is retired
    clock.now = 20.0
    assert board.tick()["target"] == "2"
    clock.now = 34.0  # version 1 retired: the move to 3 starts
    assert board.tick() == {"served": "2", "target": "3", "keep": ["2", "3"]}
    for r, store in stores.items():
        sync(store, report(r))
        assert store.held() == ["2", "3"] and store.cold_loads == 0  # never more than two
    clock.now = 35.0
    assert board.tick()["served"] == "3"


def test_a_silent_replica_stops_counting_and_a_new_one_must_hold_the_target():
    alias, clock = ["1"], Clock()
    running = {"Mapper": 1, "Annotator": 1}
    board = board_with(alias, running, clock)
    board.report("Mapper", "m1", ["1"])
    board.report("Annotator", "a1", ["1"])
    alias[0], clock.now = "2", 1.0
    board.tick()
    board.report("Mapper", "m1", ["1", "2"])
    board.report("Annotator", "a1", ["1", "2"])
    running["Mapper"] = 2  # autoscaling added a replica that has not reported: wait for it
    clock.now = 2.0
    assert board.tick()["served"] == "1"
    board.report("Mapper", "m2", ["1", "2"])
    clock.now = 3.0
    assert board.tick()["served"] == "2"
    clock.now = 3.0 + board.stale_s + 1  # silent replicas are dropped from the board
    board.tick()
    assert board.state()["replicas"] == {}


def test_a_version_no_replica_can_load_does_not_stop_the_board_following_the_alias(caplog):
    """A refused version (damaged, or too large to load beside the served one) stayed the
    target for good: the promote that fixed it, or a rollback, went unseen (a hostile probe)."""
    alias, clock = ["1"], Clock()
    board = board_with(alias, {"Mapper": 1, "Annotator": 1}, clock)
    board.report("Mapper", "m1", ["1"])
    board.report("Annotator", "a1", ["1"])
    alias[0], clock.now = "2", 1.0
    assert board.tick()["target"] == "2"  # no replica ever reports holding 2
    alias[0], clock.now = "3", 2.0
    with caplog.at_level("WARNING", logger="censusvi.serve"):
        assert board.tick() == {"served": "1", "target": "3", "keep": ["1", "3"]}
    assert "before every replica held version 2: loading the new one instead" in caplog.text
    board.report("Mapper", "m1", ["1", "3"])
    board.report("Annotator", "a1", ["1", "3"])
    clock.now = 3.0
    assert board.tick()["served"] == "3"
    alias[0], clock.now = "4", 40.0  # after the grace: a bad 4, then a rollback to 3
    assert board.tick()["target"] == "4"
    alias[0], clock.now = "3", 41.0
    assert board.tick() == {"served": "3", "target": "3", "keep": ["3"]}
    assert "the move is abandoned" in caplog.text


def test_only_an_alias_is_followed():
    calls, clock = [], Clock()
    s = Settings(model="models:/m/3", registry_poll_s=1)
    board = VersionBoard(s, dict, resolve=lambda _: calls.append(1) or "3", clock=clock)
    for t in range(5):
        clock.now = float(t + 1)
        assert board.tick()["keep"] == ["3"]
    assert len(calls) == 1  # resolved once, at start: a fixed version never moves


def test_a_store_loads_outside_the_request_lock_and_counts_cold_loads():
    started, release = threading.Event(), threading.Event()

    def load(v: str) -> str:
        if v == "2":
            started.set()
            release.wait(5)
        return f"model {v}"

    store = VersionStore(load)
    store.prepare("1")
    loader = threading.Thread(target=store.prepare, args=("2",))
    loader.start()
    assert started.wait(5)
    t0 = time.perf_counter()
    assert store.get("1") == "model 1"  # served while version 2 is still loading
    assert time.perf_counter() - t0 < 0.5
    release.set()
    loader.join()
    assert store.held() == ["1", "2"] and store.cold_loads == 0
    store.keep(["2"])
    assert store.get("1") == "model 1" and store.cold_loads == 1  # asked for before prepared


def test_the_codes_actor_options_survive_a_config_that_sets_others():
    s = Settings(model="m")
    args = {
        "deployments": {"Mapper": {"max_ongoing_requests": 4, "autoscaling_config": {"max_replicas": 3}}},
        "actor_options": {"Mapper": {"num_cpus": 2, "resources": {"fast": 1}}},
    }  # fmt: skip
    held = {"Mapper": 100 * MiB, "Annotator": 1000 * MiB}
    opts = deployment_options(s, configured_options(args), held, gpus=True)
    mapper = opts["Mapper"]["ray_actor_options"]
    assert (
        mapper["num_gpus"] == 1 and mapper["num_cpus"] == 2 and mapper["resources"] == {"fast": 1}
    )
    # two versions held: the served one and a next one up to 1.25 x its size, 1.25 B per file B
    assert mapper["memory"] == REPLICA_BASE_MB * MiB + 1.25 * 2.25 * 100 * MiB
    assert opts["Annotator"]["ray_actor_options"]["memory"] == REPLICA_BASE_MB * MiB + 2812.5 * MiB
    assert opts["Mapper"]["max_ongoing_requests"] == 4
    assert opts["Mapper"]["autoscaling_config"] == {
        "downscale_delay_s": GPU_DOWNSCALE_DELAY_S,
        "max_replicas": 3,
    }
    cpu = deployment_options(s, configured_options(args), held, gpus=False)["Mapper"]
    assert "num_gpus" not in cpu["ray_actor_options"]
    assert cpu["autoscaling_config"]["downscale_delay_s"] == CPU_DOWNSCALE_DELAY_S
    own = {"actor_options": {"Mapper": {"memory": 123, "num_gpus": 0.5}}}
    mine = deployment_options(s, configured_options(own), held, gpus=True)["Mapper"]
    assert (
        mine["ray_actor_options"]["memory"] == 123 and mine["ray_actor_options"]["num_gpus"] == 0.5
    )


def test_the_ingress_memory_budget_bounds_request_size_times_ongoing_requests():
    s = Settings(model="m")  # 64 MB bodies, each up to 8x that decoded: 576 MB a request
    ingress = deployment_options(s, {}, {}, gpus=False)["Ingress"]
    assert ingress["max_ongoing_requests"] * s.request_memory_mb <= s.ingress_memory_mb
    assert ingress["ray_actor_options"]["memory"] <= (s.ingress_memory_mb + REPLICA_BASE_MB) * MiB
    with pytest.raises(ValueError) as e:
        deployment_options(s, {"Ingress": {"max_ongoing_requests": 64}}, {}, gpus=False)
    assert str(e.value) == (
        "Ingress max_ongoing_requests 64 x 576 MB per request (max_request_mb 64 and what it "
        "decodes to) = 36,864 MB exceeds ingress_memory_mb 6144: lower max_ongoing_requests or "
        "max_request_mb (at most 10 ongoing at this size), or raise ingress_memory_mb"
    )
    small = Settings(model="m", max_request_mb=1)
    assert deployment_options(small, {}, {}, gpus=False)["Ingress"]["max_ongoing_requests"] == 8
    with pytest.raises(ValueError, match="unknown deployments \\['Mappr'\\]"):
        deployment_options(s, {"Mappr": {}}, {}, gpus=False)


def test_a_version_that_would_not_fit_the_reservation_is_not_loaded_nor_served():
    """A replica never holds two versions beyond its memory reservation: it keeps serving the
    one it holds, says why, and the board never switches to a version not everywhere."""
    sizes = {"1": 400 * MiB, "2": 480 * MiB, "3": 600 * MiB}
    reserved = reserved_memory(sizes["1"])
    check = memory_check("Annotator", reserved, sizes.__getitem__)
    assert check("2", ["1"]) is None  # up to 1.25 x the served size fits
    assert check("3", ["1"]).startswith(
        "version 3's index (600.0 MB of files) does not fit beside version(s) 1 in this Annotator "
        "replica's memory reservation of 1,637 MB (needs 1,762 MB): still serving 1"
    )
    alias, clock = ["1"], Clock()
    board = board_with(alias, {"Mapper": 0, "Annotator": 1}, clock)
    store = VersionStore(lambda v: f"index {v}", fits=check)

    def report(held):
        return board.report("Annotator", "a1", held)

    sync(store, report)
    alias[0], clock.now = "3", 1.0
    board.tick()
    for t in range(2, 5):
        sync(store, report)
        clock.now = float(t)
        assert board.tick()["served"] == "1"
    assert store.held() == ["1"] and "does not fit" in store.refused["3"]


def test_reserved_memory_follows_the_files_a_replica_loads(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "m" / "config.json").write_text("{}")
    assert files_bytes(tmp_path / "m") == 4098 and files_bytes(None) == 0


def test_metrics_sum_replicas_of_this_application_only():
    """GET /metrics adds up every ingress replica's series from Ray's node exports, keeps only
    this application, drops Ray's tags, and keeps the newest model version."""
    from prometheus_client.parser import text_string_to_metric_families

    from censusvi.serving.metrics import combine

    def node(app: str, replica: str, requests: int, version: int) -> str:
        tags = f'application="{app}",deployment="Ingress",replica="{replica}",WorkerId="w"'
        return "\n".join([
            "# TYPE ray_censusvi_requests_total counter",
            f'ray_censusvi_requests_total{{{tags},endpoint="annotate",status="200"}} {requests}',
            "# TYPE ray_censusvi_request_seconds histogram",
            f'ray_censusvi_request_seconds_bucket{{{tags},endpoint="annotate",le="0.5"}} 1',
            f'ray_censusvi_request_seconds_bucket{{{tags},endpoint="annotate",le="+Inf"}} 2',
            f'ray_censusvi_request_seconds_sum{{{tags},endpoint="annotate"}} 0.75',
            f'ray_censusvi_request_seconds_count{{{tags},endpoint="annotate"}} 2',
            "# TYPE ray_censusvi_model_version gauge",
            f'ray_censusvi_model_version{{{tags},name="m"}} {version}',
            "# TYPE ray_serve_num_http_requests_total counter",
            f'ray_serve_num_http_requests_total{{{tags}}} 99',
            "",
        ])  # fmt: skip

    text = combine([node("a", "r1", 3, 4), node("a", "r2", 5, 5), node("b", "r3", 100, 9)], "a")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
    }
    ok = (("endpoint", "annotate"), ("status", "200"))
    assert samples[("censusvi_requests_total", ok)] == 8
    inf = (("endpoint", "annotate"), ("le", "+Inf"))
    assert samples[("censusvi_request_seconds_bucket", inf)] == 4
    assert samples[("censusvi_request_seconds_count", (("endpoint", "annotate"),))] == 4
    assert samples[("censusvi_model_version", (("name", "m"),))] == 5
    assert not any("serve" in name for name, _ in samples)


def test_a_replica_removes_the_downloads_of_replicas_whose_process_is_gone(tmp_path):
    """Serve kills replicas (scale-down, redeploy, OOM) without running their cleanup: the next
    replica on the node removes their downloaded versions, and only theirs."""
    import os
    import subprocess
    import sys

    from censusvi.serving.versions import SCRATCH_PREFIX, replica_scratch

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    dead = tmp_path / f"{SCRATCH_PREFIX}{gone}-abc"
    (dead / "3" / "model").mkdir(parents=True)
    (dead / "3" / "model" / "weights.safetensors").write_bytes(b"x" * 1000)
    living = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}-def"  # a process that runs
    living.mkdir()
    other = tmp_path / f"{SCRATCH_PREFIX}load-ghi"  # not a replica's folder
    other.mkdir()
    mine = replica_scratch(str(tmp_path))
    assert not dead.exists() and living.exists() and other.exists()
    assert os.path.basename(mine).startswith(f"{SCRATCH_PREFIX}{os.getpid()}-")
    assert os.path.isdir(mine)


@pytest.mark.parametrize(
    "accept, arrow",
    [
        (ARROW, True),  # what the Client sends
        (f"{ARROW};q=0, application/json", False),  # "not Arrow": answered in Arrow before
        (f"application/json;q=0.5, {ARROW};q=0.9", True),
        (f"{ARROW};q=0.4, application/json", False),
        (f"{ARROW}, application/json", True),
        (f"{ARROW};q=nope", False),
        ("*/*", False),
        (f"{ARROW};q=0.5, */*", False),  # the wildcard ranks JSON higher
        (f"{ARROW}, application/*;q=0.8", True),
        (None, False),
    ],
)
def test_the_answer_is_arrow_only_where_accept_prefers_it(accept, arrow):
    from censusvi.serving.parsing import wants_arrow

    assert wants_arrow(accept) is arrow


def test_a_version_that_fails_to_load_is_tried_again_after_a_growing_wait():
    """A damaged version was downloaded and refused again every tick (once a second, for ever)."""
    clock, tries = Clock(), []

    def load(v: str) -> str:
        tries.append(v)
        if v == "2":
            raise ValueError("index.json: k_factor 100000.0 is not a number from 1 to 64")
        return f"loaded {v}"

    store = VersionStore(load)
    wanted = {"served": "1", "target": "2", "keep": ["1", "2"]}
    for t in range(0, 12):  # a tick a second
        clock.now = float(t)
        try:
            sync(store, lambda held: wanted, clock=clock)
        except ValueError:
            pass
    assert store.held() == ["1"] and tries.count("2") == 4  # at 0, 1, 3 and 7 s
    wanted = {"served": "1", "target": "3", "keep": ["1", "3"]}  # the alias moved on
    clock.now = 12.0
    sync(store, lambda held: wanted, clock=clock)
    assert store.held() == ["1", "3"]


def test_an_explorer_page_is_drawn_once_per_result(monkeypatch):
    """Each GET of an explorer link redrew the page: 15 s of an Annotator's CPU for 20,000
    cells, as often as anyone fetched the link (a hostile probe). Pages are kept, a few."""
    from collections import OrderedDict

    import pandas as pd

    import censusvi.report.content as content
    import censusvi.report.page as page
    from censusvi.serving import annotator

    drawn = []
    monkeypatch.setattr(content, "report_content", lambda *a, **k: drawn.append(1) or {})
    monkeypatch.setattr(page, "render_page", lambda c: f"<html>{len(drawn)}</html>")
    host = object.__new__(annotator.IndexHost)
    host.pages, host.layouts = OrderedDict(), VersionStore(lambda v: "layout")

    def item(i: int) -> dict:
        frame = pd.DataFrame({"predicted": ["T"], "probability": [0.9], "uncertainty": [0.1]})
        return {"result_id": f"r{i}", "model": {"name": "m", "version": "1"}, "batch": ["b"],
                "nll_per_count": [1.0], "labels": {"cell_type": frame}, "latent": None,
                "report": {}}  # fmt: skip

    assert host.explore(item(0)) == host.explore(item(0)) == "<html>1</html>" and len(drawn) == 1
    for i in range(1, annotator.PAGES_KEPT + 1):
        host.explore(item(i))
    assert "r0" not in host.pages and len(host.pages) == annotator.PAGES_KEPT
