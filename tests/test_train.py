"""Pretraining on real data: the ELBO falls, cell lines separate across technologies, reruns resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from censusvi.cli import main
from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.model.io import load_model
from censusvi.train import checkpoint as ckpt_mod
from censusvi.train.loop import EpochStats, TrainConfig, epoch_seeds, kl_weight
from censusvi.train.pretrain import DataConfig, PretrainConfig, load_pretrain_config, pretrain
from conftest import simulated_adata


@pytest.fixture(scope="module")
def cellbench_model(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cb") / "model"
    cfg = PretrainConfig(
        data=DataConfig(
            source=str(shared_data / "cellbench_lung_celllines.h5ad"),
            batch_keys=("batch",),
            hvg_keys=("assay",),
            n_hvg=2000,
        ),
        train=TrainConfig(schedule="census", max_epochs=60, lr=1e-3, seed=0),
    )
    model, history = pretrain(cfg, out, quiet=True)
    return out, model, history


def test_elbo_decreases_on_real_data(cellbench_model):
    _, _, history = cellbench_model
    val = [e.val_elbo for e in history.epochs]
    assert val[-1] < 0.8 * val[0]
    assert np.mean(val[-5:]) < np.mean(val[20:25])  # still falling after the KL warm-up


def test_cell_lines_transfer_across_technologies(cellbench_model, shared_data):
    """kNN on CEL-seq2 cells' latent predicts the Drop-seq cells' cell line (demuxlet labels)."""
    out, _, _ = cellbench_model
    model = load_model(out)
    src = H5adSource(shared_data / "cellbench_lung_celllines.h5ad")
    pos, z, report = latent_representation(model, src)
    assert report["overlap"] == 1.0 and len(pos) == 1021
    obs = src.obs.iloc[pos]
    ref, query = (obs["assay"] == "CEL-seq2").to_numpy(), (obs["assay"] == "Drop-seq").to_numpy()
    knn = KNeighborsClassifier(15).fit(z[ref], obs["cell_type"].to_numpy()[ref])
    acc = (knn.predict(z[query]) == obs["cell_type"].to_numpy()[query]).mean()
    chance = obs["cell_type"][query].value_counts(normalize=True).max()
    assert acc >= 0.9 > chance


def test_kl_warmup_schedule():
    assert [kl_weight(e, 20) for e in (0, 5, 20, 50)] == [0.0, 0.25, 1.0, 1.0]
    assert kl_weight(0, 0) == 1.0


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=200).write_h5ad(src)
    cfg = PretrainConfig(
        data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0),
        train=TrainConfig(schedule="census", max_epochs=4, lr=1e-3, batch_size=64),
    )
    straight, _ = pretrain(cfg, tmp_path / "straight", quiet=True)

    def kill_after_second_epoch(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "resumed", quiet=True, on_epoch_end=(kill_after_second_epoch,))
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.checkpoint").exists()
    seen = []
    resumed, history = pretrain(
        cfg, tmp_path / "resumed", quiet=True, on_epoch_end=(lambda s: seen.append(s.epoch),)
    )
    assert len(history.epochs) == 4 and seen == [2, 3]  # epochs 0 and 1 came from the checkpoint
    for k, v in straight.vae.state_dict().items():
        assert torch.equal(v, resumed.vae.state_dict()[k]), k
    assert not (tmp_path / "resumed.checkpoint").exists()


def test_on_epoch_end_runs_after_the_epochs_checkpoint(tmp_path):
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120).write_h5ad(src)
    cfg = PretrainConfig(
        data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0),
        train=TrainConfig(schedule="census", max_epochs=3, batch_size=64),
    )
    seen = []

    def note(stats: EpochStats) -> None:
        state = json.loads((tmp_path / "m.checkpoint" / "state.json").read_text())
        seen.append((stats.epoch, len(state["history"]["epochs"]), stats.val_elbo))

    _, history = pretrain(cfg, tmp_path / "m", quiet=True, on_epoch_end=(note,))
    assert seen == [(e.epoch, e.epoch + 1, e.val_elbo) for e in history.epochs]
    assert [epoch for epoch, _, _ in seen] == [0, 1, 2]


def test_nan_guard_names_the_epoch_and_the_learning_rate(tmp_path):
    """A diverged run stops at the epoch's end with the guard's message, not inside torch."""
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120).write_h5ad(src)
    cfg = PretrainConfig(
        data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0),
        train=TrainConfig(schedule="census", max_epochs=3, batch_size=64, lr=1e6),
    )
    message = r"training loss became nan at epoch 0; lower the learning rate \(lr=1000000.0\)"
    with pytest.raises(FloatingPointError, match=message):
        pretrain(cfg, tmp_path / "m", quiet=True)


def test_epoch_seeds_of_rank_zero_are_one_process_and_ranks_differ():
    assert epoch_seeds(0, 0) == (0, 0) and epoch_seeds(2, 3, rank=0) == (200_009, 2_000_009)
    assert epoch_seeds(2, 3, rank=1) == (201_018, 2_007_928)
    seeds = [epoch_seeds(7, epoch, rank) for epoch in range(400) for rank in range(16)]
    assert len({s.torch for s in seeds}) == len({s.shuffle for s in seeds}) == 400 * 16


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120).write_h5ad(src)
    cfg = PretrainConfig(
        data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0),
        train=TrainConfig(schedule="census", max_epochs=2, batch_size=64),
    )
    monkeypatch.setattr(ckpt_mod.CheckpointStore, "remove", lambda self: None)  # keep it
    pretrain(cfg, tmp_path / "m", quiet=True)
    other = PretrainConfig(
        data=cfg.data, train=TrainConfig(schedule="census", max_epochs=2, batch_size=64, lr=0.5)
    )
    with pytest.raises(ValueError, match=r"different run \(differs in \['config'\]\)"):
        pretrain(other, tmp_path / "m", quiet=True)


def test_yaml_config_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  n_hvg: 123\n  batch_keys: a,b\ntrain:\n  lr: 0.01\n")
    cfg = load_pretrain_config(y, {"train": {"max_epochs": 7}, "data": {"source": "s.h5ad"}})
    assert (cfg.data.n_hvg, cfg.data.batch_keys, cfg.train.lr, cfg.train.max_epochs) == (
        123,
        ("a", "b"),
        0.01,
        7,
    )
    y.write_text("train:\n  learning_rate: 0.01\n")
    with pytest.raises(ValueError, match=r"unknown train setting\(s\) \['learning_rate'\]"):
        load_pretrain_config(y, {})


def test_cli_contract_pretrain_info_embed(tmp_path, capsys):
    src = tmp_path / "x.h5ad"
    simulated_adata().write_h5ad(src)
    assert (
        main(
            [
                "pretrain",
                "--source",
                str(src),
                "--batch-keys",
                "batch",
                "--n-hvg",
                "100",
                "--max-epochs",
                "3",
                "--kl-warmup",
                "7",
                "--prior-components",
                "5",
                "--config",
                str(Path(__file__).parents[1] / "configs" / "small.yaml"),
                "--quiet",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"architecture", "n_parameters", "n_genes", "n_batches", "provenance"} <= set(info)
    assert (info["n_genes"], info["n_batches"], info["architecture"]["n_latent"]) == (100, 3, 50)
    assert info["provenance"]["n_cells"] == 300 and info["provenance"]["epochs"] == 3
    assert info["architecture"]["prior_components"] == 5
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "prior VampPrior (5 pseudo-cells)" in capsys.readouterr().out
    from censusvi.model.io import read_config

    trained_with = read_config(tmp_path / "m")["provenance"]["config"]["train"]  # flags win
    assert (trained_with["n_epochs_kl_warmup"], trained_with["lr"]) == (7, 0.001)
    assert trained_with["batch_size"] == 128 and trained_with["max_epochs"] == 3
    assert (
        main(
            [
                "embed",
                "--model",
                str(tmp_path / "m"),
                "--data",
                str(src),
                "--out",
                str(tmp_path / "e.h5ad"),
            ]
        )
        == 0
    )
    import anndata as ad

    e = ad.read_h5ad(tmp_path / "e.h5ad")
    assert e.obsm["X_scvi"].shape == (300, 50) and np.isfinite(e.obsm["X_scvi"]).all()
    assert e.uns["censusvi"]["genes"]["matched"] == 100


def test_early_stopping_stops_after_patience(tmp_path):
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120).write_h5ad(src)
    # min_delta so large that no epoch after the first counts as an improvement
    train = TrainConfig(
        max_epochs=10, batch_size=64, early_stopping=True, patience=2, min_delta=1e9
    )
    cfg = PretrainConfig(
        data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0), train=train
    )
    model, history = pretrain(cfg, tmp_path / "m", quiet=True)
    assert history.stopped_early and len(history.epochs) == 3
    assert model.provenance["epochs"] == 3


def test_bf16_autocast_trains_to_the_same_elbo(tmp_path):
    """precision=bf16 (the GPU default) runs the layers in bf16 and the likelihood in fp32: the
    validation ELBO lands within 2 % of fp32's. Checked on the CPU, where autocast also works."""
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=600).write_h5ad(src)
    elbo = {}
    for precision in ("fp32", "bf16"):
        train = TrainConfig(
            schedule="census", max_epochs=15, batch_size=128, lr=1e-3, precision=precision
        )
        cfg = PretrainConfig(
            data=DataConfig(source=str(src), batch_keys=("batch",), n_hvg=0), train=train
        )
        _, history = pretrain(cfg, tmp_path / precision, quiet=True)
        elbo[precision] = history.epochs[-1].val_elbo
    assert np.isfinite(elbo["bf16"]) and elbo["bf16"] == pytest.approx(elbo["fp32"], rel=0.02)
    with pytest.raises(ValueError, match="precision='fp16'"):
        TrainConfig(schedule="census", precision="fp16")


