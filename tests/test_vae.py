"""The network: parameter counts as the Census model card, covariate injection, likelihood options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from censusvi.model.config import ModelConfig
from censusvi.model.layers import InjectedLinear
from censusvi.model.minibatch import Minibatch
from censusvi.model.vae import VAE, n_parameters, n_parameters_scvi_tools, new_vae


def test_census_parameter_count():
    """5,206,246 + 256 per batch as scvi-tools builds it; ~7.1 M at ~7,400 batches."""
    for n_batches in (1, 7400):
        cfg = ModelConfig(n_genes=8000, n_batches=n_batches)
        assert n_parameters_scvi_tools(cfg) == 5_206_246 + 256 * n_batches
        # censusvi leaves out l_encoder (1,024,642) and the two unused 128 x 8000 heads
        assert n_parameters(VAE(cfg)) == 5_206_246 + 256 * n_batches - 1_024_642 - 2 * 1_032_000
    assert abs(n_parameters_scvi_tools(ModelConfig(n_genes=8000, n_batches=7400)) - 7.1e6) < 0.1e6


def test_injection_equals_one_hot_concatenation():
    layer = InjectedLinear(5, 3, (4, 2))
    h = torch.randn(6, 5)
    cov = torch.tensor([[0, 1], [3, 0], [2, 1], [1, 1], [0, 0], [3, 1]])
    one_hot = torch.cat([h, F.one_hot(cov[:, 0], 4).float(), F.one_hot(cov[:, 1], 2).float()], 1)
    torch.testing.assert_close(layer(h, cov), layer.linear(one_hot))


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_losses_finite_and_shaped(likelihood):
    cfg = ModelConfig(n_genes=40, n_batches=2, n_hidden=8, n_latent=3, likelihood=likelihood)
    vae = VAE(cfg)
    x = torch.poisson(torch.full((7, 40), 2.0))
    mb = Minibatch.from_dense(x, torch.randint(0, 2, (7, 1)))
    out = vae.loss(mb)
    assert out.reconstruction_n.shape == (7,) and torch.isfinite(out.loss)
    assert vae.latent_mean(mb).shape == (7, 3)
    scale = vae.normalized_expression(mb)
    torch.testing.assert_close(scale.sum(1), torch.ones(7))


def test_transposed_scale_equals_the_decoders_softmax():
    """DE decodes straight into genes x draws; it must be the same normalised expression."""
    vae = VAE(ModelConfig(n_genes=30, n_batches=3, n_hidden=8, n_latent=4)).eval()
    z, cov = 5 * torch.randn(9, 4), torch.randint(0, 3, (9, 1))  # large logits: stability
    with torch.no_grad():
        expected = vae.generative(z, torch.zeros(9, 1), cov).scale_ng
        torch.testing.assert_close(vae.scale_gn(z, cov), expected.T)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="likelihood='gamma'.*nb"):
        ModelConfig(n_genes=10, n_batches=1, likelihood="gamma")
    with pytest.raises(ValueError, match="dispersion='gene-cell'"):
        ModelConfig(n_genes=10, n_batches=1, dispersion="gene-cell")


def test_library_prior_is_each_batchs_log_library_moments_over_all_blocks():
    """Streamed in blocks (as pretrain reads its training cells), the prior equals the per-batch
    mean and variance of log library size over all cells at once."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(2.0, size=(600, 40)).astype(np.float32))
    batch = rng.integers(0, 3, 600)
    vae = VAE(ModelConfig(n_genes=40, n_batches=3, latent_library=True))
    vae.set_library_prior((x[s : s + 250], batch[s : s + 250]) for s in range(0, 600, 250))
    log_lib = np.log(np.asarray(x.sum(1)).ravel())
    for b in range(3):
        assert vae.library_log_means[b].item() == pytest.approx(
            log_lib[batch == b].mean(), rel=1e-5
        )
        assert vae.library_log_vars[b].item() == pytest.approx(log_lib[batch == b].var(), rel=1e-4)


