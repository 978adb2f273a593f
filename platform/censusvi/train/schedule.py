"""Training schedules: the Census recipe, scvi-tools' own small-data heuristic, and ``auto``.

Every number of a schedule lives here once; ``TrainConfig`` (train/loop.py) leaves the four a
schedule decides (epochs, batch size, learning rate, KL warm-up) unset, and ``resolve`` fills
them from the schedule for the corpus's cell count. A value set explicitly (a flag, a config key,
a ``TrainConfig`` argument) always wins over the schedule's.

Sources:
- Census: the CZ CELLxGENE Census scVI recipe (cellxgene-census ``tools/models/scvi``,
  ``scvi-config.yaml``): 100 epochs, batch 1,024, lr 1e-4, KL warm-up 20 epochs, train 0.9, no
  early stopping; Adam's weight decay and eps are scvi-tools' TrainingPlan defaults it inherits.
- scvi-tools 1.4.2: ``scvi.model._utils.get_max_epochs_heuristic`` (epochs
  ``min(round(20_000 / n_obs * 400), 400)``, at least 1; n_obs is every cell, before the split),
  ``UnsupervisedTrainingMixin.train`` (batch_size=128, early_stopping=False, train_size None ->
  DataSplitter's 0.9), ``scvi.train.TrainingPlan.__init__`` (Adam, lr=1e-3, weight_decay=1e-6,
  eps=0.01, n_epochs_kl_warmup=400, n_steps_kl_warmup=None, reduce_lr_on_plateau=False) and
  ``scvi.train.Trainer`` (early_stopping_patience=45 when early stopping is on).

``auto`` picks the Census recipe from ``AUTO_CENSUS_MIN_CELLS`` cells on, scvi-tools' below. The
threshold is where the Census recipe takes as many optimiser steps as scvi-tools' rule does: past
20,000 cells scvi-tools plans 400 * 20,000 / n epochs of n * 0.9 / 128 steps, a constant
56,250 steps; the Census plans 100 epochs of n * 0.9 / 1,024 steps, which reaches 56,250 at
n = 1,024 / 128 * 400 * 20,000 / 100 = 640,000 cells. Below that the Census recipe is starved (at
1,200 cells: 200 steps, at a tenth of scvi-tools' learning rate); from there on its big batches
are what keep a GPU busy, and the Census itself (tens of millions of cells) is far above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Shared by both schedules: scvi-tools' TrainingPlan / Trainer defaults (the Census run used them).
WEIGHT_DECAY = 1e-6
ADAM_EPS = 0.01  # large on purpose: a stabler Adam
TRAIN_FRACTION = 0.9
EARLY_STOPPING_PATIENCE = 45

# scvi-tools' epoch rule (get_max_epochs_heuristic's epochs_cap and decay_at_n_obs).
SCVI_EPOCHS_CAP = 400
SCVI_DECAY_AT_N_OBS = 20_000

# The end-of-run checks (``training_warnings``). scvi-tools' own rule never plans fewer than
# 1,200 steps for a corpus of 300 cells or more (400 epochs of 3 minibatches); the starved run
# this guards against (the Census recipe on 1,200 cells) takes 200 (2 an epoch: 1,024 + 56 cells).
MIN_OPTIMIZER_STEPS = 1_000
# "Still falling fast": over the last tenth of the epochs (at least 5) the validation ELBO fell by
# more than 0.05 % an epoch. Measured on the PBMC panel (600 cells, 300 genes, seed 0): the
# default scvi-tools schedule falls 0.97 % over its last 40 epochs (0.024 % an epoch; its KL
# weight is still ramping), 0.027 % an epoch in the 5p rotation reference (770 cells); the starved
# Census run 0.88 % over its last 10 (0.088 % an epoch).
FALLING_WINDOW_FRACTION = 0.1
FALLING_WINDOW_MIN = 5
FALLING_REL_DROP = 0.0005  # per epoch

AUTO = "auto"


@dataclass(frozen=True)
class Schedule:
    """The values a schedule sets; ``max_epochs`` None: scvi-tools' epoch rule on n_cells."""

    name: str
    max_epochs: int | None
    batch_size: int
    lr: float
    n_epochs_kl_warmup: int
    early_stopping: bool = False


CENSUS = Schedule("census", max_epochs=100, batch_size=1024, lr=1e-4, n_epochs_kl_warmup=20)
SCVI_TOOLS = Schedule(
    "scvi-tools", max_epochs=None, batch_size=128, lr=1e-3, n_epochs_kl_warmup=SCVI_EPOCHS_CAP
)
SCHEDULES = {s.name: s for s in (CENSUS, SCVI_TOOLS)}
CHOICES = (AUTO, *SCHEDULES)
# The fields a schedule decides; in TrainConfig they default to None ("the schedule's").
SCHEDULED = ("max_epochs", "batch_size", "lr", "n_epochs_kl_warmup", "early_stopping")

# Where the Census recipe's optimiser steps reach scvi-tools' (see the module docstring).
AUTO_CENSUS_MIN_CELLS = round(
    CENSUS.batch_size
    / SCVI_TOOLS.batch_size
    * SCVI_EPOCHS_CAP
    * SCVI_DECAY_AT_N_OBS
    / CENSUS.max_epochs
)


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"schedule={name!r}: choose one of {', '.join(CHOICES)}")
    return name


