"""A minibatch as the model consumes it, built from a CSR block of counts.

Counts stay CSR (scipy) through reading, gene selection and shuffling; only here do they become a
dense tensor for the encoder (dense matmul beats torch's sparse kernels on CPU at 10 % density)
plus the non-zero list the sparse likelihood needs. On a GPU the CSR arrays are moved and
densified on the device, which moves ~10x fewer bytes than a dense host tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from censusvi.model.likelihoods import NonZeros


@dataclass(frozen=True)
class Minibatch:
    """Counts of n cells: dense ``x_ng``, its non-zeros (for the sparse loss) and covariate codes.

    ``covariates_nc[:, 0]`` is the batch code; further columns are extra categorical covariates.
    """

    x_ng: torch.Tensor
    covariates_nc: torch.Tensor
    nz: NonZeros | None = None

    @property
    def n_cells(self) -> int:
        return self.x_ng.shape[0]


def minibatch_from_csr(
    x: sp.csr_matrix,
    covariates_nc: np.ndarray,
    device: torch.device | str = "cpu",
    with_nonzeros: bool = True,
) -> Minibatch:
    """Tensors for one minibatch; ``covariates_nc`` is an (n, c) integer array of codes."""
    device = torch.device(device)
    indptr = torch.from_numpy(x.indptr.astype(np.int64)).to(device, non_blocking=True)
    col = torch.from_numpy(x.indices.astype(np.int64)).to(device, non_blocking=True)
    val = torch.from_numpy(x.data.astype(np.float32, copy=False)).to(device, non_blocking=True)
    if device.type == "cpu":
        x_ng = torch.from_numpy(x.toarray())
    else:
        x_ng = torch.sparse_csr_tensor(indptr, col, val, size=x.shape).to_dense()
    cov = torch.from_numpy(np.asarray(covariates_nc, dtype=np.int64).reshape(x.shape[0], -1))
    nz = None
    if with_nonzeros:
        counts = indptr[1:] - indptr[:-1]
        row = torch.repeat_interleave(torch.arange(x.shape[0], device=device), counts)
        nz = NonZeros(row=row, col=col, value=val)
    return Minibatch(x_ng=x_ng, covariates_nc=cov.to(device), nz=nz)
