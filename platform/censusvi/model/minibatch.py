"""A minibatch as the model consumes it, built from a CSR block of counts.

Counts stay CSR (scipy) through reading, gene selection and shuffling; only here do they become
dense tensors: ``h_ng = log1p(x)`` for the encoder (dense matmul beats torch's sparse kernels on CPU
at 10 % density), the log library size, and the non-zero list the sparse likelihood needs. Dense
raw counts are built only for likelihoods evaluated densely (ZINB, the reference path). On a GPU
the CSR arrays are moved and densified on the device: ~10x fewer bytes than a dense host tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from censusvi.model.likelihoods import NonZeros


@dataclass(frozen=True)
class Minibatch:
    """n cells: encoder input, log library, covariate codes; non-zeros and/or dense counts.

    ``covariates_nc[:, 0]`` is the batch code; further columns are extra categorical covariates.
    """

    h_ng: torch.Tensor  # log1p(counts), dense
    log_library_n1: torch.Tensor  # log of total counts per cell (observed library size)
    covariates_nc: torch.Tensor
    nz: NonZeros | None = None
    x_ng: torch.Tensor | None = None  # dense raw counts, only when a dense likelihood needs them

    @property
    def n_cells(self) -> int:
        return self.h_ng.shape[0]

    @classmethod
    def from_dense(cls, x_ng: torch.Tensor, covariates_nc: torch.Tensor) -> Minibatch:
        """From dense counts (tests, small inputs): no non-zero list, dense likelihood path."""
        return cls(
            torch.log1p(x_ng), torch.log(x_ng.sum(1, keepdim=True)), covariates_nc, None, x_ng
        )


def _dense(indptr, col, val, shape, device: torch.device) -> torch.Tensor:
    return torch.sparse_csr_tensor(indptr, col, val, size=shape, device=device).to_dense()


def minibatch_from_csr(
    x: sp.csr_matrix,
    covariates_nc: np.ndarray,
    device: torch.device | str = "cpu",
    with_nonzeros: bool = True,
    with_counts: bool = False,
) -> Minibatch:
    """Tensors for one minibatch; ``covariates_nc`` is an (n, c) integer array of codes."""
    device = torch.device(device)
    n = x.shape[0]
    values = x.data.astype(np.float32, copy=False)
    log_values = np.log1p(values)
    library = np.add.reduceat(np.append(values, 0), x.indptr[:-1]) if x.nnz else np.zeros(n)
    library[np.diff(x.indptr) == 0] = 0.0  # reduceat returns the next value for empty rows
    log_lib = torch.from_numpy(np.log(library).astype(np.float32).reshape(n, 1)).to(device)
    cov = torch.from_numpy(np.asarray(covariates_nc, dtype=np.int64).reshape(n, -1)).to(device)
    col = torch.from_numpy(x.indices.astype(np.int64)).to(device)
    val = torch.from_numpy(values).to(device)
    if device.type == "cpu":
        h_ng = torch.from_numpy(
            sp.csr_matrix((log_values, x.indices, x.indptr), shape=x.shape).toarray()
        )
        x_ng = torch.from_numpy(x.toarray()) if with_counts else None
        row = torch.from_numpy(np.repeat(np.arange(n, dtype=np.int64), np.diff(x.indptr)))
    else:
        indptr = torch.from_numpy(x.indptr.astype(np.int64)).to(device)
        h_ng = _dense(indptr, col, torch.from_numpy(log_values).to(device), x.shape, device)
        x_ng = _dense(indptr, col, val, x.shape, device) if with_counts else None
        row = torch.repeat_interleave(torch.arange(n, device=device), indptr[1:] - indptr[:-1])
    nz = NonZeros(row=row, col=col, value=val) if with_nonzeros else None
    return Minibatch(h_ng, log_lib, cov, nz, x_ng)