def scvi_tools_max_epochs(n_cells: int) -> int:
    """scvi-tools 1.4.2's ``get_max_epochs_heuristic(n_obs)``."""
    epochs = min(round(SCVI_DECAY_AT_N_OBS / max(n_cells, 1) * SCVI_EPOCHS_CAP), SCVI_EPOCHS_CAP)
    return max(epochs, 1)


def pick(name: str, n_cells: int) -> Schedule:
    """The schedule ``name`` (``auto``: by ``n_cells``, the cells that pass the filter)."""
    if check_name(name) == AUTO:
        return CENSUS if n_cells >= AUTO_CENSUS_MIN_CELLS else SCVI_TOOLS
    return SCHEDULES[name]


def why(name: str, n_cells: int) -> str:
    """One phrase: why ``pick(name, n_cells)`` is what it is."""
    if name != AUTO:
        return f"asked for; {n_cells:,} cells"
    side = ">=" if n_cells >= AUTO_CENSUS_MIN_CELLS else "<"
    return f"auto: {n_cells:,} cells {side} {AUTO_CENSUS_MIN_CELLS:,}"


def schedule_values(schedule: Schedule, n_cells: int) -> dict[str, int | float | bool]:
    """The values of ``SCHEDULED`` that ``schedule`` sets for a corpus of ``n_cells``."""
    epochs = schedule.max_epochs or scvi_tools_max_epochs(n_cells)
    return {
        "max_epochs": epochs,
        "batch_size": schedule.batch_size,
        "lr": schedule.lr,
        "n_epochs_kl_warmup": schedule.n_epochs_kl_warmup,
        "early_stopping": schedule.early_stopping,
    }


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (the minibatch loader drops a last batch of < 3 cells)."""
    full, rest = divmod(n_train, batch_size)
    return full + (1 if rest >= 3 else 0)


def optimizer_steps(n_train: int, batch_size: int, max_epochs: int) -> int:
    return steps_per_epoch(n_train, batch_size) * max_epochs


def falling_fast(val_elbos: Sequence[float]) -> float | None:
    """The relative fall an epoch of the validation ELBO (a loss: lower is better) over the run's
    last ``FALLING_WINDOW_FRACTION`` of epochs, when it exceeds ``FALLING_REL_DROP``; else None."""
    vals = [v for v in val_elbos if v is not None and math.isfinite(v)]
    window = max(FALLING_WINDOW_MIN, math.ceil(len(vals) * FALLING_WINDOW_FRACTION))
    if len(vals) <= window:
        return None
    before, last = vals[-window - 1], vals[-1]
    drop = (before - last) / abs(last) / window if last else 0.0
    return drop if drop > FALLING_REL_DROP else None


def training_warnings(n_steps: int, val_elbos: Sequence[float], schedule_name: str) -> list[str]:
    """What to tell a user at the end of a run that looks under-trained (empty: nothing)."""
    advice = (
        "more --max-epochs, or --schedule scvi-tools (smaller batches, lr 1e-3)"
        if schedule_name != SCVI_TOOLS.name
        else "more --max-epochs"
    )
    out = []
    if n_steps < MIN_OPTIMIZER_STEPS:
        out.append(
            f"only {n_steps:,} optimiser steps (fewer than {MIN_OPTIMIZER_STEPS:,}): the model is "
            f"likely under-trained; use {advice}"
        )
    drop = falling_fast(val_elbos)
    if drop is not None:
        window = max(FALLING_WINDOW_MIN, math.ceil(len(val_elbos) * FALLING_WINDOW_FRACTION))
        out.append(
            f"the validation ELBO was still falling fast ({drop:.2%} an epoch over the last "
            f"{window} epochs, more than {FALLING_REL_DROP:.2%}): training had not converged; "
            f"use {advice}"
        )
    return out


def record(
    requested: str,
    n_cells: int,
    n_train: int,
    values: dict,
    explicit: Sequence[str] = (),
    workers: int = 1,
) -> dict:
    """What a model directory keeps about its schedule (``values``: the resolved ``SCHEDULED``
    settings); ``workers`` data-parallel ranks each step on their shard of the training cells."""
    per_rank = n_train // max(workers, 1)
    return {
        "name": pick(requested, n_cells).name,
        "requested": requested,
        "why": why(requested, n_cells),
        "n_cells": n_cells,
        **{k: values[k] for k in SCHEDULED},
        "optimizer_steps": optimizer_steps(per_rank, values["batch_size"], values["max_epochs"]),
        "explicit": list(explicit),
    }


def describe(rec: dict | None) -> str:
    """One line for a log or ``censusvi info`` (``rec``: ``record``'s dict; None: unknown)."""
    if not rec:
        return "unknown (the model predates the schedule record)"
    over = f"; set explicitly: {', '.join(rec['explicit'])}" if rec.get("explicit") else ""
    epochs, warmup = rec["max_epochs"], rec["n_epochs_kl_warmup"]
    # the KL weight ramps linearly to 1 over the warm-up (loop.kl_weight), epoch 0 at 0
    short = f" (KL weight {(epochs - 1) / warmup:.2f} at the last epoch)" if warmup > epochs else ""
    return (
        f"{rec['name']} ({rec['why']}{over}): {rec['max_epochs']} epochs, batch "
        f"{rec['batch_size']}, lr {rec['lr']:g}, KL warm-up {warmup} epochs{short}, "
        f"{rec['optimizer_steps']:,} optimiser steps"
    )
