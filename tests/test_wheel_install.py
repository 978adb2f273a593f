"""The built wheel, installed in a fresh venv away from the checkout, runs the product end to end:
pretrain -> index -> annotate, then `censusvi serve` answered through the client, each answer
equal to the checkout's in-process one.

The venv is cached by the dependency lists (as `make setup` caches its own); only the wheel is
reinstalled each run. Nothing from this checkout is on any path of its processes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from censusvi.annotate.index import load_index
from censusvi.annotate.pipeline import annotate
from censusvi.client import Client
from censusvi.model.io import load_model
from censusvi.server import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "serve"  # the core (embed, pretrain, index, annotate) plus the Serve app


def venv_for_wheel(wheel: Path) -> Path:
    """A venv with the wheel's dependencies, built once per dependency list."""
    key_src = (ROOT / "pyproject.toml").read_bytes()
    if (ROOT / "constraints.txt").exists():
        key_src += (ROOT / "constraints.txt").read_bytes()
    key = hashlib.sha256(key_src + EXTRAS.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("CENSUSVI_VENV_CACHE", Path.home() / ".cache" / "censusvi"))
    venv = cache / f"wheel-venv-{key}"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-U", "pip"], check=True)
        constraints = (
            ["-c", str(ROOT / "constraints.txt")] if (ROOT / "constraints.txt").exists() else []
        )
        subprocess.run([*pip, *constraints, f"{wheel}[{EXTRAS}]"], check=True)
        (venv / ".complete").touch()
    return venv


@pytest.fixture(scope="module")
def installed(censusvi_wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(venv, work dir): this checkout's wheel installed, a work dir outside the checkout."""
    wheel = censusvi_wheel
    venv = venv_for_wheel(wheel)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         "--force-reinstall", str(wheel)],
        check=True,
    )  # fmt: skip
    return venv, tmp_path_factory.mktemp("away")


def env_away() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if str(ROOT) not in p)
    return env


def run(venv: Path, cwd: Path, *args: str) -> str:
    r = subprocess.run(
        [str(venv / "bin" / "censusvi"), *args], cwd=cwd, env=env_away(),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_wheel_alone_pretrains_indexes_annotates_and_serves(installed, shared_data):
    venv, d = installed
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import censusvi, sys; print(censusvi.__file__); print(sys.path)"],
        cwd=d, env=env_away(), capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert str(venv) in where.splitlines()[0] and str(ROOT) not in where
    a = ad.read_h5ad(shared_data / "cellbench_lung_celllines.h5ad")
    a[a.obs["assay"] == "CEL-seq2"].copy().write_h5ad(d / "ref.h5ad")
    query = a[a.obs["assay"] == "Drop-seq"].copy()
    query.write_h5ad(d / "query.h5ad")
    run(venv, d, "pretrain", "--source", "ref.h5ad", "--batch-keys", "batch", "--n-hvg", "1000",
        "--max-epochs", "5", "--quiet", "--out", "m")  # fmt: skip
    run(
        venv,
        d,
        "index",
        "--model",
        "m",
        "--data",
        "ref.h5ad",
        "--label-keys",
        "cell_type",
        "--out",
        "ix",
    )
    run(venv, d, "annotate", "--model", "m", "--index", "ix", "--query", "query.h5ad",
        "--batch-key", "batch", "--out", "annotated.h5ad")  # fmt: skip
    local, _ = annotate(load_model(d / "m"), load_index(d / "ix"), query, "batch")
    assert_same(ad.read_h5ad(d / "annotated.h5ad"), local)
    assert (
        local.obs["predicted_cell_type"].astype(str) == query.obs["cell_type"].astype(str)
    ).mean() > 0.8

    port, token = free_port(), d / "token"
    token.write_text("wheel-token\n")
    proc = subprocess.Popen(
        [str(venv / "bin" / "censusvi"), "serve", "--model", "m", "--index", "ix", "--port", str(port),
         "--token-file", str(token), "--quiet"],
        cwd=d, env=env_away(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 300)
        served = Client(f"http://127.0.0.1:{port}", token="wheel-token").annotate(
            query, batch_key="batch"
        )
        assert_same(served, local)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]


def assert_same(out, local) -> None:
    np.testing.assert_allclose(out.obsm["X_scvi"], local.obsm["X_scvi"], atol=1e-4)
    assert list(out.obs["predicted_cell_type"].astype(str)) == list(
        local.obs["predicted_cell_type"].astype(str)
    )
    np.testing.assert_allclose(
        out.obs["cell_type_probability"], local.obs["cell_type_probability"], atol=1e-4
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
