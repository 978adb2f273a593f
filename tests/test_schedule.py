"""The training schedule: ``auto`` picks scvi-tools' own small-data heuristic below 640,000 cells
and the Census recipe above; explicit settings win; a starved run is told so.

The end-to-end checks train on each shared dataset subsampled to ``N_CELLS`` cells (600 for the
PBMC panel, whose B, NK and CD14 monocytes DE compares) and its ``N_GENES`` most-counted genes
(the same file for every arm), so that 400 epochs fit the suite; at that size ``auto`` still
picks the scvi-tools schedule with the 400 epochs it picks for the full files.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import replace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from censusvi.cli import main
from censusvi.model.io import read_config
from censusvi.train import schedule
from censusvi.train.loop import TrainConfig

N_GENES = 300
DATASETS = (
    "cellbench_lung_celllines",
    "pbmc_3chem_symphony_small",
    "pbmc_kang_ctrl_stim_harmony",
    "pbmc_zheng_sorted_donorA_mudan",
)
N_CELLS = dict.fromkeys(DATASETS, 300) | {"pbmc_3chem_symphony_small": 600}
MARKERS = {"B": ("CD79A", "MS4A1"), "Mono_CD14": ("LYZ", "CD14"), "NK": ("NKG7", "GNLY")}


# --- the rule -------------------------------------------------------------------------------


def test_scvi_tools_preset_is_scvi_tools_own_defaults():
    scvi = pytest.importorskip("scvi")
    from scvi.model._utils import get_max_epochs_heuristic

    for n in (1, 300, 1_021, 5_036, 19_999, 20_000, 33_333, 80_000, 639_999, 10**8):
        assert schedule.scvi_tools_max_epochs(n) == get_max_epochs_heuristic(n), n
    plan = inspect.signature(scvi.train.TrainingPlan.__init__).parameters
    assert schedule.SCVI_TOOLS.lr == plan["lr"].default
    assert schedule.SCVI_TOOLS.n_epochs_kl_warmup == plan["n_epochs_kl_warmup"].default
    assert plan["n_steps_kl_warmup"].default is None  # warm-up by epochs, as loop.kl_weight
    assert (schedule.WEIGHT_DECAY, schedule.ADAM_EPS) == (
        plan["weight_decay"].default,
        plan["eps"].default,
    )
    train = inspect.signature(scvi.model.SCVI.train).parameters
    assert schedule.SCVI_TOOLS.batch_size == train["batch_size"].default
    assert schedule.SCVI_TOOLS.early_stopping == train["early_stopping"].default


def test_auto_switches_where_census_steps_reach_scvi_tools_steps():
    t = schedule.AUTO_CENSUS_MIN_CELLS
    assert t == 640_000
    assert schedule.pick("auto", t - 1) is schedule.SCVI_TOOLS
    assert schedule.pick("auto", t) is schedule.CENSUS
    assert schedule.pick("census", 1_200) is schedule.CENSUS  # asked for: no rule
    assert schedule.pick("scvi-tools", 10**8) is schedule.SCVI_TOOLS

    def steps(s, n):
        v = schedule.schedule_values(s, n)
        return schedule.optimizer_steps(int(n * 0.9), v["batch_size"], v["max_epochs"])

    # below the threshold the Census recipe takes fewer steps than scvi-tools, from it as many
    for n in (1_200, 20_000, 80_000, 320_000):
        assert steps(schedule.CENSUS, n) < steps(schedule.SCVI_TOOLS, n) / 1.9, n
    assert steps(schedule.CENSUS, t) == pytest.approx(steps(schedule.SCVI_TOOLS, t), rel=0.05)
    assert steps(schedule.CENSUS, 1_200) == 200  # the starved run of the issue: 1,024 + 56 cells


def test_explicit_values_win_and_resolution_is_idempotent():
    cfg = TrainConfig(lr=0.5, max_epochs=3).resolved(1_200)
    assert (cfg.lr, cfg.max_epochs, cfg.batch_size, cfg.n_epochs_kl_warmup) == (0.5, 3, 128, 400)
    assert cfg.resolved(1_200) == cfg and cfg.resolved(10**7).batch_size == 128  # all set now
    census = TrainConfig(schedule="census", batch_size=64).resolved(50)
    assert (census.lr, census.max_epochs, census.batch_size, census.early_stopping) == (
        1e-4,
        100,
        64,
        False,
    )
    with pytest.raises(ValueError, match="schedule='fast': choose one of auto, census, scvi-tools"):
        TrainConfig(schedule="fast")
    with pytest.raises(ValueError, match=r"unset: call \.resolved\(n_cells\)"):
        TrainConfig().check_resolved()


def test_warning_rules():
    assert schedule.training_warnings(3_600, [700.0] * 400, "scvi-tools") == []
    starved = schedule.training_warnings(100, [900.0 - i for i in range(100)], "census")
    assert len(starved) == 2
    assert "only 100 optimiser steps" in starved[0] and "--schedule scvi-tools" in starved[0]
    assert "still falling fast" in starved[1] and "last 10 epochs" in starved[1]
    # the default run's pace (0.024 % an epoch) is not fast; a rise (over-fitting) is not falling
    assert schedule.falling_fast(list(np.linspace(1000, 990.3, 400))) is None
    assert schedule.falling_fast(list(np.linspace(1000, 910, 100))) == pytest.approx(1e-3, rel=0.05)
    assert schedule.falling_fast([900.0] * 50 + [950.0] * 50) is None
    assert schedule.falling_fast([1.0, 0.5]) is None  # too short to judge


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subsets(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("schedule")
    out = {}
    for name in DATASETS:
        a = ad.read_h5ad(shared_data / f"{name}.h5ad")
        a = a[np.sort(np.random.default_rng(0).choice(a.n_obs, N_CELLS[name], replace=False))]
        top = np.argsort(-np.asarray(a.X.sum(0)).ravel(), kind="stable")[:N_GENES]
        a[:, np.sort(top)].copy().write_h5ad(d / f"{name}.h5ad")
        out[name] = d / f"{name}.h5ad"
    return d, out


def _pretrain(src, out, *extra) -> dict:
    args = ["pretrain", "--source", str(src), "--batch-keys", "batch", "--n-hvg", "0"]
    assert main([*args, *extra, "--out", str(out), "--quiet", "--no-resume"]) == 0
    return read_config(out)["provenance"]


PBMC = "pbmc_3chem_symphony_small"


@pytest.fixture(scope="module")
def arms(subsets):
    """On the PBMC panel: the default run, ``--config small`` and the Census recipe (the old
    default). The other datasets train the same plans (``test_default_plans_the_small_run``)."""
    d, files = subsets
    runs = {
        "default": _pretrain(files[PBMC], d / f"{PBMC}-default"),
        "small": _pretrain(files[PBMC], d / f"{PBMC}-small", "--config", "small"),
        "census": _pretrain(files[PBMC], d / f"{PBMC}-census", "--schedule", "census"),
    }
    return d, {PBMC: runs}


@pytest.mark.parametrize("name", DATASETS)
def test_default_plans_the_small_run(subsets, name):
    """On every shared dataset the default schedule trains exactly what ``--config small`` does
    (the same resolved settings, genes, split and architecture: the same ELBO, seed for seed)."""
    from censusvi.train.pretrain import load_pretrain_config, plan_from

    data = {"source": str(subsets[1][name]), "batch_keys": ("batch",), "n_hvg": 0}
    plans = [plan_from(load_pretrain_config(c, {"data": data})) for c in (None, "small")]
    default, small = plans
    assert default.cfg.train.max_epochs == 400 and default.schedule_record()["name"] == "scvi-tools"
    assert small.schedule_record()["why"] == "asked for; " + f"{N_CELLS[name]} cells"
    assert default.cfg.train == replace(small.cfg.train, schedule="auto")
    assert default.model_cfg == small.model_cfg and default.genes.ids == small.genes.ids
    assert (default.train_rows == small.train_rows).all()


def test_default_reaches_the_small_config_elbo(arms):
    name = PBMC
    runs = arms[1][name]
    default, small = runs["default"]["final_val_elbo"], runs["small"]["final_val_elbo"]
    census = runs["census"]["final_val_elbo"]
    print(
        f"{name}: val ELBO default {default:.1f}, --config small {small:.1f}, census {census:.1f}"
    )
    assert runs["default"]["schedule"]["name"] == "scvi-tools"
    assert runs["default"]["schedule"]["why"] == f"auto: {N_CELLS[name]} cells < 640,000"
    assert abs(default - small) <= 0.02 * abs(small)
    assert census > small * 1.02  # the old default (the Census recipe) does not get there
    assert "training_warnings" not in runs["default"]


def test_default_model_calls_the_known_markers(arms, tmp_path, capsys):
    d, _ = arms
    src, model = d / "pbmc_3chem_symphony_small.h5ad", d / "pbmc_3chem_symphony_small-default"
    args = ["de", "--model", str(model), "--data", str(src), "--groupby", "cell_type"]
    assert main([*args, "--group1", ",".join(MARKERS), "--out", str(tmp_path / "de.csv")]) == 0
    res = pd.read_csv(tmp_path / "de.csv", index_col=0)
    for group, markers in MARKERS.items():
        frame = res[res["group1"] == group]  # indexed by symbol, as the data names genes
        called = frame.loc[list(markers)]
        assert called["is_de_fdr_0.05"].all() and (called["lfc_mean"] > 0).all(), (group, called)


def test_starved_run_warns_and_info_shows_the_schedule(arms, capsys, caplog):
    d, runs = arms
    census = runs[PBMC]["census"]
    assert census["schedule"]["optimizer_steps"] == 100  # 540 training cells, batch 1,024
    assert any("--schedule scvi-tools" in w for w in census["training_warnings"])
    capsys.readouterr()
    assert main(["info", str(d / "pbmc_3chem_symphony_small-census")]) == 0
    shown = capsys.readouterr().out
    assert "schedule: census (asked for; 600 cells): 100 epochs, batch 1024, lr 0.0001" in shown
    assert "training_warnings" in shown
    with caplog.at_level(logging.WARNING, logger="censusvi"):
        _pretrain(d / "pbmc_kang_ctrl_stim_harmony.h5ad", d / "starved", "--max-epochs", "20")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("only 60 optimiser steps (fewer than 1,000)" in m for m in said), said


def test_flags_and_config_keys_win(subsets, tmp_path, capsys, caplog):
    _, files = subsets
    src = files["pbmc_kang_ctrl_stim_harmony"]
    with caplog.at_level(logging.INFO, logger="censusvi"):
        prov = _pretrain(src, tmp_path / "a", "--max-epochs", "2", "--batch-size", "50", "--lr", "0.002")  # fmt: skip
    rec = prov["schedule"]
    assert (rec["name"], rec["max_epochs"], rec["batch_size"], rec["lr"]) == ("scvi-tools", 2, 50, 0.002)  # fmt: skip
    assert rec["n_epochs_kl_warmup"] == 400 and rec["explicit"] == [
        "max_epochs",
        "batch_size",
        "lr",
    ]
    assert prov["config"]["train"]["lr"] == 0.002 and prov["epochs"] == 2
    start = [r.getMessage() for r in caplog.records if "training schedule" in r.getMessage()]
    assert start == [
        "training schedule scvi-tools (auto: 300 cells < 640,000; set explicitly: max_epochs, "
        "batch_size, lr): 2 epochs, batch 50, lr 0.002, KL warm-up 400 epochs (KL weight 0.00 at "
        "the last epoch), 12 optimiser steps"
    ]
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train:\n  schedule: census\n  max_epochs: 2\n")
    prov = _pretrain(src, tmp_path / "b", "--config", str(yaml), "--kl-warmup", "1")
    rec = prov["schedule"]
    assert (rec["name"], rec["why"], rec["max_epochs"], rec["n_epochs_kl_warmup"], rec["lr"]) == (
        "census",
        "asked for; 300 cells",
        2,
        1,
        1e-4,
    )
    with pytest.raises(SystemExit) as e:  # argparse's own exit for a bad choice
        main(["pretrain", "--source", str(src), "--schedule", "fast", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--schedule: invalid choice: 'fast'" in capsys.readouterr().err
    yaml.write_text("train:\n  schedule: fast\n")
    assert main(["pretrain", "--source", str(src), "--config", str(yaml), "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "schedule='fast': choose one of auto, census, scvi-tools" in capsys.readouterr().err


def test_info_of_a_model_without_a_schedule_record(arms, tmp_path, capsys):
    import shutil

    d, _ = arms
    old = tmp_path / "old"
    shutil.copytree(d / f"{PBMC}-default", old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["provenance"]["schedule"]  # as written before the schedule was recorded
    (old / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["info", str(old)]) == 0
    assert "schedule: unknown (the model predates the schedule record)" in capsys.readouterr().out
