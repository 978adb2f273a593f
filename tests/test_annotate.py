"""Annotation: weighted kNN label transfer over a FAISS index, across technologies on real data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from censusvi.annotate.transfer import expected_calibration_error, kernel_weights, transfer_labels
from censusvi.cli import main


def test_kernel_and_transfer_on_a_table():
    d = np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]])
    w = kernel_weights(d)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert w[0, 0] > w[0, 1] > w[0, 2] and np.allclose(w[1], 1 / 3)
    labels = np.array([["T", "T", "B"], ["T", "B", "NK"]])
    res = transfer_labels(d, labels, unknown_threshold=0.6)
    assert res["predicted"].tolist() == ["T", "Unknown"]
    np.testing.assert_allclose(res["probability"] + res["uncertainty"], 1.0)
    assert res["probability"][0] == pytest.approx(w[0, 0] + w[0, 1])


def test_class_balance_lets_a_rare_type_win_its_own_neighbourhood():
    """Two of five neighbours are of a type with 1 % of the reference: plain kNN outvotes it,
    dividing votes by the reference frequency lets it win; 0 reproduces plain kNN."""
    d = np.full((1, 5), 1.0)
    labels = np.array([["HSC", "HSC", "T", "T", "T"]])
    freq = pd.Series({"HSC": 0.01, "T": 0.99})
    assert transfer_labels(d, labels)["predicted"][0] == "T"
    assert transfer_labels(d, labels, label_frequency=freq, class_balance=0.0).equals(
        transfer_labels(d, labels)
    )
    balanced = transfer_labels(d, labels, label_frequency=freq, class_balance=0.5)
    assert balanced["predicted"][0] == "HSC"
    # 2 * 10 vs 3 * 1.005 (votes / sqrt(frequency)), renormalised
    assert balanced["probability"][0] == pytest.approx(20 / (20 + 3 / 0.99**0.5))
    with pytest.raises(ValueError, match="label_frequency"):
        transfer_labels(d, labels, class_balance=0.5)


def test_ece():
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0
    assert expected_calibration_error(
        np.array([0.9, 0.9]), np.array([False, False])
    ) == pytest.approx(0.9)


def test_cross_technology_annotation_cli(cellbench_split, capsys):
    d = cellbench_split
    assert (
        main(
            [
                "index",
                "--model",
                str(d / "m"),
                "--data",
                str(d / "ref.h5ad"),
                "--label-keys",
                "cell_type",
                "--out",
                str(d / "ix"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "annotate",
                "--model",
                str(d / "m"),
                "--index",
                str(d / "ix"),
                "--query",
                str(d / "query.h5ad"),
                "--batch-key",
                "batch",
                "--out",
                str(d / "annotated.h5ad"),
            ]
        )
        == 0
    )
    out = ad.read_h5ad(d / "annotated.h5ad")
    for col in ("predicted_cell_type", "cell_type_probability", "cell_type_uncertainty"):
        assert col in out.obs
    acc = (out.obs["predicted_cell_type"].astype(str) == out.obs["cell_type"].astype(str)).mean()
    assert acc >= 0.9, acc  # Drop-seq cells labelled from CEL-seq2 cells through the latent space
    p = out.obs["cell_type_probability"].to_numpy()
    assert ((p > 0) & (p <= 1)).all()
    np.testing.assert_allclose(p + out.obs["cell_type_uncertainty"].to_numpy(), 1.0)
    assert out.uns["censusvi"]["new_batches"] == ["sc_dropseq"] and out.obsm["X_scvi"].shape == (
        210,
        50,
    )


def test_map_cli_writes_latent_and_report(cellbench_split):
    d = cellbench_split
    assert (
        main(
            [
                "map",
                "--model",
                str(d / "m"),
                "--query",
                str(d / "query.h5ad"),
                "--batch-key",
                "batch",
                "--train",
                "--max-epochs",
                "3",
                "--out",
                str(d / "mapped.h5ad"),
                "--save-model",
                str(d / "mm"),
            ]
        )
        == 0
    )
    out = ad.read_h5ad(d / "mapped.h5ad")
    assert out.obsm["X_scvi"].shape == (210, 50) and "censusvi_nll_per_count" in out.obs
    assert out.uns["censusvi"]["genes"]["overlap"] == 1.0
    from censusvi.model.io import load_model

    assert load_model(d / "mm").batch_categories[-1] == "sc_dropseq"


def test_unseen_cell_type_is_flagged_uncertain(cellbench_split, tmp_path):
    """A cell line missing from the reference gets high uncertainty (AUROC of uncertainty)."""
    from sklearn.metrics import roc_auc_score

    from censusvi.annotate.index import load_index, save_index
    from censusvi.annotate.pipeline import annotate, index_reference
    from censusvi.model.io import load_model

    d = cellbench_split
    ref = ad.read_h5ad(d / "ref.h5ad")
    held_out = "H2228"  # present in the Drop-seq query
    ref[ref.obs["cell_type"] != held_out].write_h5ad(tmp_path / "ref_minus.h5ad")
    model = load_model(d / "m")
    save_index(index_reference(model, tmp_path / "ref_minus.h5ad", ["cell_type"]), tmp_path / "ix")
    out, _ = annotate(model, load_index(tmp_path / "ix"), ad.read_h5ad(d / "query.h5ad"), "batch")
    is_novel = (out.obs["cell_type"] == held_out).to_numpy()
    assert 0 < is_novel.sum() < len(is_novel)
    auroc = roc_auc_score(is_novel, out.obs["cell_type_uncertainty"].to_numpy())
    assert auroc >= 0.85, auroc
    ev = out.uns["censusvi"]["evaluation"]["cell_type"]
    assert ev["n_cells_with_reference_label"] == int((~is_novel).sum()) and 0 <= ev["ece"] <= 1


def test_cellbench_each_technology_held_out(shared_data, tmp_path):
    """Each technology in turn is the query; mean accuracy over cells whose line the reference has."""
    from censusvi.annotate.pipeline import annotate, index_reference
    from censusvi.train.loop import TrainConfig
    from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain

    a = ad.read_h5ad(shared_data / "cellbench_lung_celllines.h5ad")
    accuracies = []
    for tech in ("Drop-seq", "CEL-seq2"):
        ref, query = a[a.obs["assay"] != tech].copy(), a[a.obs["assay"] == tech].copy()
        ref.write_h5ad(tmp_path / "ref.h5ad")
        data = DataConfig(
            source=str(tmp_path / "ref.h5ad"),
            batch_keys=("batch",),
            n_hvg=2000,
            hvg_keys=("batch",),
        )
        cfg = PretrainConfig(
            data,
            ModelSettings(),
            TrainConfig(schedule="census", max_epochs=60, lr=1e-3, batch_size=128, seed=0),
        )
        model, _ = pretrain(cfg, tmp_path / f"m{tech}", quiet=True)
        out, _ = annotate(
            model, index_reference(model, tmp_path / "ref.h5ad", ["cell_type"]), query, "batch"
        )
        accuracies.append(out.uns["censusvi"]["evaluation"]["cell_type"]["accuracy"])
    assert np.mean(accuracies) >= 0.985, accuracies


def test_ivf_index_tunes_nprobe_to_the_recall_target(tmp_path):
    import faiss
    import pandas as pd

    from censusvi.annotate.index import RECALL_TARGET, build_index, load_index, save_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 10)) * 4
    which = rng.integers(0, 30, 20_000)
    z = (centres[which] + rng.normal(size=(20_000, 10))).astype(np.float32)
    labels = pd.DataFrame({"cell_type": [f"t{w}" for w in which]})
    ix = build_index(z, labels, exact_max=1000)
    assert ix.meta["kind"].startswith("ivf") and ix.meta["recall_at_15"] >= RECALL_TARGET
    save_index(ix, tmp_path / "ix")
    loaded = load_index(tmp_path / "ix")
    assert (
        loaded.index.nprobe == ix.meta["nprobe"] < loaded.index.nlist
    )  # tuned, kept, not exhaustive
    q = (centres[rng.integers(0, 30, 500)] + rng.normal(size=(500, 10))).astype(np.float32)
    _, exact = faiss.knn(q, z, 15)
    _, found = loaded.search(q, 15)
    assert np.mean([len(set(a) & set(b)) / 15 for a, b in zip(found, exact)]) >= 0.9


def test_faiss_device_choice(tmp_path, monkeypatch):
    """'auto' searches where FAISS has a GPU and falls back to the CPU; the saved file is the CPU
    index either way; asking for a GPU FAISS cannot use says what to install."""
    from censusvi.annotate.index import build_index, faiss_gpu_count, load_index, save_index

    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 8)).astype(np.float32)
    labels = pd.DataFrame({"cell_type": [f"t{i % 3}" for i in range(500)]})
    ix = build_index(z, labels, device="cpu")
    assert ix.device == "cpu"
    save_index(ix, tmp_path / "ix")
    auto = load_index(tmp_path / "ix", device="auto")
    assert auto.device == ("gpu" if faiss_gpu_count() else "cpu")
    np.testing.assert_array_equal(auto.search(z[:20], 5)[1], ix.search(z[:20], 5)[1])
    monkeypatch.setenv("CENSUSVI_FAISS_DEVICE", "cpu")
    assert load_index(tmp_path / "ix").device == "cpu"
    with pytest.raises(ValueError, match=r"FAISS device 'tpu': choose one of"):
        load_index(tmp_path / "ix", device="tpu")
    if faiss_gpu_count() == 0:
        with pytest.raises(RuntimeError, match=r"install faiss-gpu in place of faiss-cpu"):
            load_index(tmp_path / "ix", device="gpu")
        # The usual mistake: the gpu extra installed beside faiss-cpu, whose module wins.
        import censusvi.annotate.index as index_module

        monkeypatch.setattr(index_module, "faiss_builds", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
        with pytest.raises(
            RuntimeError, match=r"shadows the GPU build: pip uninstall -y faiss-cpu"
        ):
            load_index(tmp_path / "ix", device="gpu")


class _FakeGpuIndex:
    """Stands in for a faiss GpuIndex* (this machine has no GPU): searches delegate to the CPU
    index it was copied from; anything FAISS cannot write (like a real GPU index) is refused."""

    def __init__(self, inner):
        object.__setattr__(self, "inner", inner)

    def __getattr__(self, name):
        if name == "this":  # the SWIG handle FAISS's writer would use: not a CPU index
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)


def test_index_placed_on_a_gpu_searches_there_and_saves_the_cpu_index(tmp_path, monkeypatch):
    """Where FAISS reports a GPU, 'auto' copies the index there (nprobe tuned on it), keeps the
    GPU resources with it, and writes the CPU copy to disk. FAISS's GPU calls are replaced by
    stand-ins: CI has no GPU; this checks censusvi's wiring, not FAISS."""
    import faiss

    from censusvi.annotate.index import build_index, load_index, save_index

    placed = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "gpu-resources", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(
        faiss,
        "index_cpu_to_gpu",
        lambda res, dev, index: placed.append((res, dev)) or _FakeGpuIndex(index),
        raising=False,
    )
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: index.inner, raising=False)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 8)).astype(np.float32)
    labels = pd.DataFrame({"cell_type": [f"t{i % 3}" for i in range(3000)]})
    ix = build_index(z, labels, exact_max=1000)  # IVF: nprobe is tuned through the GPU index
    assert (
        ix.device == "gpu"
        and ix.gpu_resources == "gpu-resources"
        and placed == [("gpu-resources", 0)]
    )
    assert ix.meta["kind"].startswith("ivf") and ix.meta["nprobe"] >= 8
    save_index(ix, tmp_path / "ix")  # writing the fake GPU index itself would raise
    on_cpu = load_index(tmp_path / "ix", device="cpu")
    assert on_cpu.device == "cpu" and on_cpu.index.nprobe == ix.meta["nprobe"]
    np.testing.assert_array_equal(on_cpu.search(z[:50], 15)[1], ix.search(z[:50], 15)[1])
    assert load_index(tmp_path / "ix").device == "gpu"  # auto, as a Serve replica loads it
