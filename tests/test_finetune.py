"""Fine-tuning a reference model with its labels (scANVI's second stage): the labels sharpen the
latent for unseen cells of the same types, the head built on it stays calibrated, the base model
is untouched, and the index's calibration cells keep their labels out of the fine-tuning."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import censusvi
from censusvi.annotate.finetune import IGNORE, label_codes, scanvi_epochs
from censusvi.annotate.head import calibration_rows
from censusvi.annotate.transfer import expected_calibration_error
from censusvi.cli import main
from censusvi.inference import get_latent_representation
from censusvi.model.io import load_model


@pytest.fixture(scope="module")
def pbmc_halves(pbmc_scvi):
    """The PBMC panel's model, and its cells split in halves: one labelled reference, one unseen."""
    model_dir, cells, _ = pbmc_scvi
    a = ad.read_h5ad(cells)
    seen = np.random.default_rng(0).random(a.n_obs) < 0.5
    return load_model(model_dir), a[seen].copy(), a[~seen].copy()


def _knn_accuracy(model, ref, held) -> float:
    """Accuracy of 15-NN votes in ``model``'s latent: ``held`` cells voted by ``ref`` cells."""
    z_ref, z_held = (get_latent_representation(model, x) for x in (ref, held))
    knn = KNeighborsClassifier(15).fit(z_ref, ref.obs["cell_type"].astype(str))
    return float((knn.predict(z_held) == held.obs["cell_type"].astype(str)).mean())


def test_finetuning_helps_unseen_cells_and_keeps_the_head_calibrated(pbmc_halves):
    model, ref, held = pbmc_halves
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    tuned = censusvi.finetune(ref, model, "cell_type")
    assert all(torch.equal(before[k], v) for k, v in model.vae.state_dict().items())  # a copy
    report = tuned.provenance["finetune"]
    assert report["epochs"] == scanvi_epochs(ref.n_obs) == 10
    calib = calibration_rows(ref.n_obs, np.random.default_rng(0))
    assert report["withheld_cells"] == calib.sum() > 0
    assert report["labelled_cells"] == ref.n_obs - calib.sum()
    history = report["history"]
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.2, history

    frozen, after = _knn_accuracy(model, ref, held), _knn_accuracy(tuned, ref, held)
    print(f"15-NN accuracy on unseen cells: frozen {frozen:.3f}, fine-tuned {after:.3f}")
    assert after >= frozen + 0.01 and after > 0.9, (frozen, after)

    ix = censusvi.build_index(ref, tuned, ontology=False)
    p = ix.heads["cell_type"].probabilities(get_latent_representation(tuned, held))
    correct = ix.heads["cell_type"].classes[p.argmax(1)] == held.obs["cell_type"].astype(str)
    ece = expected_calibration_error(p.max(1), correct)
    print(
        f"head on the fine-tuned latent, unseen cells: accuracy {correct.mean():.3f}, ECE {ece:.3f}"
    )
    assert correct.mean() > 0.9 and ece <= 0.05, (correct.mean(), ece)


def test_unlabelled_cells_and_too_few_types():
    classes, codes = label_codes(["B", "unknown", None, "T", "", "B", "Unassigned"], "ref")
    assert classes.tolist() == ["B", "T"]
    assert codes.tolist() == [0, IGNORE, IGNORE, 1, IGNORE, 0, IGNORE]
    with pytest.raises(ValueError, match="1 labelled type.*at least two"):
        label_codes(["B", "unknown", "B"], "ref")


