"""Gene alignment by Ensembl id, symbol fallback, zero-filling and the overlap error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from censusvi.data.source import select_genes
from censusvi.data.vocabulary import GeneVocabulary

VOCAB = GeneVocabulary(("ENSG1", "ENSG2", "ENSG3", "ENSG4"), ("A", "B", "C", "D"))


def test_align_by_id_then_symbol_and_zero_fill():
    al = VOCAB.align(["ENSG3", "", "ENSG1", "ENSG9"], ["C", "B", "A", "Z"])
    assert al.data_index.tolist() == [2, 1, 0, -1]
    assert al.report() == {
        "model_genes": 4,
        "matched": 3,
        "matched_by_id": 2,
        "matched_by_symbol": 1,
        "missing": 1,
        "extra": 1,
        "overlap": 0.75,
    }
    x = sp.csr_matrix(np.array([[1, 2, 3, 4], [0, 5, 0, 0]], dtype=np.float32))
    np.testing.assert_array_equal(select_genes(x, al).toarray(), [[3, 2, 1, 0], [0, 5, 0, 0]])


def test_low_overlap_names_expected_id_type():
    with pytest.raises(
        ValueError, match=r"only 1 of the model's 4 genes \(25.0%\).*Ensembl ids.*\['TP53'"
    ):
        VOCAB.align(["TP53", "ENSG2", "GAPDH"])


def test_duplicate_ids_refused():
    with pytest.raises(ValueError, match="unique.*ENSG1"):
        GeneVocabulary(("ENSG1", "ENSG1"))
