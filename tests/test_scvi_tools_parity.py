"""censusvi's VAE is scvi-tools' SCVI: with copied weights, encoder, decoder and loss agree.

scvi-tools comes from the optional ``compare`` extra (``make test`` installs it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from censusvi.model.config import ModelConfig
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.model.scvi_tools import state_dict_from_scvi_tools
from censusvi.model.vae import VAE
from conftest import simulated_adata

scvi = pytest.importorskip("scvi")


@pytest.mark.parametrize("n_layers", [1, 2])
def test_copied_weights_give_scvi_tools_outputs(n_layers):
    adata = simulated_adata(n_cells=64, n_genes=120)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    theirs = scvi.model.SCVI(
        adata, n_hidden=32, n_latent=6, n_layers=n_layers, gene_likelihood="nb"
    )
    theirs.train(
        max_epochs=2, batch_size=32, accelerator="cpu", enable_progress_bar=False, logger=False
    )
    module = theirs.module.eval()

    ours = VAE(
        ModelConfig(n_genes=120, n_batches=3, n_hidden=32, n_latent=6, n_layers=n_layers)
    ).eval()
    ours.load_state_dict(state_dict_from_scvi_tools(module.state_dict(), ours.state_dict()))

    codes = adata.obs["_scvi_batch"].to_numpy().astype(np.int64).reshape(-1, 1)
    mb = minibatch_from_csr(adata.X, codes)
    x = torch.from_numpy(adata.X.toarray())
    batch = torch.from_numpy(codes)
    with torch.no_grad():
        inf = module.inference(x, batch)
        z = inf["qz"].loc
        gen = module.generative(z, inf["library"], batch)
        mine = ours.inference(mb, sample=False)
        my_gen = ours.generative(z, mine.log_library_n1, mb.covariates_nc)
        theirs_rec = -gen["px"].log_prob(x).sum(-1)
        my_rec = ours.reconstruction_n(mb, my_gen)
    torch.testing.assert_close(mine.qz_mean_nk, inf["qz"].loc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine.qz_var_nk, inf["qz"].scale ** 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(my_gen.scale_ng, gen["px"].scale, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(my_rec, theirs_rec, atol=1e-3, rtol=1e-5)
    latent = theirs.get_latent_representation(adata)
    np.testing.assert_allclose(ours.latent_mean(mb).numpy(), latent, atol=1e-5)
