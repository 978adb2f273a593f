"""What a distributed run remembers across restarts and resubmissions, and its live tracker.

``RunRecord`` travels in every checkpoint (``save_to(..., extra={"run": ...})``): the MLflow run
the metrics go to, and how often the run resumed from a checkpoint, told apart by who wrote the
checkpoint. A checkpoint written by this submission means the worker group was restarted after a
failure (``restarts_from_checkpoint``); one written by an earlier submission means the job was
resubmitted and found its run in storage (``resubmissions``). A resume is counted from the next
checkpoint on (and in the tracker's tags at once).

``RunTracker`` is the interface the Ray workers log through (rank 0 only); the MLflow one is
``censusvi.registry.mlflow_store.MlflowTracker``. train/ never imports the registry: the job
builds the tracker and hands it to ``pretrain_distributed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from censusvi.train.loop import EpochStats


@dataclass(frozen=True)
class RunRecord:
    submission: str  # the pretrain_distributed call that wrote the checkpoint
    mlflow_run_id: str | None = None
    restarts_from_checkpoint: int = 0  # worker-group restarts after a failure, all submissions
    resubmissions: int = 0  # submissions that resumed from a checkpoint in storage

    def resumed_by(self, submission: str) -> RunRecord:
        """This record after ``submission`` resumed from the checkpoint holding it."""
        if submission == self.submission:
            return replace(self, restarts_from_checkpoint=self.restarts_from_checkpoint + 1)
        return replace(self, submission=submission, resubmissions=self.resubmissions + 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunRecord:
        return cls(**{k: d[k] for k in ("submission", *RECORD_FIELDS) if k in d})

    @classmethod
    def at_start(cls, checkpoint_run: dict[str, Any] | None, submission: str) -> RunRecord:
        """The record of a worker group starting: new, or the checkpoint's after a resume."""
        if checkpoint_run is None:
            return cls(submission)
        return cls.from_dict(checkpoint_run).resumed_by(submission)

    def counts(self) -> dict[str, int]:
        return {
            "restarts_from_checkpoint": self.restarts_from_checkpoint,
            "resubmissions": self.resubmissions,
        }


RECORD_FIELDS = ("mlflow_run_id", "restarts_from_checkpoint", "resubmissions")


class RunTracker(Protocol):
    """Live tracking from rank 0. Best effort by contract: a store that cannot be reached is a
    warning (``open`` returns None, ``log_epoch`` does nothing), never a stopped run; the
    registration step logs what the tracker missed."""

    def open(
        self, run_id: str | None, params: dict[str, Any], record: RunRecord, epoch: int
    ) -> str | None:
        """Continue ``run_id`` (None: start a run); log the ``params`` it lacks and ``record``'s
        counts (tags, and metrics at step ``epoch``); the run's id, None when unreachable."""
        ...

    def log_epoch(self, run_id: str, stats: EpochStats) -> None: ...
