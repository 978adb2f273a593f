"""Where a distributed run keeps its checkpoints, and the run's stable name.

A storage location is a URI that pyarrow knows (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///shared/runs``, with pyarrow's query options such as ``?region=`` or
``?endpoint_override=``) or a path on storage every node sees (an NFS mount). It goes to Ray Train
as given: ``RunConfig(storage_path=..., storage_filesystem=...)`` with the pyarrow filesystem the
URI names, never through ``Path.resolve`` (which would turn ``s3://b/x`` into ``./s3:/b/x``).

The run's name comes from its fingerprint (data, genes, batches, every setting but the stopping
rules and the device: ``RunPlan.fingerprint``), so resubmitting the same job finds its own run in
storage and resumes from its last checkpoint, and any change that would make a checkpoint another
run's gives another name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

RUN_PREFIX = "censusvi"


@dataclass(frozen=True)
class StorageTarget:
    """A storage location as Ray Train takes it: ``path`` on ``filesystem`` (None: Ray's local
    filesystem), and ``uri``, the location as the user wrote it (for messages)."""

    uri: str
    path: str
    filesystem: Any = None  # a pyarrow.fs.FileSystem for a URI

    def run_uri(self, name: str) -> str:
        """Where the run ``name`` lives, written as the user wrote the storage (query dropped)."""
        if self.filesystem is None:
            return str(Path(self.path) / name)
        parts = urlsplit(self.uri)
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/{name}"


def storage_target(storage: str) -> StorageTarget:
    """The location ``storage`` (a URI or a path) for ``RunConfig``; a path is made absolute
    (a job's working directory is Ray's copy, not yours)."""
    storage = str(storage).strip()
    if not storage:
        raise ValueError("empty storage location: give a URI (s3://, gs://, file://) or a path")
    if "://" not in storage:
        return StorageTarget(storage, str(Path(storage).expanduser().resolve()))
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise ValueError(
            f"storage {storage!r} is not a location pyarrow can open ({e}); use "
            "s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, file:///ABSOLUTE/PATH or a path on shared storage"
        ) from e
    return StorageTarget(storage, path, filesystem)


def _label(source: str) -> str:
    """A short, path-safe name for the data source: census://2025-11-08 -> census-2025-11-08,
    /data/ref.soma -> ref.soma."""
    parts = urlsplit(source) if "://" in source else None
    if parts is not None and parts.scheme == "census":
        text = f"census-{parts.netloc}{parts.path}"
    else:
        text = Path((parts.path or parts.netloc) if parts else source).name or "source"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:40] or "source"


def run_name_for(fingerprint: dict[str, Any], source: str) -> str:
    """``censusvi-<source>-<12 hex digits of the fingerprint's hash>``: the same for a resubmitted
    job, another for any change a checkpoint would refuse."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return f"{RUN_PREFIX}-{_label(source)}-{digest[:12]}"
