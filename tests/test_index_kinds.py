"""The FAISS index by kind (exact, IVF-Flat, IVF-PQ with a re-rank) and metric (l2, cosine)."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pandas as pd
import pytest

from censusvi import defaults
from censusvi.annotate import faiss_index as fx
from censusvi.annotate.index import build_index, load_index, save_index
from censusvi.annotate.pipeline import holdout_evaluation, transfer_all

N, DIM, TYPES = 12_000, 8, 30


@pytest.fixture(scope="module")
def reference():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(TYPES, DIM)) * 4
    which = rng.integers(0, TYPES, N + 500)
    z = (centres[which] + rng.normal(size=(len(which), DIM))).astype(np.float32)
    labels = pd.DataFrame({"cell_type": [f"t{w}" for w in which[:N]]})
    return z[:N], labels, z[N:]  # reference, its labels, 500 queries


@pytest.fixture(scope="module")
def built(reference):
    """build(kind, metric): each index built once per module."""
    cache = {}

    def build(kind: str, metric: str = "l2"):
        if (kind, metric) not in cache:
            cache[kind, metric] = build_index(reference[0], reference[1], kind=kind, metric=metric)
        return cache[kind, metric]

    return build


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.mark.parametrize("kind", ["flat", "ivfflat", "ivfpq"])
def test_each_kind_builds_searches_and_records_its_figures(kind, reference, built, tmp_path):
    z, labels, q = reference
    ix = built(kind)
    meta = ix.meta
    assert meta["kind"] == kind and meta["metric"] == "l2"
    assert meta["recall_at_15"] >= (1.0 if kind == "flat" else fx.RECALL_TARGET)
    assert meta["queries_per_s"] > 0 and meta["build_s"] > 0 and meta["memory_bytes"] > 0
    save_index(ix, tmp_path / "ix")
    on_disk = json.loads((tmp_path / "ix" / "index.json").read_text())
    for key in ("recall_at_15", "queries_per_s", "memory_bytes", "build_s", "metric", "kind"):
        assert on_disk[key] == meta[key]
    loaded = load_index(tmp_path / "ix")
    assert fx.search_settings(loaded.index) == fx.search_settings(ix.index)  # tuned, kept
    _, truth = faiss.knn(q, z, 15)
    dist, found = loaded.search(q, 15)
    assert recall(found, truth) >= (1.0 if kind == "flat" else 0.9)
    exact_d = np.sqrt(((z[found[:, 0]] - q) ** 2).sum(1))
    np.testing.assert_allclose(dist[:, 0], exact_d, rtol=1e-2, atol=1e-2)  # distances, not codes


def test_ivfpq_is_smaller_than_ivfflat_and_its_labels_equal_exact_search(reference, built):
    q = reference[2]
    flat, ivfflat, ivfpq = built("flat"), built("ivfflat"), built("ivfpq")
    assert ivfpq.meta["memory_bytes"] < ivfflat.meta["memory_bytes"]
    exact = transfer_all(flat, q)["cell_type"]["predicted"].to_numpy()
    approx = transfer_all(ivfpq, q)["cell_type"]["predicted"].to_numpy()
    assert (approx == exact).mean() >= 0.99


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_cosine_neighbours_equal_brute_force_cosine(kind, reference, built):
    z, _, q = reference
    ix = built(kind, "cosine")
    assert ix.meta["metric"] == "cosine"
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
    truth = np.argsort(-cos, axis=1)[:, :15]
    dist, found = ix.search(q, 15)
    if kind == "flat":
        np.testing.assert_array_equal(found, truth)
        best = np.take_along_axis(cos, truth, 1)
        np.testing.assert_allclose(dist, np.sqrt(np.maximum(2 - 2 * best, 0)), atol=1e-3)
    else:
        assert recall(found, truth) >= 0.9
    # not what Euclidean distance finds on these uncentred clusters
    assert recall(truth, faiss.knn(q, z, 15)[1]) < 0.9


def test_auto_chooses_by_size_and_bad_choices_say_what_to_pick():
    assert fx.choose_kind("auto", 1000, 50) == "flat"
    assert fx.choose_kind("auto", 1_000_000, 50) == "ivfflat"
    assert fx.choose_kind("auto", 10_000_000, 50) == "ivfpq"  # 2 GB of float32 vectors
    assert fx.choose_kind("ivfpq", 1000, 50) == "ivfpq"
    assert defaults.INDEX_KIND in defaults.INDEX_KINDS and defaults.METRIC in defaults.METRICS
    z = np.zeros((10, 4), np.float32)
    labels = pd.DataFrame({"cell_type": ["a"] * 10})
    with pytest.raises(ValueError, match=r"index kind 'hnsw': choose one of auto, flat, ivfflat"):
        build_index(z, labels, kind="hnsw")
    with pytest.raises(ValueError, match=r"metric 'dot': choose one of l2, cosine"):
        build_index(z, labels, metric="dot")


def test_held_out_evaluation_is_capped(reference):
    z, labels, _ = reference
    capped = holdout_evaluation(z[:3000], labels[:3000], max_queries=200)["cell_type"]
    assert capped["n_cells_with_reference_label"] == 200 and capped["accuracy"] > 0.9


def test_cli_index_options_default_from_one_place(capsys):
    from censusvi.cli.parser import build_parser

    base = ["index", "--model", "m", "--data", "d.h5ad", "--label-keys", "cell_type", "--out", "o"]
    a = build_parser().parse_args(base)
    assert (a.index, a.metric) == (defaults.INDEX_KIND, defaults.METRIC)
    a = build_parser().parse_args([*base, "--index-kind", "ivfpq", "--metric", "cosine"])
    assert (a.index, a.metric) == ("ivfpq", "cosine")
    assert build_parser().parse_args([*base, "--index", "ivfflat"]).index == "ivfflat"  # old name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--index-kind", "hnsw"])
    assert "invalid choice: 'hnsw'" in capsys.readouterr().err


def test_label_shares_are_stored_so_a_loaded_index_does_not_count_its_labels(
    reference, built, tmp_path, monkeypatch
):
    """index.json carries each label's share; a loaded index answers from it (counting 10 M
    labels on the first query took ~1 s), and the shares equal a fresh count."""
    z, labels, q = reference
    save_index(built("ivfflat"), tmp_path / "ix")
    stored = json.loads((tmp_path / "ix" / "index.json").read_text())["label_frequency"]
    assert set(stored["cell_type"]["labels"]) == set(labels["cell_type"])
    loaded = load_index(tmp_path / "ix")
    monkeypatch.setattr(
        pd.Series, "value_counts", lambda *a, **k: pytest.fail("labels counted at query time")
    )
    freq = loaded.label_frequency("cell_type")
    monkeypatch.undo()
    counted = labels["cell_type"].value_counts(normalize=True)
    pd.testing.assert_series_equal(
        freq.sort_index(), counted.sort_index(), check_names=False, check_index_type=False
    )
    assert len(transfer_all(loaded, q)["cell_type"]) == len(q)


def test_label_codes_equal_numpy_unique_of_the_labels_as_strings():
    from censusvi.annotate.transfer import label_codes

    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["b", "a", 3, "T cell", "3x"], dtype=object), size=(200, 15))
    codes, cats = label_codes(labels)
    want_cats, want_codes = np.unique(labels.astype(str), return_inverse=True)
    np.testing.assert_array_equal(cats, want_cats)
    np.testing.assert_array_equal(codes, want_codes.reshape(labels.shape))
