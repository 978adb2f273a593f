"""A registered version's files, read from the store: listed, or copied to a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from censusvi.registry.mlflow_store import reaches_registry, use_tracking
from censusvi.registry.uris import parse_model_uri


@reaches_registry
def download_model(
    uri: str, dst: str | os.PathLike | None = None, tracking: str | None = None
) -> Path:
    """A local copy of ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (``/SUBPATH`` for one
    folder of it) from ``tracking`` (default ``tracking_uri()``)."""
    import mlflow

    parse_model_uri(uri)  # its form first: MLflow reads models:/m1 as a logged model's id
    use_tracking(tracking)
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
    )


@reaches_registry
def artifact_names(uri: str, tracking: str | None = None) -> set[str]:
    """The top-level artifact names of ``models:/NAME/VERSION``, without downloading them."""
    import mlflow

    parse_model_uri(uri)
    use_tracking(tracking)
    return {Path(f.path).name for f in mlflow.artifacts.list_artifacts(artifact_uri=uri)}
