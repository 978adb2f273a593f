"""Shared fixtures: the bundled real data beside the repo, and small simulated counts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CELLBENCH = SHARED / "cellbench_lung_celllines.h5ad"


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("censusvi").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not CELLBENCH.exists():
        pytest.fail(f"the bundled real data are missing: {SHARED} (expected beside the repo)")
    return SHARED


def simulated_adata(
    n_cells: int = 300, n_genes: int = 200, n_batches: int = 3, seed: int = 0
) -> ad.AnnData:
    """NB counts with two cell types and a batch shift; Ensembl-like ids in var['gene_ids']."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    base = rng.gamma(0.5, 1.0, (2, n_genes))
    shift = rng.gamma(5.0, 0.2, (n_batches, n_genes))
    mu = base[kind] * shift[batch] * rng.lognormal(1.5, 0.3, (n_cells, 1))
    x = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {"batch": [f"b{b}" for b in batch], "cell_type": [f"t{k}" for k in kind]},
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{i:011d}" for i in range(n_genes)]},
        index=[f"G{i}" for i in range(n_genes)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)


@pytest.fixture
def sim_adata() -> ad.AnnData:
    return simulated_adata()


@pytest.fixture(scope="session")
def censusvi_wheel(tmp_path_factory) -> Path:
    """This checkout built as a wheel (with the venv's setuptools: no build isolation)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wheel")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(root)],
        check=True, cwd=out,
    )  # fmt: skip
    (built,) = out.glob("censusvi-*.whl")
    return built


@pytest.fixture(scope="module")
def sim_model(tmp_path_factory) -> Path:
    """A tiny model of simulated counts (every gene, one epoch), one per test module."""
    from censusvi.cli import main

    d = tmp_path_factory.mktemp("simmodel")
    simulated_adata().write_h5ad(d / "ref.h5ad")
    args = ["pretrain", "--source", str(d / "ref.h5ad"), "--batch-keys", "batch", "--n-hvg", "0",
            "--max-epochs", "1", "--quiet", "--out", str(d / "m")]  # fmt: skip
    assert main(args) == 0
    return d / "m"


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole test session (starting one costs seconds). Workers import
    censusvi (the Serve app included) from this checkout's platform/, not from whichever
    checkout a shared venv's editable install names."""
    import ray

    if not ray.is_initialized():
        root = Path(__file__).resolve().parents[1]
        # Ray exports application metrics every 10 s by default; GET /metrics tests wait for one
        os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
        ray.init(
            num_cpus=2,
            object_store_memory=300 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(root / "platform")}},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def soma_exp(shared_data, tmp_path_factory):
    """Two real datasets ingested into one SOMA experiment (built once per test session)."""
    from censusvi.data.ingest import ingest

    out = tmp_path_factory.mktemp("soma") / "ref.soma"
    files = [
        shared_data / "cellbench_lung_celllines.h5ad",
        shared_data / "pbmc_kang_ctrl_stim_harmony.h5ad",
    ]
    ingest(files, out)
    return out, files


def scvi_tools_model(path, out_dir, n_genes: int | None, n_hidden: int, n_latent: int, epochs: int):
    """An SCVI (NB, observed library, batch = obs['batch']) trained and saved by scvi-tools, on
    a shared dataset with Ensembl ids as var_names; returns (model dir, cells .h5ad, model)."""
    scvi = pytest.importorskip("scvi")
    a = ad.read_h5ad(path)
    if n_genes:
        a = a[:, np.argsort(-np.asarray(a.X.sum(0)).ravel())[:n_genes]].copy()
    ids = a.var["gene_ids"].astype(object)
    a.var["symbol"] = a.var_names.astype(str)
    a.var_names = np.where(ids.isna(), a.var_names, ids).astype(str)
    a.var_names_make_unique()
    a.var["gene_ids"] = a.var_names.to_numpy()
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(
        a, n_hidden=n_hidden, n_latent=n_latent, n_layers=2, gene_likelihood="nb"
    )
    model.train(max_epochs=epochs, batch_size=256, accelerator="cpu", enable_progress_bar=False)
    model.save(
        out_dir / "scvi_model", overwrite=True
    )  # history_ holds pandas frames: stand-ins on load
    a.write_h5ad(out_dir / "cells.h5ad")
    return out_dir / "scvi_model", out_dir / "cells.h5ad", model


@pytest.fixture(scope="session")
def cellbench_scvi(shared_data, tmp_path_factory):
    """A small SCVI with the Census settings on CellBench's 1,500 most-counted genes."""
    return scvi_tools_model(CELLBENCH, tmp_path_factory.mktemp("scvi_cellbench"), 1500, 32, 10, 40)


@pytest.fixture(scope="session")
def pbmc_scvi(shared_data, tmp_path_factory):
    """An SCVI on the three-chemistry PBMC panel (1,767 genes, 9 cell types)."""
    return scvi_tools_model(
        SHARED / "pbmc_3chem_symphony_small.h5ad",
        tmp_path_factory.mktemp("scvi_pbmc"),
        None,
        64,
        10,
        60,
    )


@pytest.fixture(scope="session")
def cellbench_split(shared_data, tmp_path_factory):
    """A model of CellBench's CEL-seq2 batches (ref.h5ad, m/) and the Drop-seq cells as a query."""
    from censusvi.cli import main

    d = tmp_path_factory.mktemp("cbsplit")
    a = ad.read_h5ad(shared_data / "cellbench_lung_celllines.h5ad")
    ref, query = a[a.obs["assay"] == "CEL-seq2"].copy(), a[a.obs["assay"] == "Drop-seq"].copy()
    ref.write_h5ad(d / "ref.h5ad")
    query.write_h5ad(d / "query.h5ad")
    assert (
        main(
            [
                "pretrain",
                "--source",
                str(d / "ref.h5ad"),
                "--batch-keys",
                "batch",
                "--n-hvg",
                "2000",
                "--hvg-keys",
                "batch",
                "--max-epochs",
                "40",
                "--lr",
                "1e-3",
                "--schedule",  # the settings this fixture was tuned with
                "census",
                "--quiet",
                "--out",
                str(d / "m"),
            ]
        )
        == 0
    )
    return d