def test_console_script_is_installed(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "censusvi"
    exe = str(exe) if exe.exists() else shutil.which("censusvi")
    assert exe, "the censusvi console script is not installed (pip install -e .)"
    r = subprocess.run([exe, "info", str(tmp_path / "nope")], capture_output=True, text=True)
    assert (
        r.returncode == 2
        and "censusvi: error:" in r.stderr
        and f"model '{tmp_path / 'nope'}' does not exist" in r.stderr
    )


def test_python_api_latent_and_normalized_expression(tmp_path):
    import censusvi

    a = simulated_adata()
    a.write_h5ad(tmp_path / "x.h5ad")
    cfg = PretrainConfig(
        data=DataConfig(source=str(tmp_path / "x.h5ad"), batch_keys=("batch",), n_hvg=0),
        train=TrainConfig(schedule="census", max_epochs=2, batch_size=64),
    )
    pretrain(cfg, tmp_path / "m", quiet=True)
    model = censusvi.load_model(tmp_path / "m")
    z = censusvi.get_latent_representation(model, a)
    expr = censusvi.get_normalized_expression(model, a, library_size=1e4)
    assert z.shape == (300, 50) and expr.shape == (300, 200)
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-4)


@pytest.mark.parametrize(
    "model_settings",
    [
        {"likelihood": "zinb"},
        {"likelihood": "poisson"},
        {"latent_library": True, "dispersion": "gene-batch"},
        {"encode_covariates": True},
        {"prior_components": 3, "encode_covariates": True},
    ],
)
def test_model_options_train_save_and_embed(tmp_path, model_settings):
    from censusvi.train.pretrain import ModelSettings

    a = simulated_adata(n_cells=150)
    a.obs["sex"] = np.where(np.arange(150) % 2, "female", "male")
    a.write_h5ad(tmp_path / "x.h5ad")
    data = DataConfig(
        source=str(tmp_path / "x.h5ad"),
        batch_keys=("batch",),
        n_hvg=0,
        categorical_covariate_keys=("sex",),
    )
    cfg = PretrainConfig(
        data,
        ModelSettings(n_hidden=16, n_latent=4, **model_settings),
        TrainConfig(schedule="census", max_epochs=2, batch_size=64),
    )
    _, history = pretrain(cfg, tmp_path / "m", quiet=True)
    assert all(np.isfinite(e.val_elbo) for e in history.epochs)
    model = load_model(tmp_path / "m")
    assert model.config.extra_categories == (2,) and model.covariate_keys == ("sex",)
    for k, v in model_settings.items():
        assert getattr(model.config, k) == v
    z = latent_representation(model, H5adSource(tmp_path / "x.h5ad"))[1]
    assert z.shape == (150, 4) and np.isfinite(z).all()
    a.obs["sex"] = "unknown-sex"
    with pytest.raises(ValueError, match=r"obs\['sex'\] has values the model never saw"):
        latent_representation(model, H5adSource("q", adata=a))


def test_device_cache_path_trains_like_the_host_path(tmp_path):
    """The GPU data path (counts held on the device) run on the CPU: same data, a working model."""
    a = simulated_adata(n_cells=200)
    a.write_h5ad(tmp_path / "x.h5ad")
    data = DataConfig(source=str(tmp_path / "x.h5ad"), batch_keys=("batch",), n_hvg=0)
    results = {}
    for cache in (False, True):
        cfg = PretrainConfig(
            data=data,
            train=TrainConfig(
                schedule="census", max_epochs=8, lr=1e-2, batch_size=64, device_cache=cache
            ),
        )
        _, history = pretrain(cfg, tmp_path / f"m{cache}", quiet=True)
        results[cache] = [e.val_elbo for e in history.epochs]
    for vals in results.values():
        assert vals[-1] < vals[0]
    assert abs(results[True][-1] - results[False][-1]) / results[False][-1] < 0.05