def test_the_cli_writes_a_model_that_indexes_registers_and_refuses_bad_input(
    pbmc_halves, tmp_path, capsys, monkeypatch
):
    model, ref, _ = pbmc_halves
    model.save(tmp_path / "m")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    args = ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "ref.h5ad")]
    assert main([*args, "--labels-key", "cell_type", "--max-epochs", "2", "--out",
                 str(tmp_path / "ft")]) == 0  # fmt: skip
    assert "fine-tuned 2 epochs" in capsys.readouterr().out
    tuned = load_model(tmp_path / "ft")
    assert tuned.provenance["finetune"]["labels_key"] == "cell_type"
    assert tuned.genes == model.genes and tuned.batch_categories == model.batch_categories
    ix = ["index", "--model", str(tmp_path / "ft"), "--data", str(tmp_path / "ref.h5ad")]
    assert main([*ix, "--label-keys", "cell_type", "--out", str(tmp_path / "ix")]) == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["models", "register", str(tmp_path / "ft"), "--index", str(tmp_path / "ix")]) == 0
    import mlflow

    version = mlflow.MlflowClient(uri).get_model_version("censusvi-scvi", "1")
    assert version.tags["finetune_labels_key"] == "cell_type"
    capsys.readouterr()  # MLflow's own log lines

    assert main([*args, "--labels-key", "cell_typo", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label key 'cell_typo' is not in obs" in err[0], err
    assert not (tmp_path / "bad").exists()
    # a ratio of inf, or one so large that the loss overflows, wrote an all-NaN model and exited 0
    for ratio, says in [("inf", "classification_ratio=inf: must be a finite number > 0"),
                        ("1e300", "fine-tuning diverged: the loss became nan at epoch 0")]:  # fmt: skip
        code = main([*args, "--labels-key", "cell_type", "--max-epochs", "1",
                     "--classification-ratio", ratio, "--out", str(tmp_path / "bad")])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and says in err[-1], err
        assert not (tmp_path / "bad").exists()


def test_a_zinb_model_fine_tunes_and_a_mismatched_index_is_named():
    """scvi-tools' default likelihood (ZINB) reads dense counts; an index built with the base
    model, used with the fine-tuned one, logs which encoders differ."""
    from conftest import simulated_adata

    a = simulated_adata(n_cells=200)
    base = censusvi.pretrain(a, "batch", n_hvg=0, max_epochs=2, likelihood="zinb", n_latent=4)
    tuned = censusvi.finetune(a, base, "cell_type", max_epochs=2)
    assert tuned.config.likelihood == "zinb" and len(tuned.provenance["finetune"]["history"]) == 2
    assert tuned.encoder_digest() != base.encoder_digest()
    index = censusvi.build_index(a, base, ontology=False, head=False)
    assert index.meta["encoder_digest"] == base.encoder_digest()
    censusvi.annotate(a.copy(), base, index, method="knn")
    with pytest.raises(ValueError, match="the index was built with another model .encoder"):
        censusvi.annotate(a.copy(), tuned, index, method="knn")  # its latents are another's


def test_withholding_that_leaves_one_type_is_refused():
    """A reference whose second type sits only in the index's calibration rows has nothing to
    teach: a one-line error, not an ELBO-only run that claims success."""
    from conftest import simulated_adata

    a = simulated_adata(n_cells=60)
    calib = calibration_rows(a.n_obs, np.random.default_rng(0))
    a.obs["cell_type"] = np.where(calib & (np.arange(a.n_obs) % 2 == 0), "rare", "common")
    base = censusvi.pretrain(a, "batch", n_hvg=0, max_epochs=1, n_latent=4)
    with pytest.raises(ValueError, match="1 labelled type.*withheld for the index's calibration"):
        censusvi.finetune(a, base, "cell_type")


def test_a_reference_with_a_batch_the_model_lacks_names_the_reference_fix():
    """Fine-tuning or indexing cells of a batch the model never saw: the error says to select
    the model's batches or pretrain with them (not `censusvi map`, which is for queries)."""
    from conftest import simulated_adata

    a = simulated_adata(n_cells=60)
    base = censusvi.pretrain(a, "batch", n_hvg=0, max_epochs=1, n_latent=4)
    a.obs["batch"] = a.obs["batch"].astype(str).replace({a.obs["batch"].iloc[0]: "new lab"})
    for call in (
        lambda: censusvi.finetune(a, base, "cell_type"),
        lambda: censusvi.build_index(a, base, ontology=False, head=False),
    ):
        with pytest.raises(ValueError, match="unknown to the model") as err:
            call()
        assert "--obs-filter" in str(err.value) and "censusvi map" not in str(err.value)
