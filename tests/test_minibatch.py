"""Minibatches: the host (scipy) and device-resident (DeviceCSR) builders give the same tensors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from censusvi.model.config import ModelConfig
from censusvi.model.layers import SparseRows
from censusvi.model.minibatch import DeviceCSR, minibatch_from_csr
from censusvi.model.vae import VAE


def counts(n: int = 50, g: int = 30) -> sp.csr_matrix:
    x = sp.random(n, g, density=0.2, format="csr", random_state=1, dtype=np.float32)
    x.data = np.ceil(x.data * 5)
    return x


def test_host_minibatch_fields():
    x = counts()
    mb = minibatch_from_csr(x[:4], np.array([0, 1, 2, 0]), with_counts=True)
    np.testing.assert_allclose(mb.h_ng.numpy(), np.log1p(x[:4].toarray()), rtol=1e-6)
    np.testing.assert_allclose(
        mb.log_library_n1.numpy().ravel(), np.log(x[:4].sum(1).A.ravel()), rtol=1e-6
    )
    dense = np.zeros((4, 30), dtype=np.float32)
    dense[mb.nz.row.numpy(), mb.nz.col.numpy()] = mb.nz.value.numpy()
    np.testing.assert_array_equal(dense, x[:4].toarray())


def test_device_csr_gathers_the_same_rows():
    x, cov = counts(), np.arange(50) % 3
    d = DeviceCSR(x, cov, "cpu")
    rows = np.array([7, 3, 3, 49, 0])
    a = d.minibatch(rows, torch.from_numpy(rows), with_counts=True)
    b = minibatch_from_csr(x[rows], cov[rows], with_counts=True)
    for field in ("h_ng", "log_library_n1", "covariates_nc", "x_ng"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field))
    for field in ("row", "col", "value"):
        assert torch.equal(getattr(a.nz, field), getattr(b.nz, field))
    sizes = [m.n_cells for m in d.minibatches(16, shuffle=True, seed=0)]
    assert sizes == [16, 16, 16]  # the 2-cell remainder is skipped: batch norm needs more


@pytest.mark.parametrize("prior_components", [0, 3])
def test_sparse_encoder_input_is_the_same_model(prior_components):
    """At Census density the CPU minibatch holds log1p counts sparse (CSR and its transpose); the
    loss and every gradient equal those of the dense input (VampPrior models included)."""
    x = sp.random(64, 300, density=0.05, format="csr", random_state=2, dtype=np.float32)
    x.data = np.ceil(x.data * 9)
    x = x[np.diff(x.indptr) > 0]
    cov = np.arange(x.shape[0]) % 3
    mb = minibatch_from_csr(x, cov)
    assert isinstance(mb.h_ng, SparseRows) and mb.n_cells == x.shape[0]
    np.testing.assert_allclose(mb.h_ng.to_dense().numpy(), np.log1p(x.toarray()), rtol=1e-6)
    dense = replace(mb, h_ng=mb.h_ng.to_dense())
    cfg = ModelConfig(
        n_genes=300,
        n_batches=3,
        n_hidden=16,
        n_latent=4,
        dropout_rate=0.0,
        latent_library=True,
        prior_components=prior_components,
    )
    torch.manual_seed(0)
    vae = VAE(cfg)
    grads = []
    for m in (mb, dense):
        vae.zero_grad()
        torch.manual_seed(1)
        loss = vae.loss(m, kl_weight=0.5).loss
        loss.backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in vae.named_parameters()}))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for name, g in grads[1][1].items():
        torch.testing.assert_close(grads[0][1][name], g, rtol=1e-4, atol=1e-5, msg=name)
    dense_mb = minibatch_from_csr(counts(), np.zeros(50, dtype=int))  # 20 % non-zero: dense
    assert isinstance(dense_mb.h_ng, torch.Tensor)
