"""The label head: calibrated on reference cells it never saw, saved without pickle, and
selectable per annotation (``--method knn|head|ensemble``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import censusvi
from censusvi import defaults
from censusvi.annotate.head import fit_head
from censusvi.annotate.index import HEADS_FILE, load_index
from censusvi.annotate.transfer import expected_calibration_error
from censusvi.cli import main
from censusvi.outputs import UNS_KEY, predicted_column, probability_column


@pytest.fixture(scope="module")
def pbmc_latent(pbmc_scvi):
    """The three-chemistry PBMC cells (9 types) in a trained scVI latent."""
    model_dir, cells, _ = pbmc_scvi
    adata = ad.read_h5ad(cells)
    censusvi.embed(adata, str(model_dir))
    return adata.obsm["X_scvi"], adata.obs["cell_type"].astype(str).to_numpy()


def test_head_is_calibrated_on_reference_cells_it_never_saw(pbmc_latent):
    z, labels = pbmc_latent
    rng = np.random.default_rng(0)
    seen = rng.random(len(z)) < 0.5
    head, info = fit_head(z[seen], labels[seen])
    assert info["ece_after"] <= info["ece_before"] + 1e-9  # on its own calibration cells
    p = head.probabilities(z[~seen])
    assert np.allclose(p.sum(1), 1.0)
    correct = head.classes[p.argmax(1)] == labels[~seen]
    ece = expected_calibration_error(p.max(1), correct)
    assert correct.mean() > 0.85, correct.mean()
    assert ece <= 0.05, (ece, info)


def test_methods_from_the_cli_and_the_heads_file(pbmc_scvi, tmp_path, capsys, caplog):
    model_dir, cells, _ = pbmc_scvi
    a = ad.read_h5ad(cells)
    ref, query = (
        a[a.obs["batch"] != a.obs["batch"].iloc[0]],
        a[a.obs["batch"] == a.obs["batch"].iloc[0]],
    )
    ref.write_h5ad(tmp_path / "ref.h5ad")
    query.write_h5ad(tmp_path / "q.h5ad")
    common = ["--model", str(model_dir)]
    for flag, name in (("--head", "ix"), ("--no-head", "nohead")):
        args = ["index", *common, "--data", str(tmp_path / "ref.h5ad"), "--label-keys", "cell_type"]
        assert main([*args, flag, "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "ix" / HEADS_FILE).is_file() and not (
        tmp_path / "nohead" / HEADS_FILE
    ).exists()
    ix = load_index(tmp_path / "ix")
    assert ix.heads["cell_type"].classes.tolist() == sorted(set(ref.obs["cell_type"]))
    q = [*common, "--query", str(tmp_path / "q.h5ad"), "--batch-key", "batch"]
    acc = {}
    for method in ("knn", "head", "ensemble"):
        out = tmp_path / f"{method}.h5ad"
        assert (
            main(
                [
                    "annotate",
                    *q,
                    "--index",
                    str(tmp_path / "ix"),
                    "--method",
                    method,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        obs = ad.read_h5ad(out)
        assert obs.uns[UNS_KEY]["method"] == method
        assert obs.obs[probability_column("cell_type")].between(0, 1).all()
        predicted = obs.obs[predicted_column("cell_type")].astype(str)
        acc[method] = (predicted == obs.obs["cell_type"].astype(str)).mean()
    assert min(acc.values()) > 0.8, acc  # another chemistry, every method
    capsys.readouterr()
    args = ["annotate", *q, "--index", str(tmp_path / "nohead"), "--method", "head"]
    assert main([*args, "--out", str(tmp_path / "x.h5ad")]) == 2
    assert "no label head for 'cell_type'" in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()
    # no --method: the default (ensemble) where the index has heads, else knn, said once
    for name, expected in (("ix", defaults.METHOD), ("nohead", "knn")):
        caplog.clear()
        out = tmp_path / f"default-{name}.h5ad"
        assert main(["annotate", *q, "--index", str(tmp_path / name), "--out", str(out)]) == 0
        uns = ad.read_h5ad(out).uns[UNS_KEY]
        notes = [r.getMessage() for r in caplog.records if "answered by knn" in r.getMessage()]
        assert uns["method"] == expected and len(notes) == (name == "nohead"), (uns, notes)
    assert uns["method_note"] == notes[0] and "no label head for 'cell_type'" in notes[0]
    assert "method_note" not in ad.read_h5ad(tmp_path / "default-ix.h5ad").uns[UNS_KEY]


def test_one_method_resolution_for_every_entrance(pbmc_latent, tmp_path):
    """``resolve_method`` decides for the library, the MLflow model and the Serve annotator: no
    method asked for is the default, or knn on an index without a head (a note, logged once per
    version by the annotator); a method that needs a head the index lacks is refused."""
    import pandas as pd

    from censusvi.annotate.index import build_index, save_index
    from censusvi.annotate.method import resolve_method
    from censusvi.annotate.pipeline import fit_heads, transfer_all
    from censusvi.serving.annotator import IndexHost
    from censusvi.serving.parsing import transfer_options
    from censusvi.serving.settings import Settings

    z, labels = pbmc_latent
    ix = build_index(z, pd.DataFrame({"cell_type": labels}))
    assert defaults.METHOD == "ensemble"
    used, note = resolve_method(ix, None)
    assert used == "knn" and "no label head for 'cell_type'" in note
    for method in ("head", "ensemble"):
        with pytest.raises(ValueError, match="no label head for 'cell_type'.*--method knn"):
            resolve_method(ix, method)
    with pytest.raises(ValueError, match="choose one of knn, head, ensemble"):
        resolve_method(ix, "svm")
    knn = transfer_all(ix, z[:50], method="knn")["cell_type"]
    assert transfer_all(ix, z[:50])["cell_type"].equals(knn)  # the library's fallback
    save_index(ix, tmp_path / "nohead")
    s = Settings(model=str(tmp_path), index=str(tmp_path / "nohead"))
    host = IndexHost(s)
    host.indexes.prepare("local")
    options = transfer_options({}, s)
    assert options[2] is None  # no ?method=: the annotator resolves it
    answers = host.annotate_all([(z[:50], "local", *options)] * 2)
    assert [a["method"] for a in answers] == ["knn", "knn"] and host.noted == {"local"}
    assert answers[0]["labels"]["cell_type"].equals(knn)
    refused = host.annotate_all([(z[:5], "local", 15, 1.0, "ensemble")])[0]
    assert refused["status"] == 422 and "?method=knn" in refused["error"]
    fit_heads(ix, z)
    assert resolve_method(ix, None) == ("ensemble", None)


def test_out_of_reference_scaling_keeps_the_heads_calibration(pbmc_scvi):
    """Reference cells the index never saw (half of the three chemistries, as above),
    annotated with the index's out-of-reference fit and their own NLL: the head's
    probabilities, each scaled by the cell's in-reference probability, stay calibrated (ECE <=
    0.05), within 0.02 of the head's own (ALPHA 0.05 would have cost 0.04 here)."""
    from censusvi.annotate.pipeline import index_reference, reference_nll, transfer_all
    from censusvi.data.h5ad import H5adSource
    from censusvi.inference import latent_representation
    from censusvi.model.io import load_model

    model_dir, cells, _ = pbmc_scvi
    model = load_model(model_dir)
    a = ad.read_h5ad(cells)
    seen = np.random.default_rng(0).random(a.n_obs) < 0.5
    ix = index_reference(model, a[seen].copy(), ["cell_type"], ontology=False)
    assert "novelty" in ix.meta
    source = H5adSource("held out", adata=a[~seen].copy())
    pos, z, _ = latent_representation(model, source)
    truth = a.obs["cell_type"].astype(str).to_numpy()[~seen][pos]
    nll = reference_nll(model, source, pos)
    res = transfer_all(ix, z, method="head", class_balance=0.0, nll=nll)["cell_type"]
    correct = res["predicted"].to_numpy() == truth
    ece = expected_calibration_error(res["probability"].to_numpy(), correct)
    p = ix.heads["cell_type"].probabilities(z)
    own = expected_calibration_error(p.max(1), ix.heads["cell_type"].classes[p.argmax(1)] == truth)
    assert correct.mean() > 0.85 and ece <= 0.05 and ece <= own + 0.02, (correct.mean(), ece, own)


