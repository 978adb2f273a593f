"""Batch labels: the Census's concatenated keys, without a string per cell."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from censusvi.data.source import batch_categories, batch_labels, codes_in


def test_batch_categories_equal_unique_of_concatenated_labels():
    """Categorical, string, integer and float keys with missing values: the same sorted labels
    and per-cell codes as ``np.unique`` over the per-cell concatenation the Census uses (HVG
    strata keep a missing value as 'nan'; a batch refuses it)."""
    obs = pd.DataFrame(
        {
            "dataset": pd.Categorical(["d2", "d1", "d2", None, "d1", "d10"]),
            "assay": ["10x 3' v3", "10x 3' v2", "10x 3' v3", "Smart-seq2", "10x 3' v2", "x"],
            "donor": [3, 1, 2, 3, 1, 12],
            "age": [1.0, 2.0, 1.0, 1.0, np.nan, 2.0],
        }
    )
    for keys in (["dataset"], ["dataset", "assay", "donor"], ["age", "donor"]):
        per_cell = obs[keys[0]].astype(str).to_numpy(dtype=object)
        for k in keys[1:]:
            per_cell = per_cell + obs[k].astype(str).to_numpy(dtype=object)
        expected, expected_codes = np.unique(per_cell.astype(str), return_inverse=True)
        labels, codes = batch_categories(obs, keys, "obs", "HVG")
        assert labels.tolist() == expected.tolist()
        assert np.array_equal(codes, expected_codes)
        with pytest.raises(ValueError, match=r"obs: 1 of 6 cells have no '(dataset|age)' \(NaN\)"):
            batch_labels(obs, keys, "obs")
    # a model an older censusvi trained with NaN read as a batch "nan" still maps such cells
    codes, unknown = codes_in(obs, ["age"], ("1.0", "2.0", "nan"), "obs")
    assert codes.tolist() == [0, 1, 0, 0, 2, 1] and unknown == []
    hernandez = pd.DataFrame({"donor": ["Hernandez", "x", np.nan]})  # "nan" inside a name
    with pytest.raises(ValueError, match=r"1 of 3 cells have no 'donor' \(NaN\)"):
        codes_in(hernandez, ["donor"], ("Hernandez", "x"), "obs")
    with pytest.raises(
        ValueError, match=r"1 of 6 cells have no 'age' \(NaN\): give every cell a value"
    ):
        codes_in(obs, ["age"], ("1.0", "2.0"), "obs", "covariate")
    full = obs.iloc[[0, 1, 2, 5]]
    per_cell = full["dataset"].astype(str) + full["assay"].astype(str)
    assert batch_labels(full, ["dataset", "assay"], "obs").tolist() == per_cell.tolist()
    with pytest.raises(ValueError, match=r"\['donor_id'\] not in obs; obs has"):
        batch_categories(obs, ["dataset", "donor_id"], "obs")
