"""The Serve config shipped in the package: Ray's schema accepts it, it names the app by import
path (no working_dir), and Serve's own CLI (`serve run`) serves a request from it."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import yaml

from censusvi.client import Client
from censusvi.server import deployment_options, wait_healthy
from censusvi.serving.deploy import REPLICA_BASE_MB, MiB, files_bytes, reserved_memory
from censusvi.serving.settings import EXTRA_ARGS, Settings
from conftest import simulated_adata

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = files("censusvi.serving") / "serve_config.yaml"
APP = ("Ingress", "Mapper", "Annotator", "Results", "Versions")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_config_passes_serves_schema_and_names_the_packaged_app():
    from ray.serve.schema import ServeDeploySchema

    from censusvi.serving import app as serving_app

    cfg = shipped()
    ServeDeploySchema.model_validate(cfg)  # what `serve run` / `serve deploy` check first
    assert (ROOT / "serve" / "config.yaml").read_bytes() == SHIPPED.read_bytes()
    (application,) = cfg["applications"]
    assert application["import_path"] == "censusvi.serving.app:build_app"
    assert "runtime_env" not in application  # the code is the installed package
    fields = {f.name for f in dataclasses.fields(Settings)} | set(EXTRA_ARGS)
    assert set(application["args"]) <= fields, set(application["args"]) - fields
    assert {d["name"] for d in application["deployments"]} == set(APP)
    for name in APP:
        assert getattr(serving_app, name).name == name
    assert set(deployment_options()) == set(APP)
    # Serve would replace the code's actor options with a section's: resources go in args
    assert not any("ray_actor_options" in d for d in application["deployments"])
    assert deployment_options()["Mapper"]["ray_actor_options"] == {"num_cpus": 1}


def test_serve_run_args_as_strings_are_typed():
    """`serve run censusvi.serving.app:build_app max_cells=500 ...` passes strings."""
    s = Settings.from_args({"model": "m", "max_cells": "500", "allow_surgery": "true", "k": "7"})
    assert (s.max_cells, s.allow_surgery, s.k, s.max_request_mb) == (500, True, 7, 64.0)
    with pytest.raises(ValueError, match="serve setting max_cells='many': must be a whole number"):
        Settings.from_args({"max_cells": "many"})
    with pytest.raises(ValueError, match="unknown serve settings \\['max_cell'\\]"):
        Settings.from_args({"max_cell": 5})


@pytest.mark.parametrize(
    "args, says",
    [
        ({"k": -5}, "serve setting k -5: neighbours per cell must be an integer >= 1"),
        ({"k": 5000}, "at most 1000 neighbours"),
        ({"unknown_threshold": "nan"}, "serve setting unknown_threshold nan: must be a number"),
        ({"method": "vote"}, "serve setting method 'vote': choose one of knn, head, ensemble"),
        ({"max_cells": 0}, "serve setting max_cells=0: a whole number >= 1"),
        ({"tick_s": 0}, "serve setting tick_s=0: a number > 0"),
        ({"max_request_mb": "inf"}, "serve setting max_request_mb=inf: a number > 0"),
        ({"retire_after_s": -1}, "serve setting retire_after_s=-1: seconds >= 0"),
    ],
)
def test_a_setting_out_of_range_fails_the_deployment_in_one_line(args, says):
    """k: -5 in a Serve config failed each request, tick_s: 0 spun every ingress's sync thread:
    now build_app's Settings refuses them, by the command line's rules where it has them."""
    with pytest.raises(ValueError, match=re.escape(says)):
        Settings.from_args({"model": "m", **args})


def test_query_options_follow_the_same_rules():
    from censusvi.serving.parsing import transfer_options

    s = Settings(model="m")
    assert transfer_options({"k": "20", "unknown_threshold": "0.3", "method": "head"}, s) == (
        20, 0.3, "head"
    )  # fmt: skip
    for params, says in [
        ({"k": "0"}, "k 0: neighbours per cell must be an integer >= 1"),
        ({"k": "2000"}, "at most 1000"),
        ({"k": "x" * 100}, "must be a whole number"),
        ({"k": "\uff11\uff15"}, "k='\uff11\uff15': must be a whole number"),  # int() reads 15
        ({"k": "1_5"}, "k='1_5': must be a whole number"),
        ({"unknown_threshold": "0_5"}, "unknown_threshold='0_5': must be a number"),
        ({"unknown_threshold": "nan"}, "unknown_threshold nan: must be a number from 0 to 1"),
        ({"method": "m" * 100}, "choose one of knn, head, ensemble"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            transfer_options(params, s)


@pytest.fixture(scope="module")
def model_and_index(tmp_path_factory):
    from censusvi.annotate.index import save_index
    from censusvi.annotate.pipeline import index_reference
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    tmp = tmp_path_factory.mktemp("serve_config")
    simulated_adata(n_cells=300, n_genes=100, seed=3).write_h5ad(tmp / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4, encode_covariates=False),
        TrainConfig(schedule="census", max_epochs=2, lr=1e-2, batch_size=64, seed=0),
    )
    model, _ = pretrain(cfg, tmp / "m", quiet=True)
    save_index(index_reference(model, tmp / "ref.h5ad", ["cell_type"]), tmp / "ix")
    return tmp


def test_an_index_that_does_not_fit_the_model_stops_the_app_before_it_starts(
    model_and_index, tmp_path
):
    """A model directory served with another model's index started, then answered every
    annotate request with a 500 (FAISS asserting on the dimension); a missing index failed deep
    inside Serve. build_app (and `censusvi serve`, before Ray starts) now refuses both."""
    from censusvi.serving.app import build_app
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    d = model_and_index
    cfg = PretrainConfig(
        DataConfig(source=str(d / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=6, encode_covariates=False),
        TrainConfig(schedule="census", max_epochs=1, lr=1e-2, batch_size=64, seed=0),
    )
    pretrain(cfg, tmp_path / "m6", quiet=True)
    with pytest.raises(ValueError, match=r"holds 4-d embeddings but .*m6's latent is 6-d"):
        build_app({"model": str(tmp_path / "m6"), "index": str(d / "ix")})
    with pytest.raises(FileNotFoundError, match="is not a censusvi index"):
        build_app({"model": str(d / "m"), "index": str(tmp_path / "nope")})
    rc = subprocess.run(
        [sys.executable, "-m", "censusvi.cli", "serve", "--model", str(tmp_path / "m6"), "--index",
         str(d / "ix"), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rc.returncode == 2 and "6-d" in rc.stderr and "Traceback" not in rc.stderr
    assert "ray" not in rc.stderr.lower()  # refused before Ray started


def test_censusvi_serve_refuses_a_busy_port_a_bad_host_or_an_empty_token_in_one_line(
    model_and_index,
):
    """A port another process holds, or a --host that does not resolve, ended in a page of Ray
    traceback (exit 1); --token "" (a variable left unset) served with no authentication."""
    d = model_and_index
    serve = [sys.executable, "-m", "censusvi.cli", "serve", "--model", str(d / "m"), "--index",
             str(d / "ix")]  # fmt: skip
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        for extra, says in [
            (["--port", port], f"cannot listen on 127.0.0.1:{port} (Address already in use)"),
            (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' does not resolve"),
            (["--port", str(free_port()), "--token", ""], "the token is empty"),
            (["--port", str(free_port()), "--token-file", ""], "the token file is named empty"),
        ]:
            rc = subprocess.run(serve + extra, capture_output=True, text=True, timeout=120)
            assert rc.returncode == 2 and says in rc.stderr, rc.stderr
            assert rc.stderr.count("\n") == 1 and "ray" not in rc.stderr.lower(), rc.stderr


def test_censusvi_serve_loads_the_model_once_in_the_driver(model_and_index, monkeypatch):
    """`censusvi serve` checks the model and index before Ray starts, then built the app with
    build_app, which loaded the model again (a Census model twice in the driver). Its
    checked_app binds the same application without the second load; Serve's builder still
    checks."""
    from censusvi.model import io
    from censusvi.serving.app import build_app, checked_app

    loads = []
    load = io.load_model
    monkeypatch.setattr(io, "load_model", lambda *a, **kw: loads.append(a) or load(*a, **kw))
    args = {"model": str(model_and_index / "m"), "index": str(model_and_index / "ix")}
    assert type(checked_app(args)) is type(build_app(args))
    assert len(loads) == 1


def test_a_request_without_counts_is_refused_joined_as_it_is_alone(model_and_index):
    """Requests arriving together (@serve.batch) map as one: a request whose cells all have zero
    counts came back 200 with no cells (and its explorer link a 500), though alone it is a 422."""
    import anndata as ad
    import scipy.sparse as sp

    from censusvi.serving.mapper import ModelHost
    from censusvi.serving.settings import Settings
    from censusvi.wire import QueryCells

    host = ModelHost(Settings.from_args({"model": str(model_and_index / "m")}))
    q = ad.read_h5ad(model_and_index / "ref.h5ad")[:20]
    genes, batch = list(q.var["gene_ids"]), q.obs["batch"].to_numpy(dtype=str)
    good = QueryCells(sp.csr_matrix(q.X), genes, batch)
    zero = QueryCells(sp.csr_matrix(q.X.shape, dtype=np.float32), genes, batch)
    lone = host.map_all([(zero, "local")])[0]
    assert lone["status"] == 422 and "zero counts" in lone["error"]
    answers = host.map_all([(good, "local"), (zero, "local"), (good, "local")])
    assert answers[1] == lone
    for answer in (answers[0], answers[2]):
        assert answer["report"]["cells_mapped"] == 20 and len(answer["positions"]) == 20


def test_serve_run_of_the_shipped_config_serves_a_request(local_ray, model_and_index, tmp_path):
    """Serve's CLI against this session's Ray, with the shipped file's args pointed at a model
    directory, its port free, and no CPUs reserved (the session's Ray has 2): the replicas run
    with the config's CPUs *and* the code's memory reservation (merged, not replaced)."""
    import ray
    from ray import serve

    from censusvi.annotate.index import load_index
    from censusvi.annotate.pipeline import annotate
    from censusvi.model.io import load_model

    d = model_and_index
    cfg = shipped()
    port = free_port()
    cfg["http_options"]["port"] = port
    (application,) = cfg["applications"]
    application["args"].update(model=str(d / "m"), index=str(d / "ix"))
    application["args"]["actor_options"] = {name: {"num_cpus": 0} for name in APP}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))

    cpus_memory = {r: ray.available_resources().get(r, 0) for r in ("CPU", "memory")}
    serve_cli = Path(sys.executable).parent / "serve"
    address = ray.get_runtime_context().gcs_address
    run = subprocess.run(
        [str(serve_cli), "run", "--non-blocking", "--address", address, str(tmp_path / "config.yaml")],
        env={**os.environ, "RAY_AUTH_MODE": "token"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # nothing of the checkout on the path but the installed package
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120)
        q = simulated_adata(n_cells=300, n_genes=100, seed=3)[:40].copy()
        out = Client(url).annotate(q, batch_key="batch")
        local, _ = annotate(load_model(d / "m"), load_index(d / "ix"), q, "batch")
        assert out.uns["censusvi"]["versions"] == ["local"]
        np.testing.assert_allclose(out.obsm["X_scvi"], local.obsm["X_scvi"], atol=1e-5)
        assert list(out.obs["predicted_cell_type"]) == list(local.obs["predicted_cell_type"])
        # what Ray holds for the app: the code's memory reservations (two model versions in the
        # Mapper, two indexes in the Annotator, the ingress's budget) beside the config's 0 CPUs
        held = {r: cpus_memory[r] - ray.available_resources().get(r, 0) for r in cpus_memory}
        s = Settings(max_request_mb=application["args"]["max_request_mb"])
        ingress = next(x for x in application["deployments"] if x["name"] == "Ingress")
        budget = (ingress["max_ongoing_requests"] * s.request_memory_mb + REPLICA_BASE_MB) * MiB
        models = reserved_memory(files_bytes(d / "m")) + reserved_memory(files_bytes(d / "ix"))
        assert held["CPU"] == 0
        assert held["memory"] == pytest.approx(models + budget, rel=1e-3)
    finally:
        serve.shutdown()