def test_a_corpus_head_trains_and_calibrates_on_bounded_samples(monkeypatch):
    """Above MAX_STEPS x BATCH training cells the steps draw from a random sample of that size,
    and the temperature reads at most MAX_CALIBRATION_CELLS: a Census-size latent is never
    copied whole; the head still separates the types and stays calibrated."""
    from censusvi.annotate import head as head_module

    monkeypatch.setattr(head_module, "MAX_STEPS", 100)  # cap: 100 x 256 = 25,600 training cells
    monkeypatch.setattr(head_module, "MIN_STEPS", 100)
    monkeypatch.setattr(head_module, "MAX_CALIBRATION_CELLS", 500)
    rng = np.random.default_rng(0)
    labels = rng.choice(["a", "b", "c"], 30_000)
    centres = {"a": 0.0, "b": 2.0, "c": 4.0}
    z = (rng.normal(size=(30_000, 8)) + np.array([centres[x] for x in labels])[:, None]).astype(
        np.float32
    )
    h, info = head_module.fit_head(z, labels)
    assert info["n_train_cells"] == 100 * head_module.BATCH and info["n_calibration_cells"] == 500
    p = h.probabilities(z)
    assert (h.classes[p.argmax(1)] == labels).mean() > 0.9
    assert info["ece_after"] <= 0.05
