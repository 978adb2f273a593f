"""Minibatches: the host (scipy) and device-resident (DeviceCSR) builders give the same tensors."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from censusvi.model.minibatch import DeviceCSR, minibatch_from_csr


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
