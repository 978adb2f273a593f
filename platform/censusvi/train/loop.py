"""The training loop: Adam as scvi-tools sets it up, KL warm-up, validation ELBO, early stopping,
a NaN guard, per-epoch checkpoints that a rerun resumes from.

``run_epochs`` is the one epoch runner: ``fit`` calls it in this process, and every Ray worker
(``censusvi.train.ray_trainer``) calls it on its shard with a DDP-wrapped model and a sum over
ranks. Randomness is derived from (seed, epoch, rank) by ``epoch_seeds`` alone, so a resumed run
continues exactly as the uninterrupted one would have, and rank 0 draws what one process draws.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import torch

from censusvi.model.minibatch import Minibatch
from censusvi.model.vae import VAE
from censusvi.train.checkpoint import CheckpointStore
from censusvi.train.host_memory import keep_freed_memory
from censusvi.train.schedule import (
    ADAM_EPS,
    AUTO,
    EARLY_STOPPING_PATIENCE,
    SCHEDULED,
    TRAIN_FRACTION,
    WEIGHT_DECAY,
    schedule_values,
)
from censusvi.train.schedule import check_name as check_schedule
from censusvi.train.schedule import pick as pick_schedule
from censusvi.typed import check_ranges

log = logging.getLogger(__name__)


PRECISIONS = ("auto", "bf16", "fp32")
# the fields whose ranges ``typed.RANGES`` holds (those in ``SCHEDULED`` may be None: unset)
TRAIN_RANGES = ("max_epochs", "batch_size", "lr", "weight_decay", "adam_eps", "min_delta",
                "patience", "n_epochs_kl_warmup")  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. The five a schedule decides (epochs, batch size, lr, KL warm-up, early
    stopping) default to None, "the schedule's": ``resolved(n_cells)`` fills them from
    ``schedule`` (``censusvi.train.schedule``: auto, census or scvi-tools); given ones win."""

    max_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = WEIGHT_DECAY
    adam_eps: float = ADAM_EPS
    n_epochs_kl_warmup: int | None = None
    train_fraction: float = TRAIN_FRACTION
    early_stopping: bool | None = None
    patience: int = EARLY_STOPPING_PATIENCE
    min_delta: float = 0.0
    seed: int = 0
    device: str = "cpu"
    device_cache: bool | None = None
    """Hold in-memory counts on the device and cut minibatches there (None: on for a GPU)."""
    precision: str = "auto"
    """"bf16": layers under bf16 autocast, likelihood and optimiser in fp32; "fp32"; "auto":
    bf16 on a GPU (tensor cores), fp32 on a CPU (no gain there)."""
    schedule: str = AUTO
    """auto (by the corpus's cell count), census or scvi-tools: ``censusvi.train.schedule``."""

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction={self.train_fraction} must be in (0, 1]")
        check_ranges(self, TRAIN_RANGES, unset=SCHEDULED)

    def explicit(self) -> tuple[str, ...]:
        """The schedule-decided fields set here (they win over the schedule)."""
        return tuple(k for k in SCHEDULED if getattr(self, k) is not None)

    def resolved(self, n_cells: int) -> TrainConfig:
        """Every schedule-decided field set: the given ones kept, the others the values of the
        schedule ``self.schedule`` picks for a corpus of ``n_cells`` cells."""
        values = schedule_values(pick_schedule(self.schedule, n_cells), n_cells)
        return replace(self, **{k: values[k] for k in SCHEDULED if getattr(self, k) is None})

    def check_resolved(self) -> None:
        unset = [k for k in SCHEDULED if getattr(self, k) is None]
        if unset:
            raise ValueError(
                f"TrainConfig {unset} unset: call .resolved(n_cells) to take the schedule's values"
            )


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for the forward pass (None: plain fp32)."""
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


class EpochSeeds(NamedTuple):
    torch: int  # torch's global generator at the epoch's start (dropout, latent samples)
    shuffle: int  # the order of the epoch's minibatches (``train_batches``' argument)


def epoch_seeds(seed: int, epoch: int, rank: int = 0) -> EpochSeeds:
    """The seeds of ``epoch`` on ``rank``, the one place they are derived; rank 0's are the
    single-process run's. The large primes keep nearby seeds' runs apart, and the rank offsets
    keep ranks apart for runs of fewer than 1,009 epochs (the schedules plan at most 400)."""
    return EpochSeeds(seed * 100_003 + epoch + rank * 1009, seed * 1_000_003 + epoch + rank * 7919)


def kl_weight(epoch: int, n_epochs_kl_warmup: int) -> float:
    """Linear warm-up from 0 at epoch 0 to 1 at ``n_epochs_kl_warmup`` (scvi-tools' schedule)."""
    if n_epochs_kl_warmup <= 0:
        return 1.0
    return min(1.0, epoch / n_epochs_kl_warmup)


def make_optimizer(vae: VAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with scvi-tools' settings, fused: one kernel for the whole update (CPU and GPU)
    instead of a dozen per-tensor passes; the same update to float rounding."""
    params = [p for p in vae.parameters() if p.requires_grad]
    return torch.optim.Adam(
        params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=bool(params)
    )


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    val_elbo: float | None
    cells_per_s: float
    kl_weight: float
    val_reconstruction: float | None = None  # the two parts of val_elbo, per cell
    val_kl: float | None = None


def train_epoch(
    vae: VAE,
    opt: torch.optim.Optimizer,
    batches: Iterable[Minibatch],
    kl_w: float,
    on_step: Callable[[int, float], None] | None = None,
    after_step: Callable[[], None] | None = None,
    freeze_batchnorm: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[float, int]:
    """One pass; returns (cell-weighted mean loss, cells seen).

    ``after_step`` runs after every optimiser step and ``freeze_batchnorm`` keeps batch-norm
    statistics fixed: query mapping uses both to leave the reference untouched. ``autocast``:
    the forward pass's reduced precision (weights, gradients and Adam stay fp32).
    """
    device_type = next(vae.parameters()).device.type
    if device_type == "cpu":
        keep_freed_memory()  # no page faults on each step's (n, g) buffers
    vae.train()
    if freeze_batchnorm:
        for m in vae.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
    total, n = None, 0
    for mb in batches:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=bool(autocast)):
            out = vae(mb, kl_w)  # forward: works for a DDP-wrapped model too
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        # Summed on the device: a .item() per step would stall a GPU pipeline on every batch.
        step_total = out.loss.detach() * mb.n_cells
        total = step_total if total is None else total + step_total
        n += mb.n_cells
        if on_step is not None:
            on_step(mb.n_cells, out.loss.item())
    if total is None:
        raise ValueError(
            "no training cells: every cell has zero counts over the model's genes (or none passed "
            "the filter); check that X holds raw counts and that the filter keeps cells"
        )
    return total.item() / n, n


@dataclass(frozen=True)
class ValidationTerms:
    """Per-cell means on held-out cells: -ELBO and its reconstruction and KL parts."""

    elbo: float
    reconstruction: float
    kl: float
    n_cells: int


@torch.no_grad()
def validation_terms(vae: VAE, batches: Iterable[Minibatch]) -> ValidationTerms:
    """Reconstruction + full-weight KL per cell: scvi-tools' ``elbo_validation`` and its parts."""
    vae.eval()
    rec, kl, n = torch.zeros(()), torch.zeros(()), 0
    for mb in batches:
        out = vae(mb, 1.0)
        rec = rec.to(out.loss.device) + out.reconstruction_n.sum()
        kl = kl.to(out.loss.device) + out.kl_n.sum()
        n += mb.n_cells
    if n == 0:
        return ValidationTerms(float("nan"), float("nan"), float("nan"), 0)
    r, k = rec.item() / n, kl.item() / n
    return ValidationTerms(r + k, r, k, n)


def validation_elbo(vae: VAE, batches: Iterable[Minibatch]) -> float:
    """Negative ELBO per cell on held-out cells (``validation_terms(...).elbo``)."""
    return validation_terms(vae, batches).elbo


@dataclass
class History:
    epochs: list[EpochStats] = field(default_factory=list)
    best_val: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": [asdict(e) for e in self.epochs],
            "best_val": self.best_val,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
        }

    def record(self, stats: EpochStats, cfg: TrainConfig) -> None:
        """Append an epoch; early stopping watches the validation ELBO (else the training loss)."""
        self.epochs.append(stats)
        monitored = stats.val_elbo if stats.val_elbo is not None else stats.train_loss
        if monitored < self.best_val - cfg.min_delta:
            self.best_val, self.bad_epochs = monitored, 0
        else:
            self.bad_epochs += 1
        if cfg.early_stopping and self.bad_epochs >= cfg.patience:
            self.stopped_early = True
            log.info(
                "early stopping at epoch %d: no improvement for %d epochs",
                stats.epoch,
                cfg.patience,
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(
            [EpochStats(**e) for e in d["epochs"]],
            d["best_val"],
            d["bad_epochs"],
            d["stopped_early"],
        )


def resume_from(
    store: CheckpointStore | None, vae: VAE, opt: torch.optim.Optimizer | None
) -> History:
    """The history of the run ``store`` holds, its weights and optimiser state loaded into
    ``vae`` and ``opt`` (a checkpoint of another run is refused); a new History without one."""
    if store is None or not store.exists():
        return History()
    state = store.load(vae, opt)
    try:
        history = History.from_dict(state["history"])
    except (KeyError, TypeError) as e:
        raise store.damaged("state.json", ValueError(f"its history lacks {e}")) from None
    log.info("resuming from %s at epoch %d", store.path, len(history.epochs))
    return history


def save_to(
    store: CheckpointStore,
    vae: VAE,
    opt: torch.optim.Optimizer,
    history: History,
    extra: dict[str, Any] | None = None,
) -> None:
    """The checkpoint ``resume_from`` reads; ``extra``: more JSON state beside the history (the
    Ray run's ``RunRecord``), read back with ``store.read_state()``."""
    store.save(vae, opt, {**(extra or {}), "history": history.to_dict()})


def _local(sums: list[float]) -> list[float]:
    return sums


def run_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train_batches: Callable[[int], Iterable[Minibatch]],
    val_batches: Callable[[], Iterable[Minibatch]] | None,
    cfg: TrainConfig,
    epoch: int,
    rank: int = 0,
    sum_over_ranks: Callable[[list[float]], list[float]] = _local,
) -> EpochStats:
    """One epoch: seeded, trained, validated; the statistics summed over ranks."""
    seeds = epoch_seeds(cfg.seed, epoch, rank)
    torch.manual_seed(seeds.torch)
    kl_w = kl_weight(epoch, cfg.n_epochs_kl_warmup)
    autocast = autocast_dtype(cfg.precision, next(model.parameters()).device)
    t0 = time.perf_counter()
    loss, n = train_epoch(model, opt, train_batches(seeds.shuffle), kl_w, autocast=autocast)
    rate = n / (time.perf_counter() - t0)
    terms = validation_terms(model, val_batches()) if val_batches is not None else None
    v_n = terms.n_cells if terms is not None else 0
    rec_kl = [terms.reconstruction * v_n, terms.kl * v_n] if v_n else [0.0, 0.0]
    loss_sum, n_sum, rate_sum, rec_sum, kl_sum, v_sum = sum_over_ranks(
        [loss * n, n, rate, *rec_kl, v_n]
    )
    rec, kl = (rec_sum / v_sum, kl_sum / v_sum) if v_sum else (None, None)
    val = rec + kl if rec is not None and kl is not None else None
    return EpochStats(epoch, loss_sum / n_sum, val, rate_sum, kl_w, rec, kl)


def run_epochs(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train_batches: Callable[[int], Iterable[Minibatch]],
    val_batches: Callable[[], Iterable[Minibatch]] | None,
    cfg: TrainConfig,
    history: History,
    *,
    rank: int = 0,
    sum_over_ranks: Callable[[list[float]], list[float]] = _local,
    save: Callable[[History], None] | None = None,
    on_epoch_end: Sequence[Callable[[EpochStats], None]] = (),
) -> History:
    """Train from epoch ``len(history.epochs)`` to ``cfg.max_epochs`` or until early stopping.

    ``model``: the VAE, or its DDP wrapper on a Ray worker; ``opt`` steps its parameters.
    ``train_batches(shuffle_seed)``: an epoch's shuffled minibatches (the seed from
    ``epoch_seeds``); ``val_batches()``: the held-out ones. ``sum_over_ranks``: sums each rank's
    list of numbers (an all-reduce), so every rank sees the same statistics and stops, or fails
    the NaN guard, at the same epoch. After each epoch ``save(history)`` writes the checkpoint,
    then each ``on_epoch_end(stats)`` runs (logging, progress; a test injects failures here).
    """
    cfg.check_resolved()
    for epoch in range(len(history.epochs), cfg.max_epochs):
        if history.stopped_early:
            break
        stats = run_epoch(model, opt, train_batches, val_batches, cfg, epoch, rank, sum_over_ranks)
        history.record(stats, cfg)
        if not math.isfinite(stats.train_loss):
            raise FloatingPointError(
                f"training loss became {stats.train_loss} at epoch {epoch}; "
                f"lower the learning rate (lr={cfg.lr})"
            )
        if save is not None:
            save(history)
        for hook in on_epoch_end:
            hook(stats)
    return history


def fit(
    vae: VAE,
    train_batches: Callable[[int], Iterable[Minibatch]],
    val_batches: Callable[[], Iterable[Minibatch]] | None,
    cfg: TrainConfig,
    checkpoint: CheckpointStore | None = None,
    on_epoch_end: Sequence[Callable[[EpochStats], None]] = (),
) -> History:
    """Train ``vae`` in this process (``run_epochs``), resuming from and saving to
    ``checkpoint`` when given."""
    cfg.check_resolved()
    opt = make_optimizer(vae, cfg)
    history = resume_from(checkpoint, vae, opt)
    if len(history.epochs) > cfg.max_epochs:
        log.warning(
            "the checkpoint %s holds %d epochs, more than max_epochs=%d: the model is that of "
            "epoch %d (delete the checkpoint, or pass --no-resume, to train %d)",
            checkpoint.path, len(history.epochs), cfg.max_epochs, len(history.epochs),
            cfg.max_epochs,
        )  # fmt: skip
    save = (lambda h: save_to(checkpoint, vae, opt, h)) if checkpoint is not None else None
    return run_epochs(
        vae, opt, train_batches, val_batches, cfg, history, save=save, on_epoch_end=on_epoch_end
    )
