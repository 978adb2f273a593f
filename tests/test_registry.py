"""The model registry: versions carry model + index + evaluation; promotion is gated; rollback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from censusvi.annotate.index import save_index
from censusvi.annotate.pipeline import index_reference
from censusvi.cli import main
from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.model.io import load_model
from censusvi.registry.versions import compare_metrics, fetch_version
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
from conftest import simulated_adata

ROOT = Path(__file__).resolve().parents[1]


def small_model_and_index(tmp_path, name: str, seed: int, epochs: int = 5):
    a = simulated_adata(n_cells=400, n_batches=3, seed=1)
    a.write_h5ad(tmp_path / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp_path / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(n_hidden=16, n_latent=4),
        TrainConfig(max_epochs=epochs, lr=1e-2, batch_size=64, seed=seed),
    )
    model, _ = pretrain(cfg, tmp_path / f"m-{name}", quiet=True)
    ix = index_reference(model, tmp_path / "ref.h5ad", ["cell_type"])
    save_index(ix, tmp_path / f"ix-{name}")
    return tmp_path / f"m-{name}", tmp_path / f"ix-{name}"


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_gate_compares_in_the_right_direction():
    holder = {"eval.cell_type.accuracy": 0.9, "eval.cell_type.ece": 0.05}
    assert (
        compare_metrics({"eval.cell_type.accuracy": 0.95, "eval.cell_type.ece": 0.04}, holder) == []
    )
    worse = compare_metrics({"eval.cell_type.accuracy": 0.8, "eval.cell_type.ece": 0.09}, holder)
    assert len(worse) == 2 and "0.8000 vs 0.9000" in worse[0] and "lower is better" in worse[1]
    assert compare_metrics({"eval.cell_type.accuracy": 0.89}, holder, tolerance=0.02) == []


def test_register_promote_gate_rollback_and_load(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    good_model, good_index = small_model_and_index(tmp_path, "good", seed=0, epochs=8)
    bad_model, _ = small_model_and_index(tmp_path, "bad", seed=1, epochs=8)
    # A deliberately poor index for the bad model: labels shuffled, so its held-out accuracy drops.
    ix_meta = json.loads((good_index / "index.json").read_text())
    assert ix_meta["evaluation"]["cell_type"]["accuracy"] > 0.9  # the index evaluated itself
    from censusvi.annotate.index import build_index

    ref = H5adSource(tmp_path / "ref.h5ad")
    bad = load_model(bad_model)
    pos, z, _ = latent_representation(bad, ref)
    labels = ref.obs.iloc[pos][["cell_type"]].astype(str)
    labels["cell_type"] = np.random.default_rng(0).permutation(labels["cell_type"].to_numpy())
    from censusvi.annotate.pipeline import holdout_evaluation

    meta = {"evaluation": holdout_evaluation(z, labels)}
    save_index(build_index(z, labels, meta), tmp_path / "ix-bad")

    rc, out, _ = run_cli(capsys, "models", "register", str(good_model), "--index", str(good_index))
    assert rc == 0 and out.strip() == "1"  # a contract: the version number alone
    rc, out, _ = run_cli(
        capsys, "models", "register", str(bad_model), "--index", str(tmp_path / "ix-bad")
    )
    assert out.strip() == "2"
    assert (
        run_cli(capsys, "models", "promote", "censusvi-scvi", "1", "--alias", "production")[0] == 0
    )
    rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "2", "--alias", "production")
    assert (
        rc == 2 and "eval.cell_type.accuracy" in err and "--force" in err
    )  # refused, with numbers
    rc, out, _ = run_cli(capsys, "models", "list", "--json")
    rows = {r["version"]: r for r in json.loads(out)}
    assert rows["1"]["aliases"] == ["production"] and rows["2"]["aliases"] == []
    assert (
        rows["2"]["metrics"]["eval.cell_type.accuracy"]
        < rows["1"]["metrics"]["eval.cell_type.accuracy"]
    )

    assert run_cli(capsys, "models", "promote", "censusvi-scvi", "2", "--force")[0] == 0
    z_prod = latent_representation(load_model("models:/censusvi-scvi@production"), ref)[1]
    np.testing.assert_array_equal(z_prod, z)  # the alias serves version 2 now
    rc, out, _ = run_cli(capsys, "models", "rollback", "censusvi-scvi")
    assert rc == 0 and out.strip().endswith("-> 1")
    files = fetch_version("censusvi-scvi", "1", tmp_path / "dl")
    assert files.index_dir is not None and (files.index_dir / "labels.parquet").is_file()
    # A Serve replica downloads only what it reads: the mapper the weights, the annotator the index.
    weights = fetch_version("censusvi-scvi", "1", tmp_path / "dl-model", index=False)
    assert (weights.model_dir / "config.json").is_file() and weights.index_dir is None
    assert not list((tmp_path / "dl-model").rglob("index.json"))
    ix_only = fetch_version("censusvi-scvi", "1", tmp_path / "dl-index", model=False)
    assert ix_only.model_dir is None and (ix_only.index_dir / "index.json").is_file()
    assert not list((tmp_path / "dl-index").rglob("*.safetensors"))
    z_good = latent_representation(load_model(good_model), ref)[1]
    z_rolled = latent_representation(load_model("models:/censusvi-scvi@production"), ref)[1]
    np.testing.assert_array_equal(z_rolled, z_good)
    rc, _, err = run_cli(capsys, "models", "rollback", "censusvi-scvi")
    assert rc == 2 and "no earlier version" in err
    promote_job = load_job("promote")  # the Ray-job entry point applies the same gate
    assert promote_job.main(["--version", "2"]) == 3
    assert "refused: version 2 is worse" in capsys.readouterr().err
    assert promote_job.main(["--version", "2", "--force"]) == 0
    assert promote_job.main(["--rollback"]) == 0
    assert capsys.readouterr().out.strip().endswith("-> version 1")


def test_register_refuses_an_index_of_another_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    model_dir, index_dir = small_model_and_index(tmp_path, "a", seed=0, epochs=1)
    from censusvi.annotate.index import build_index

    labels = simulated_adata(n_cells=50).obs[["cell_type"]]
    save_index(build_index(np.zeros((50, 7), np.float32), labels), tmp_path / "ix7")
    rc, _, err = run_cli(
        capsys, "models", "register", str(model_dir), "--index", str(tmp_path / "ix7")
    )
    assert rc == 2 and "7-d embeddings" in err
    rc, _, err = run_cli(capsys, "models", "promote", "censusvi-scvi", "9")
    assert (
        rc == 2
        and "censusvi: error: Model Version (name=censusvi-scvi, version=9) not found" in err
    )
    with pytest.raises(SystemExit):
        main(["models", "promote"])
