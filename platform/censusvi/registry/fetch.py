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


def load_version(uri: str, faiss_device: str | None = None):
    """(TrainedModel, LabelIndex) of the version ``uri`` names (an alias resolved once, for
    both), read from a scratch copy; a version registered without an index is one line."""
    import tempfile

    from censusvi.annotate.index import load_index
    from censusvi.model.io import load_model
    from censusvi.registry.versions import fetch_version, resolve_version

    name, version = parse_model_uri(uri)[0], resolve_version(uri)
    with tempfile.TemporaryDirectory(prefix="censusvi-") as tmp:
        files = fetch_version(name, version, tmp)
        if files.index_dir is None:
            raise ValueError(
                f"{uri} (version {version}) has no index: pass index=, or register one "
                "(`censusvi models register MODEL_DIR --index INDEX_DIR`)"
            )
        return load_model(files.model_dir), load_index(files.index_dir, faiss_device)
