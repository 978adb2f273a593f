"""jobs/evaluate.py: scib-metrics on the model's latent against PCA and Harmony, logged to the version."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd

from censusvi.registry.versions import register_version, version_metrics

ROOT = Path(__file__).resolve().parents[1]


def test_scib_benchmark_against_baselines(cellbench_scvi, tmp_path, monkeypatch, capsys):
    model_dir, cells, _ = cellbench_scvi
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    from censusvi.model.io import load_model, save_model

    save_model(load_model(model_dir), tmp_path / "m")  # the imported scvi-tools model
    assert register_version(tmp_path / "m", None, "censusvi-eval") == "1"
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = [
        "--model",
        "models:/censusvi-eval/1",
        "--data",
        str(cells),
        "--out",
        str(tmp_path / "ev"),
    ]
    assert job.main(argv) == 0
    table = pd.read_csv(tmp_path / "ev" / "scib.csv", index_col=0)
    assert set(table.index) == {"X_scvi", "X_pca", "X_harmony"}
    assert table["Total"].between(0, 1).all()
    # Harmony corrects batches that PCA leaves apart: the metrics must see it
    assert table.loc["X_harmony", "Batch correction"] > table.loc["X_pca", "Batch correction"]
    logged = version_metrics("censusvi-eval", "1")
    assert logged["eval.scib.total"] == float(table.loc["X_scvi", "Total"])
    rows = json.loads((tmp_path / "ev" / "scib.json").read_text())
    assert [r["embedding"] for r in rows] == list(table.index)
