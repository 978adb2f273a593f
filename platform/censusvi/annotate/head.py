"""A learned label head beside kNN: scANVI's classifier on the frozen reference latent.

One hidden layer of 128 ReLU units (scANVI's classifier), trained with cross-entropy on 90 % of
the reference cells and temperature-scaled on the other 10 % (Guo et al. 2017: one scalar T
minimising the held-out negative log-likelihood), so that a probability of 0.8 is right about 80 %
of the time on reference-like cells. The encoder is not fine-tuned: the head reads the same
latent the index holds. Weights are kept as safetensors in the index directory (no pickle).

Steps: ``max(MIN_STEPS, EPOCHS passes)`` capped at ``MAX_STEPS`` minibatches of ``BATCH`` cells:
1,200 reference cells train 500 steps (~50 passes), 44 M cells 5,000 (~0.1 pass, enough for a
linear-ish boundary in 50 dimensions, and minutes on a GPU). Above ``MAX_STEPS * BATCH`` (1.28 M)
training cells, the steps draw from a random 1.28 M of them (what they could reach anyway), and
the temperature is fitted on a random ``MAX_CALIBRATION_CELLS`` of the calibration cells: a 44 M
cell corpus then needs no standardised copy of its latents, nor 4.4 M x types logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

HIDDEN = 128
BATCH = 256
EPOCHS = 20
MIN_STEPS, MAX_STEPS = 500, 5000
LR, WEIGHT_DECAY = 1e-3, 1e-4
CALIBRATION_FRACTION = 0.1
LOG_T_BOUNDS = (-3.0, 3.0)  # temperatures from 0.05 to 20
MAX_CALIBRATION_CELLS = 200_000  # a temperature (one scalar) and an ECE are settled well before


@dataclass
class LabelHead:
    """A trained head: standardisation, the network and its temperature."""

    classes: np.ndarray  # (C,) the reference labels, in the network's output order
    mean: np.ndarray  # (D,) latent standardisation
    scale: np.ndarray  # (D,)
    net: nn.Sequential
    temperature: float

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        """p(label | cell): (cells x classes), rows summing to 1."""
        x = torch.from_numpy(
            ((np.asarray(z, np.float32) - self.mean) / self.scale).astype(np.float32)
        )
        with torch.no_grad():
            logits = self.net(x) / self.temperature
        return torch.softmax(logits.double(), dim=1).numpy()

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """What ``save_index`` writes to ``heads.safetensors`` (``classes`` go to index.json)."""
        out = {f"{prefix}.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        out[f"{prefix}.mean"] = torch.from_numpy(self.mean.astype(np.float32))
        out[f"{prefix}.scale"] = torch.from_numpy(self.scale.astype(np.float32))
        out[f"{prefix}.temperature"] = torch.tensor([self.temperature], dtype=torch.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, classes) -> LabelHead:
        own = {
            k.removeprefix(f"{prefix}."): v
            for k, v in tensors.items()
            if k.startswith(prefix + ".")
        }
        mean, scale = own.pop("mean").numpy(), own.pop("scale").numpy()
        temperature = float(own.pop("temperature")[0])
        net = _network(len(mean), len(classes))
        net.load_state_dict(own)  # strict: a head of another shape is refused, naming the keys
        return cls(np.asarray(classes, dtype=str), mean, scale, net.eval(), temperature)


def _network(dim: int, n_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_classes))


def calibration_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """The cells (a boolean mask over ``n``) a head is temperature-scaled on and never trained
    on: a random ``CALIBRATION_FRACTION`` (none under 20 cells). ``fit_head(..., seed)`` draws
    them first from ``default_rng(seed)``; the index's out-of-reference fit draws the same
    cells the same way (``annotate.pipeline.fit_novelty``)."""
    calib = np.zeros(n, dtype=bool)
    n_calib = int(round(n * CALIBRATION_FRACTION)) if n >= 20 else 0
    calib[rng.choice(n, n_calib, replace=False)] = True
    return calib


def fit_head(z: np.ndarray, labels, seed: int = 0) -> tuple[LabelHead, dict]:
    """Train a head on latents ``z`` with ``labels`` (one per row); returns it and its held-out
    calibration (``ece_before``/``ece_after`` temperature scaling, ``temperature``, cells)."""
    from censusvi.annotate.transfer import expected_calibration_error

    labels = np.asarray(labels).astype(str)
    classes, y = np.unique(labels, return_inverse=True)
    rng = np.random.default_rng(seed)
    calib = calibration_rows(len(z), rng)
    train = _at_most(np.flatnonzero(~calib), MAX_STEPS * BATCH, rng)
    held = _at_most(np.flatnonzero(calib), MAX_CALIBRATION_CELLS, rng)
    z_train = z[train]
    mean = z_train.mean(0).astype(np.float32)
    scale = (z_train.std(0) + 1e-6).astype(np.float32)

    def standard(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((z[rows] - mean) / scale).astype(np.float32))

    target = torch.from_numpy(y.astype(np.int64))
    torch.manual_seed(seed)
    net = _network(z.shape[1], len(classes))
    _train(net, standard(train), target[train], rng)
    net.eval()
    head = LabelHead(classes, mean, scale, net, 1.0)
    info = {"n_train_cells": len(train), "n_calibration_cells": len(held)}
    if len(held):
        with torch.no_grad():
            logits = net(standard(held)).double()
        head.temperature = _temperature(logits, target[held])
        for name, t in (("ece_before", 1.0), ("ece_after", head.temperature)):
            p = torch.softmax(logits / t, 1).numpy()
            correct = p.argmax(1) == y[held]
            info[name] = round(expected_calibration_error(p.max(1), correct), 4)
    info["temperature"] = round(head.temperature, 4)
    return head, info


def _at_most(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``rows``, or a sorted random ``n`` of them where there are more (no draw otherwise)."""
    return rows if len(rows) <= n else np.sort(rng.choice(rows, n, replace=False))


def _train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> None:
    n = len(x)
    steps = int(np.clip(EPOCHS * np.ceil(n / BATCH), MIN_STEPS, MAX_STEPS))
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, n, min(BATCH, n)))
        opt.zero_grad()
        loss_fn(net(x[idx]), y[idx]).backward()
        opt.step()


def _temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T in ``LOG_T_BOUNDS`` minimising the negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return float(nn.functional.cross_entropy(logits / np.exp(log_t), y))

    return float(np.exp(minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded").x))
