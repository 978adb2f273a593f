"""Query mapping: surgery adds batch columns, trains only them, and never moves the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from censusvi.data.h5ad import H5adSource
from censusvi.inference import latent_representation
from censusvi.mapping.query import map_query
from censusvi.mapping.surgery import SurgeryConfig
from censusvi.train.loop import TrainConfig
from censusvi.train.pretrain import DataConfig, ModelSettings, PretrainConfig, pretrain
from conftest import simulated_adata


def reference(
    tmp_path, encode_covariates: bool, dispersion: str = "gene", prior_components: int = 0
):
    a = simulated_adata(n_cells=300, n_batches=3, seed=1)
    ref, query = a[a.obs["batch"] != "b2"].copy(), a[a.obs["batch"] == "b2"].copy()
    query.obs["batch"] = "lab-x"  # a batch the reference never saw
    ref.write_h5ad(tmp_path / "ref.h5ad")
    cfg = PretrainConfig(
        DataConfig(source=str(tmp_path / "ref.h5ad"), batch_keys=("batch",), n_hvg=0),
        ModelSettings(
            n_hidden=16,
            n_latent=4,
            encode_covariates=encode_covariates,
            dispersion=dispersion,
            prior_components=prior_components,
        ),
        TrainConfig(schedule="census", max_epochs=5, lr=1e-2, batch_size=64),
    )
    model, _ = pretrain(cfg, tmp_path / "m", quiet=True)
    return model, ref, query


@pytest.mark.parametrize("prior_components", [0, 3])
def test_surgery_trains_new_columns_only(tmp_path, prior_components):
    """Also with a VampPrior, whose pseudo-cells are reference weights like any other."""
    model, ref, query = reference(
        tmp_path, encode_covariates=True, dispersion="gene-batch", prior_components=prior_components
    )
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    z_ref = latent_representation(model, H5adSource("ref", adata=ref))[1]
    mq = map_query(
        model, query, "batch", surgery=SurgeryConfig(max_epochs=8, patience=100, min_delta=0)
    )
    assert mq.report["new_batches"] == ["lab-x"] and mq.report["surgery_epochs"] == 8
    assert mq.model.batch_categories == ("b0", "b1", "lab-x")
    # the reference model object itself is untouched
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in before.items())
    after = mq.model.vae.state_dict()
    w_old = before["decoder.fc.linears.0.linear.weight"]
    w_new = after["decoder.fc.linears.0.linear.weight"]
    n_in = 4
    assert torch.equal(
        w_new[:, : n_in + 2], w_old[:, : n_in + 2]
    )  # latent + reference batch columns
    assert not torch.equal(
        w_new[:, n_in + 2], w_old[:, n_in : n_in + 2].mean(1)
    )  # new column learned
    assert torch.equal(after["px_r"][:, :2], before["px_r"]) and not torch.equal(
        after["px_r"][:, 2], before["px_r"].mean(1)
    )
    for k in before:
        # batch-norm statistics and affine weights stay the reference's, as do the pseudo-cells
        if "norms" in k or "pseudo" in k:
            assert torch.equal(after[k], before[k]), k
    # reference cells embed bit-identically with the mapped model
    z_ref_after = latent_representation(mq.model, H5adSource("ref", adata=ref))[1]
    assert np.array_equal(z_ref, z_ref_after)
    assert mq.latent.shape == (query.n_obs, 4) and np.isfinite(mq.nll_per_count).all()
    # so the reference's index still fits it: the encoder digests as the reference's
    assert mq.model.encoder_digest() == model.encoder_digest()
    # and a second mapping, of yet another lab, onto the mapped model (the digest once left the
    # first round's columns in, so the reference's index was refused)
    again = query.copy()
    again.obs["batch"] = "lab-y"
    mq2 = map_query(mq.model, again, "batch", surgery=SurgeryConfig(max_epochs=2))
    assert mq2.model.batch_categories == ("b0", "b1", "lab-x", "lab-y")
    assert mq2.model.provenance["mapped_batches"] == ["lab-x", "lab-y"]
    assert mq2.model.encoder_digest() == model.encoder_digest()


def test_census_path_needs_no_training(tmp_path):
    """encode_covariates=False: the latent comes straight from the frozen encoder."""
    model, _, query = reference(tmp_path, encode_covariates=False)
    mq = map_query(model, query, "batch")
    assert mq.report["surgery_epochs"] == 0
    with_known_batch = query.copy()
    with_known_batch.obs["batch"] = "b0"
    z_known = latent_representation(model, H5adSource("q", adata=with_known_batch))[1]
    np.testing.assert_array_equal(mq.latent, z_known)  # the encoder ignores the batch


def test_mapping_errors(tmp_path):
    model, _, query = reference(tmp_path, encode_covariates=False)
    with pytest.raises(ValueError, match="--batch-key 'donor' is not an obs column"):
        map_query(model, query, "donor")
    q = query.copy()
    q.var["gene_ids"] = [f"X{i}" for i in range(q.n_vars)]
    q.var_names = [f"Y{i}" for i in range(q.n_vars)]  # neither ids nor symbols match
    with pytest.raises(ValueError, match=r"only 0 of the model's 200 genes"):
        map_query(model, q, "batch")