def test_vamp_prior_kl_is_log_q_minus_the_mixture_of_pseudo_cell_posteriors():
    """The VampPrior's KL estimate is log q(z|x) - log (1/K) sum_k q(z|u_k) at the sampled z,
    with u_k the pseudo-cells, which start at training cells and are trained with the model."""
    import scipy.sparse as sp
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(2.0, size=(50, 30)).astype(np.float32))
    cov = rng.integers(0, 2, (50, 1))
    cfg = ModelConfig(n_genes=30, n_batches=2, n_hidden=16, n_latent=4, prior_components=3)
    vae = new_vae(cfg, 0, 50, lambda rows: (x[rows], cov[rows]), lambda: [])
    cells = torch.log1p(torch.tensor(x.toarray()))
    assert all((cells == u).all(1).any() for u in vae.pseudo_inputs_kg.detach())
    mb = Minibatch.from_dense(torch.tensor(x.toarray()), torch.tensor(cov))
    vae.eval()  # batch norm from running statistics: both passes see the same encoder
    inf, (prior_m, prior_v) = vae._inference(mb, sample=True, with_prior=True)
    mixture = MixtureSameFamily(
        Categorical(torch.ones(3)), Independent(Normal(prior_m, prior_v.sqrt()), 1)
    )
    log_q = Normal(inf.qz_mean_nk, inf.qz_var_nk.sqrt()).log_prob(inf.z_nk).sum(-1)
    expected = log_q - mixture.log_prob(inf.z_nk)
    torch.testing.assert_close(VAE.kl_z_n(inf, (prior_m, prior_v)), expected)
    vae.train()
    vae.loss(mb).loss.backward()
    assert vae.pseudo_inputs_kg.grad.abs().sum() > 0  # the pseudo-cells learn
    with pytest.raises(ValueError, match="prior_components=-1"):
        ModelConfig(n_genes=30, n_batches=2, prior_components=-1)


def test_a_model_too_large_to_build_is_refused_before_any_allocation():
    """`pretrain --n-hidden 10000000000` ended in torch's allocator traceback; the config's own
    parameter count (within 5% of the built model's) now refuses it in one line."""
    from censusvi.model.config import MAX_PARAMETERS
    from censusvi.model.vae import n_parameters

    for cfg in (
        ModelConfig(n_genes=8000, n_batches=300),
        ModelConfig(n_genes=500, n_batches=4, n_hidden=64, n_latent=10, n_layers=3),
        ModelConfig(n_genes=2000, n_batches=2, extra_categories=(40,), encode_covariates=True),
        ModelConfig(n_genes=3000, n_batches=20, likelihood="zinb", latent_library=True),
        ModelConfig(n_genes=2000, n_batches=300, dispersion="gene-batch", prior_components=50),
    ):
        exact = n_parameters(VAE(cfg))
        assert abs(cfg.approx_parameters - exact) < 0.05 * exact, (cfg, exact)
    with pytest.raises(ValueError, match=r"n_hidden=10000000000.* over the 1e\+09 allowed"):
        ModelConfig(n_genes=1767, n_batches=3, n_hidden=10**10)
    for big in (  # terms beside the layers: the review found each let a huge model through
        {"n_batches": MAX_PARAMETERS // 100},
        {"n_batches": 1, "prior_components": 10**7},
        {"n_batches": 200_000, "dispersion": "gene-batch"},
    ):
        with pytest.raises(ValueError, match="over the 1e"):
            ModelConfig(n_genes=8000, **big)
    with pytest.raises(ValueError, match="n_layers=100000: at most 32 hidden layers"):
        ModelConfig(n_genes=100, n_batches=1, n_hidden=16, n_layers=100_000)  # 50 M parameters
    assert ModelConfig(n_genes=100, n_batches=1, n_hidden=16, n_layers=32).n_layers == 32
