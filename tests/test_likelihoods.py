"""Likelihoods against scipy's reference log-probabilities, and the fast paths against the dense formula."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
import torch

from censusvi.model.config import ModelConfig
from censusvi.model.likelihoods import (
    NonZeros,
    log_nb_positive,
    log_poisson,
    log_zinb_positive,
    nb_log_prob_sum_sparse,
    poisson_log_prob_sum_sparse,
)
from censusvi.model.minibatch import Minibatch, minibatch_from_csr
from censusvi.model.vae import VAE

RNG = np.random.default_rng(0)
X = RNG.negative_binomial(2, 0.3, (20, 30)).astype(np.float64) * (RNG.random((20, 30)) < 0.4)
MU = RNG.gamma(2.0, 2.0, (20, 30))
THETA = RNG.gamma(2.0, 1.0, 30)


def test_nb_matches_scipy():
    ours = log_nb_positive(torch.tensor(X), torch.tensor(MU), torch.tensor(THETA), eps=0.0)
    ref = st.nbinom.logpmf(X, THETA, THETA / (THETA + MU))
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-10)


def test_zinb_matches_mixture():
    pi_logits = RNG.normal(size=(20, 30))
    pi = 1 / (1 + np.exp(-pi_logits))
    nb = st.nbinom.pmf(X, THETA, THETA / (THETA + MU))
    ref = np.log(pi * (X == 0) + (1 - pi) * nb)
    ours = log_zinb_positive(
        torch.tensor(X), torch.tensor(MU), torch.tensor(THETA), torch.tensor(pi_logits)
    )  # default eps: it also decides which entries count as zero
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-8)


def test_poisson_matches_scipy():
    ours = log_poisson(torch.tensor(X), torch.tensor(MU), eps=0.0)
    np.testing.assert_allclose(ours.numpy(), st.poisson.logpmf(X, MU), rtol=1e-10)


def _nonzeros(x: np.ndarray) -> NonZeros:
    r, c = np.nonzero(x)
    return NonZeros(torch.tensor(r), torch.tensor(c), torch.tensor(x[r, c]))


@pytest.mark.parametrize("theta_shape", ["gene", "cell-gene"])
def test_sparse_sums_equal_dense(theta_shape):
    theta = torch.tensor(THETA if theta_shape == "gene" else RNG.gamma(2.0, 1.0, (20, 30)))
    x, mu, nz = torch.tensor(X), torch.tensor(MU), _nonzeros(X)
    dense = log_nb_positive(x, mu, theta).sum(-1)
    torch.testing.assert_close(nb_log_prob_sum_sparse(nz, mu, theta), dense, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(poisson_log_prob_sum_sparse(nz, mu), log_poisson(x, mu).sum(-1))


def _loss_and_grads(vae: VAE, mb: Minibatch, fused: bool) -> tuple[float, dict[str, torch.Tensor]]:
    vae.zero_grad()
    torch.manual_seed(1)
    out = vae.loss(mb, kl_weight=0.3, fused=fused)
    out.loss.backward()
    return out.loss.item(), {k: p.grad.clone() for k, p in vae.named_parameters()}


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
@pytest.mark.parametrize("latent_library", [False, True])
def test_fused_nb_loss_and_gradients_equal_dense_formula(dispersion, latent_library):
    """The fast path must be the same model: loss and every gradient equal the dense scVI formula."""
    x = sp.csr_matrix(X)
    cov = RNG.integers(0, 3, (20, 1))
    cfg = ModelConfig(
        n_genes=30,
        n_batches=3,
        n_hidden=16,
        n_latent=4,
        dispersion=dispersion,
        latent_library=latent_library,
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    vae = VAE(cfg).double()
    dense = Minibatch.from_dense(torch.tensor(X), torch.tensor(cov))
    csr = minibatch_from_csr(x, cov)  # the loader's non-zero list, in float64 like the rest
    nz = NonZeros(csr.nz.row, csr.nz.col, csr.nz.value.double())
    fast = Minibatch(dense.h_ng, dense.log_library_n1, dense.covariates_nc, nz)
    loss_f, grads_f = _loss_and_grads(vae, fast, fused=True)
    loss_d, grads_d = _loss_and_grads(vae, dense, fused=False)
    assert loss_f == pytest.approx(loss_d, rel=1e-12)
    for name, g in grads_d.items():
        scale = g.abs().max().item() + 1e-3  # biases before batch norm have ~0 true gradient
        assert (grads_f[name] - g).abs().max().item() / scale < 1e-9, name
