"""``censusvi pretrain``: source -> HVG vocabulary -> batch categories -> train/val split -> fit -> save.

Everything a later reader of the model directory needs (genes, batch categories, source, filter,
cell counts, epochs, code version) goes into its config.json. The settings live in
``censusvi.train.run_config`` and the plan in ``censusvi.train.plan``; both are importable from
here too, as they always were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from censusvi.data.cells import Cells
from censusvi.data.source import CellSource
from censusvi.model.device import check_local_device
from censusvi.model.io import TrainedModel, save_model
from censusvi.model.minibatch import DeviceCSR, Minibatch, minibatch_from_csr
from censusvi.train import schedule
from censusvi.train.checkpoint import CheckpointStore
from censusvi.train.loop import EpochStats, History, TrainConfig, fit
from censusvi.train.plan import RunPlan, plan_from, warn_if_undertrained  # noqa: F401
from censusvi.train.run_config import (  # noqa: F401  (the public names of this module)
    DataConfig,
    ModelSettings,
    PretrainConfig,
    load_pretrain_config,
    pretrain_config_from,
)

log = logging.getLogger(__name__)


class RunBatches:
    """A run's minibatches of ``Cells`` on ``t.device``. In-memory cells with ``t.device_cache``
    (None: on for a GPU) are held on the device once and cut there; others are read per
    minibatch. ``pretrain`` and each Ray worker's in-memory shard draw from it."""

    def __init__(self, t: TrainConfig, with_counts: bool) -> None:
        self.batch_size, self.device, self.with_counts = t.batch_size, t.device, with_counts
        self.cache = (
            t.device_cache if t.device_cache is not None else torch.device(t.device).type != "cpu"
        )
        self._held: dict[int, DeviceCSR] = {}

    def __call__(self, cells: Cells, shuffle: bool, seed: int) -> Iterator[Minibatch]:
        if self.cache and cells.preload:
            if id(cells) not in self._held:
                self._held[id(cells)] = DeviceCSR(*cells.non_empty_matrix(), self.device)
            yield from self._held[id(cells)].minibatches(
                self.batch_size, shuffle, seed, with_counts=self.with_counts
            )
            return
        for _, x, c in cells.minibatches(self.batch_size, shuffle=shuffle, seed=seed):
            yield minibatch_from_csr(x, c, self.device, with_counts=self.with_counts)


def pretrain(
    cfg: PretrainConfig,
    out: str | os.PathLike | None,
    quiet: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    source: CellSource | None = None,
    on_epoch_end: Sequence[Callable[[EpochStats], None]] = (),
) -> tuple[TrainedModel, History]:
    """Train and save to ``out`` (None: keep the model in memory only, without checkpoints);
    ``source`` as in ``plan_from``; ``on_epoch_end(stats)`` after each epoch's checkpoint."""
    from tqdm.auto import tqdm

    check_local_device(cfg.train.device)
    plan = plan_from(cfg, source=source)
    t = plan.cfg.train
    log.info("training schedule %s", schedule.describe(plan.schedule_record()))
    train_cells = plan.cells(plan.train_rows)
    val_cells = plan.cells(plan.val_rows) if len(plan.val_rows) else None
    vae = plan.new_vae(train_cells).to(t.device)

    batches = RunBatches(t, vae.needs_dense_counts)
    ckpt = (
        CheckpointStore(Path(f"{out}.checkpoint"), plan.fingerprint()) if resume and out else None
    )
    bar = tqdm(total=t.max_epochs, desc="pretrain", unit="epoch", disable=True if quiet else None)

    def progress(s: EpochStats) -> None:
        bar.n = s.epoch + 1
        val = f"{s.val_elbo:.1f}" if s.val_elbo is not None else "-"
        bar.set_postfix_str(f"cells/s={s.cells_per_s:,.0f} loss={s.train_loss:.1f} val_elbo={val}")

    history = fit(
        vae,
        lambda seed: batches(train_cells, True, seed),
        (lambda: batches(val_cells, False, 0)) if val_cells is not None else None,
        t,
        ckpt,
        on_epoch_end=(progress, *on_epoch_end),
    )
    bar.close()
    trained = plan.trained_model(vae, history, warn_if_undertrained(plan, history))
    if out is not None:
        save_model(trained, out, overwrite)
    if ckpt is not None:
        ckpt.remove()
    return trained, history
