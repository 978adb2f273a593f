"""The fused NB loss (row blocks, recomputed mu, the uniform-grad shortcut) against the dense
formula, and the host-memory setting that keeps its buffers from page-faulting."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from censusvi.model import fused_nb
from censusvi.model.config import ModelConfig
from censusvi.model.likelihoods import NonZeros, log_nb_positive
from censusvi.model.minibatch import minibatch_from_csr
from censusvi.model.vae import VAE
from censusvi.train.host_memory import keep_freed_memory
from censusvi.train.loop import TrainConfig, make_optimizer, train_epoch

N, G = 23, 40


def _problem(per_gene: bool):
    rng = np.random.default_rng(3)
    x = rng.negative_binomial(2, 0.3, (N, G)) * (rng.random((N, G)) < 0.3)
    x[5] = 0  # a cell with no non-zero in the list: its rows still get the dense terms
    rows, cols = np.nonzero(x)
    nz = NonZeros(
        torch.from_numpy(rows).long(),
        torch.from_numpy(cols).long(),
        torch.tensor(x[rows, cols], dtype=torch.float64),
    )
    logits = torch.tensor(rng.normal(0, 2, (N, G)), requires_grad=True)
    log_lib = torch.tensor(rng.uniform(3, 8, (N, 1)), requires_grad=True)
    shape = (G,) if per_gene else (N, G)
    theta = torch.tensor(rng.gamma(2.0, 1.0, shape), requires_grad=True)
    return torch.tensor(x, dtype=torch.float64), nz, logits, log_lib, theta


@pytest.mark.parametrize("per_gene", [True, False])
@pytest.mark.parametrize("uniform_grad", [True, False])
@pytest.mark.parametrize("block_rows", [1, 4, N])
def test_fused_nb_equals_dense_formula(monkeypatch, per_gene, uniform_grad, block_rows):
    """Value and every gradient equal autograd over scvi-tools' formula, whatever the blocks
    (uneven last block included) and whether or not each cell's gradient is the same."""
    monkeypatch.setattr(fused_nb, "ROW_BLOCK_BYTES", 4 * G * block_rows)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert fused_nb.row_block(N, G, torch.device("cpu")) == block_rows
    x, nz, logits, log_lib, theta = _problem(per_gene)
    weights = torch.full((N,), 1.0 / N) if uniform_grad else torch.linspace(0.1, 2.0, N)
    weights = weights.double()

    def value_and_grads(fused: bool):
        for t in (logits, log_lib, theta):
            t.grad = None
        if fused:
            nll = fused_nb.nb_nll_from_logits(logits, log_lib, theta, nz)
        else:
            mu = torch.softmax(logits, -1) * torch.exp(log_lib)
            nll = -log_nb_positive(x, mu, theta).sum(-1)
        (nll * weights).sum().backward()
        return nll.detach(), [t.grad.clone() for t in (logits, log_lib, theta)]

    nll_f, grads_f = value_and_grads(True)
    nll_d, grads_d = value_and_grads(False)
    torch.testing.assert_close(nll_f, nll_d, rtol=1e-12, atol=1e-9)
    for name, gf, gd in zip(["logits", "log_library", "theta"], grads_f, grads_d):
        torch.testing.assert_close(gf, gd, rtol=1e-9, atol=1e-10, msg=name)


def test_cpu_training_steps_do_not_page_fault():
    """A Census-sized step (1,024 cells x 8,000 genes) frees and re-allocates ~33 MB buffers; with
    glibc's defaults each step page-faulted ~44,000 times (a quarter of its time in the kernel).
    ``train_epoch`` keeps freed memory in the process, so after the first steps none are left."""
    rng = np.random.default_rng(0)
    x = sp.random(1024, 8000, density=0.05, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    torch.manual_seed(0)
    vae = VAE(ModelConfig(n_genes=8000, n_batches=4))
    opt = make_optimizer(vae, TrainConfig(max_epochs=1, batch_size=1024).resolved(1024))
    mb = minibatch_from_csr(x, rng.integers(0, 4, (1024, 1)))
    train_epoch(vae, opt, [mb] * 2, 1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_epoch(vae, opt, [mb] * 2, 1.0)
    per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
    assert keep_freed_memory()  # glibc Linux, as on the CI and in the Docker image
    # the count is the whole process's: in the suite, threads of the session's Ray driver add
    # their own (4,300 once under load, against ~44,000 per step without the fix)
    assert per_step < 8000, f"{per_step:.0f} page faults per training step"
