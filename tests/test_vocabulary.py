"""Gene alignment: every pairing of the model's names (ids, symbols) with the data's (var_names,
id and symbol columns) is tried, the best kept and named; zero-filling; the overlap error."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from censusvi.data.h5ad import gene_keys
from censusvi.data.source import select_genes
from censusvi.data.vocabulary import GeneVocabulary, table_names

IDS, SYMS = ("ENSG1", "ENSG2", "ENSG3", "ENSG4"), ("A", "B", "C", "D")
VOCAB = GeneVocabulary(IDS, SYMS)  # a censusvi model trained on data with feature_name
SYMBOL_MODEL = GeneVocabulary(SYMS)  # an scvi-tools model trained on symbol var_names


def var(names, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(names, dtype=str))


def test_align_by_ids_and_zero_fill():
    al = VOCAB.align(gene_keys(var(["C", "x", "A", "Z"], gene_ids=["ENSG3", "ENSG2", "ENSG1", "ENSG9"])))  # fmt: skip
    assert al.data_index.tolist() == [2, 1, 0, -1]
    assert al.report() == {
        "model_genes": 4,
        "matched": 3,
        "matched_by": "model ids ~ var['gene_ids']",
        "keys_tried": {
            "model ids ~ var['gene_ids']": 3,
            "model ids ~ var_names": 0,
            "model symbols ~ var['gene_ids']": 0,
            "model symbols ~ var_names": 2,
        },
        "missing": 1,
        "extra": 1,
        "overlap": 0.75,
    }
    x = sp.csr_matrix(np.array([[1, 2, 3, 4], [0, 5, 0, 0]], dtype=np.float32))
    np.testing.assert_array_equal(select_genes(x, al).toarray(), [[3, 2, 1, 0], [0, 5, 0, 0]])


@pytest.mark.parametrize(
    ("vocab", "data", "matched_by"),
    [
        # ids vs ids: var_names are symbols of another annotation, the ids agree
        (VOCAB, var(["a", "b", "c", "d"], gene_ids=list(IDS)), "model ids ~ var['gene_ids']"),
        # symbols vs symbols: the data has no ids at all
        (VOCAB, var(["D", "C", "B", "A"]), "model symbols ~ var_names"),
        # the model's symbols vs data named by (other) ids with a feature_name column
        (VOCAB, var(["ENSG7", "ENSG8", "ENSG9", "ENSG0"], feature_name=list(SYMS)),
         "model symbols ~ var['feature_name']"),
        # a symbol-keyed model vs Census-style data: ids in var_names, symbols in feature_name
        (SYMBOL_MODEL, var(list(IDS), feature_name=list(SYMS)), "model symbols ~ var['feature_name']"),
        # a symbol-keyed model vs scanpy-style data: symbols in var_names, ids in gene_ids
        (SYMBOL_MODEL, var(list(SYMS), gene_ids=list(IDS)), "model symbols ~ var_names"),
    ],
)  # fmt: skip
def test_align_picks_the_key_matching_most_and_says_which(vocab, data, matched_by, caplog):
    with caplog.at_level(logging.INFO, logger="censusvi.data.vocabulary"):
        al = vocab.align(gene_keys(data), where="q.h5ad")
    assert al.matched_by == matched_by and al.n_matched == 4
    model_key, data_key = matched_by.split(" ~ ")
    assert [gene_keys(data)[data_key][j] for j in al.data_index] == list(vocab.keys()[model_key])
    assert f"q.h5ad: 4 of the model's 4 genes matched by {matched_by}" in caplog.text


def test_low_overlap_names_every_key_tried_and_its_overlap():
    data = gene_keys(var(["TP53", "ENSG2", "GAPDH"], feature_name=["TP53", "X", "GAPDH"]))
    with pytest.raises(ValueError) as e:
        VOCAB.align(data)
    msg = str(e.value)
    assert msg.startswith("only 1 of the model's 4 genes (25.0%) are in the data")
    for key in ("model ids ~ var_names: 1", "model ids ~ var['feature_name']: 0",
                "model symbols ~ var_names: 0", "model symbols ~ var['feature_name']: 0"):  # fmt: skip
        assert key in msg, (key, msg)
    assert "Ensembl ids" in msg and "var_names like ['TP53', 'ENSG2', 'GAPDH']" in msg


def test_repeats_refused_in_the_chosen_key_only():
    with pytest.raises(ValueError, match="unique.*ENSG1"):
        GeneVocabulary(("ENSG1", "ENSG1"))
    # feature_name repeats a symbol, but the ids match better: aligned by id
    ok = gene_keys(var(list(IDS), feature_name=["A", "A", "C", "D"]))
    assert VOCAB.align(ok).matched_by == "model ids ~ var_names"
    # a symbol-only model must match by symbol, and the repeated one is refused
    with pytest.raises(
        ValueError, match=r"the data, var\['feature_name'\]: gene ids must be unique.*A \(2"
    ):
        SYMBOL_MODEL.align(ok)


def test_table_names_use_the_datas_symbols_and_ids():
    # a symbol-keyed model: ids come from the data, where it has them
    data = gene_keys(var(["A", "B", "C"], gene_ids=["ENSG1", "ENSG2", "ENSG3"]))
    symbols, ids = table_names(SYMBOL_MODEL, SYMBOL_MODEL.align(data), data)
    assert symbols == ["A", "B", "C", "D"] and ids == ["ENSG1", "ENSG2", "ENSG3", "D"]
    # an id-keyed model with symbols: the data's symbol column names its genes
    data = gene_keys(var(list(IDS), feature_name=["a1", "b1", "c1", "d1"]))
    symbols, ids = table_names(VOCAB, VOCAB.align(data), data)
    assert symbols == ["a1", "b1", "c1", "d1"] and ids == list(IDS)
