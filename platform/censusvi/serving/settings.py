"""What the Serve app is configured with: the ``args`` of a Serve config, as one frozen value."""

from __future__ import annotations

import os
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from censusvi import defaults
from censusvi.numeric import is_finite, is_whole
from censusvi.serving.auth import token_digest
from censusvi.typed import typed

POSITIVE = (  # settings that must be finite numbers above 0
    "max_request_mb",
    "body_idle_s",
    "ingress_memory_mb",
    "registry_poll_s",
    "tick_s",
    "results_ttl_s",
)


def check_transfer(k, unknown_threshold, method: str | None) -> None:
    """Label transfer's options, by the rules of every server (``method.check_served``)."""
    from censusvi.annotate.method import check_served

    check_served(k, unknown_threshold, defaults.CLASS_BALANCE, method)


# Accepted by ``build_app`` beside the fields: per-deployment options, per-deployment Ray actor
# options (merged over the code's) and the token's sources (only its SHA-256 reaches the replicas).
EXTRA_ARGS = ("deployments", "actor_options", "token", "token_file")


@dataclass(frozen=True)
class Settings:
    """What ``build_app`` accepts (the ``args`` of the Serve config)."""

    model: str = "models:/censusvi-scvi@production"  # a models:/ URI or a model directory
    index: str | None = None  # only with a model directory: its index directory
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI
    token_sha256: str | None = (
        None  # of the bearer token (args: token_file or token); None: no auth
    )
    max_cells: int = defaults.SERVE_MAX_CELLS  # per request (413 above)
    max_request_mb: float = 64.0  # per request body (413 above)
    body_idle_s: float = 30.0  # the longest pause while a body arrives (408 after: slot freed)
    ingress_memory_mb: float = 6144.0  # an ingress replica's budget: max ongoing x request memory
    registry_poll_s: float = 10.0  # how often an alias is re-resolved
    tick_s: float = 1.0  # how often replicas and ingresses sync with the version board
    retire_after_s: float = 30.0  # the previous version is kept this long after a switch
    allow_surgery: bool = (
        False  # train new batch columns per request (models that encode the batch)
    )
    k: int = defaults.K
    unknown_threshold: float = defaults.UNKNOWN_THRESHOLD
    method: str | None = None  # when a request names none (?method=); None: resolve_method's
    results_kept: int = 100  # annotations kept for GET /explorer/{id}: at most this many,
    results_max_cells: int = 500_000  # this many cells in all,
    results_ttl_s: float = 3600.0  # and this long

    def __post_init__(self) -> None:
        """A setting out of range fails the deployment with one line (``k: -5`` failed each
        request instead, and ``tick_s: 0`` spun every ingress's sync thread)."""
        for name in ("max_cells", "results_kept", "results_max_cells"):
            if not is_whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(
                    f"serve setting {name}={getattr(self, name)!r}: a whole number >= 1"
                )
        for name in POSITIVE:
            if not is_finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"serve setting {name}={getattr(self, name)!r}: a number > 0")
        if not is_finite(self.retire_after_s) or self.retire_after_s < 0:
            raise ValueError(f"serve setting retire_after_s={self.retire_after_s!r}: seconds >= 0")
        try:
            check_transfer(self.k, self.unknown_threshold, self.method)
        except ValueError as e:
            raise ValueError(f"serve setting {e}") from None

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> Settings:
        """From a Serve config's ``args`` (typed by YAML) or ``serve run``'s ``key=value`` pairs
        (strings, converted to the field's type)."""
        known = {f.name for f in fields(cls)} - {"token_sha256"}
        accepted = known | set(EXTRA_ARGS)
        unknown = sorted(set(args) - accepted)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(accepted)}")
        hints = typing.get_type_hints(cls)
        values = {
            k: typed(f"serve setting {k}", v, hints[k], text=True)
            for k, v in args.items()
            if k in known
        }
        tracking = values.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        digest = token_digest(args.get("token"), args.get("token_file"))
        return cls(**{**values, "tracking_uri": tracking, "token_sha256": digest})

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a deployment's arguments (``Settings(**d)`` rebuilds it)."""
        return asdict(self)

    @property
    def limits(self):
        from censusvi.untrusted import DecodeLimits

        return DecodeLimits.for_body_limit(self.max_cells, int(self.max_request_mb * 2**20))

    @property
    def request_memory_mb(self) -> float:
        """What one request can take in an ingress: its body and what the body decodes to."""
        from censusvi.untrusted import DecodeLimits

        expansion = DecodeLimits.for_body_limit(1, 1).max_decoded_bytes  # x the body limit
        return self.max_request_mb * (1 + expansion)

    @property
    def registered(self) -> bool:
        return self.model.startswith("models:/")

    @property
    def model_name(self) -> str:
        """The registered model's name, or a model directory's own name."""
        if self.registered:
            return self.model.removeprefix("models:/").split("@")[0].split("/")[0]
        return Path(os.path.normpath(self.model)).name

    @property
    def follows_alias(self) -> bool:
        return self.registered and "@" in self.model


def check_servable(s: Settings) -> None:
    """Before any replica starts: a model directory loads, its index loads and holds this model's
    latents (a missing or another model's index made every annotate request a 5xx). A registered
    version was checked when it was registered."""
    if not s.registered:
        _check_local(s.model, s.index)


def _check_local(model_dir: str, index_dir: str | None) -> None:
    """The model loads; the index's index.json is read and checked, not its vectors and labels
    (gigabytes at Census scale: each replica loads them, and refuses a damaged file itself)."""
    from censusvi.model.io import load_model

    model = load_model(model_dir)
    if index_dir is not None:
        from censusvi.annotate.index_checks import check_fits, read_meta

        check_fits(model, read_meta(index_dir), f"the index {index_dir}", model_dir)


def current_version(s: Settings) -> str:
    """The version the model URI names now ("local" for a model directory)."""
    from censusvi.registry.versions import resolve_version

    return resolve_version(s.model, s.tracking_uri) if s.registered else "local"
