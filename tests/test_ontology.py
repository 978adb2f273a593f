"""Ontology-aware answers: probabilities summed up the Cell Ontology, the most specific term
that clears the threshold, flat labels answering as themselves; from the index to obs."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from censusvi.annotate.ontology import LabelOntology, backoff, ontology_of
from censusvi.cli import main
from censusvi.outputs import ontology_columns, predicted_column
from conftest import simulated_adata

CD4, CD8, B = "CD4-positive, alpha-beta T cell", "CD8-positive, alpha-beta T cell", "B cell"

# root -> P -> {A, B1}; root -> C; X has no term
TOY = LabelOntology(
    version="toy",
    label_terms={"a": "CL:A", "b": "CL:B", "c": "CL:C"},
    ancestors={
        "CL:A": ["CL:A", "CL:P", "CL:R"],
        "CL:B": ["CL:B", "CL:P", "CL:R"],
        "CL:C": ["CL:C", "CL:R"],
    },
    names={"CL:A": "A", "CL:B": "B", "CL:C": "C", "CL:P": "parent", "CL:R": "root"},
    depth={"CL:A": 2, "CL:B": 2, "CL:C": 1, "CL:P": 1, "CL:R": 0},
    flat=["x"],
)
LABELS = np.array(["a", "b", "c", "x"])


def answer(row, threshold=0.5):
    res = backoff(np.array([row], dtype=float), LABELS, TOY, threshold)
    return res.loc[0, "term_id"], res.loc[0, "label"], round(float(res.loc[0, "probability"]), 6)


def test_backoff_climbs_to_the_common_ancestor_only_when_it_must():
    assert answer([0.9, 0.05, 0.05, 0.0]) == ("CL:A", "A", 0.9)  # confident: the fine term
    assert answer([0.45, 0.40, 0.15, 0.0]) == ("CL:P", "parent", 0.85)  # split between siblings
    assert answer([0.25, 0.20, 0.35, 0.0]) == ("CL:R", "root", 0.8)  # only the root holds 0.5
    assert answer([0.45, 0.40, 0.15, 0.0], threshold=0.9) == ("CL:R", "root", 1.0)


def test_flat_labels_answer_as_themselves_and_nothing_above_them():
    assert answer([0.1, 0.1, 0.1, 0.7]) == ("", "x", 0.7)
    # 0.4 on x, 0.6 spread below the root: the root clears 0.5, x cannot be merged into it
    assert answer([0.2, 0.2, 0.2, 0.4]) == ("CL:R", "root", 0.6)
    # nothing clears: the most probable node, the most specific among ties
    assert answer([0.1, 0.1, 0.1, 0.45], threshold=0.9) == ("", "x", 0.45)


def test_the_real_cell_ontology_gives_the_lowest_common_ancestor():
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    onto = ontology_of([CD4, CD8, B, "T_CD4"], {"T_CD4": parser.get_term_id_by_label(CD4, "CL")})
    assert onto.flat == [] and onto.label_terms["T_CD4"] == onto.label_terms[CD4]
    (lca,) = parser.get_lowest_common_ancestors(onto.label_terms[CD4], onto.label_terms[CD8])
    labels = np.array([B, CD4, CD8, "T_CD4"])
    res = backoff(np.array([[0.15, 0.25, 0.40, 0.20], [0.8, 0.1, 0.1, 0.0]]), labels, onto, 0.5)
    assert res["term_id"].tolist() == [lca, onto.label_terms[B]]
    assert res.loc[0, "label"] == parser.get_term_label(lca)  # "mature alpha-beta T cell"
    assert res["probability"].round(6).tolist() == [0.85, 0.8]
    assert ontology_of(["t0", "t1"]) is None  # no label is a CL name: no ontology


def cl_named(seed: int) -> ad.AnnData:
    a = simulated_adata(seed=seed)
    a.obs["cell_type"] = a.obs["cell_type"].map({"t0": CD4, "t1": "my cluster 7"})
    return a


@pytest.fixture(scope="module")
def cl_index(sim_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("ontology")
    cl_named(0).write_h5ad(d / "ref.h5ad")
    cl_named(1).write_h5ad(d / "q.h5ad")
    for flag, name in (("--ontology", "ix"), ("--no-ontology", "flat")):
        args = ["index", "--model", str(sim_model), "--data", str(d / "ref.h5ad"), flag]
        assert main([*args, "--label-keys", "cell_type", "--out", str(d / name)]) == 0
    return d


def test_annotate_writes_the_ontology_answer(sim_model, cl_index, capsys):
    d = cl_index
    q = ["--model", str(sim_model), "--query", str(d / "q.h5ad"), "--batch-key", "batch"]
    assert main(["annotate", *q, "--index", str(d / "ix"), "--out", str(d / "a.h5ad")]) == 0
    obs = ad.read_h5ad(d / "a.h5ad").obs
    term, name, p = ontology_columns("cell_type")
    cd4 = obs[predicted_column("cell_type")] == CD4
    assert cd4.any() and (~cd4).any()
    # CD4 cells answer with the CD4 term or one of its ancestors, never with the flat label
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    cd4_term = parser.get_term_id_by_label(CD4, "CL")
    above = set(parser.get_term_ancestors(cd4_term, include_self=True))
    assert set(obs.loc[cd4 & (obs[term] != ""), term]) <= above
    assert set(obs.loc[obs[term] == "", name]) <= {"my cluster 7"}
    assert (obs[p] + 1e-9 >= obs["cell_type_probability"]).all()  # a term holds its labels' mass
    assert main(["annotate", *q, "--index", str(d / "flat"), "--out", str(d / "b.h5ad")]) == 0
    assert term not in ad.read_h5ad(d / "b.h5ad").obs.columns


@pytest.mark.parametrize("arrow", [True, False])
def test_the_wire_and_the_client_carry_the_ontology_answer(arrow):
    import pandas as pd

    from censusvi.client import _annotated_copy
    from censusvi.wire import decode_result, encode_result

    frame = pd.DataFrame(
        {"predicted": [CD4, "x"], "probability": [0.45, 0.7], "uncertainty": [0.55, 0.3]}
    ).join(backoff(np.array([[0.45, 0.40, 0.0], [0.1, 0.2, 0.7]]), np.array([CD4, CD8, "x"]),
                   ontology_of([CD4, CD8, "x"]), 0.5).add_prefix("ontology_"))  # fmt: skip
    result = {
        "model": {"name": "m", "version": "1"},
        "n_cells": 2,
        "positions": np.arange(2),
        "latent": np.zeros((2, 3), np.float32),
        "nll_per_count": np.ones(2),
        "labels": {"cell_type": frame},
    }
    back = decode_result(*encode_result(result, arrow))
    obs = _annotated_copy(simulated_adata(n_cells=2), [back]).obs
    term, name, p = ontology_columns("cell_type")
    assert obs[name].astype(str).tolist() == ["mature alpha-beta T cell", "x"]
    assert obs[term].astype(str).tolist()[1] == "" and obs[term].astype(str).tolist()[0] != ""
    assert obs[p].round(6).tolist() == [0.85, 0.7]
