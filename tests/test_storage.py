"""Storage locations for Ray Train runs and the run's stable name (no Ray needed)."""

from __future__ import annotations

import pytest

from censusvi.train.run_record import RunRecord
from censusvi.train.storage import run_name_for, storage_target


@pytest.mark.parametrize(
    ("uri", "fs_type", "path", "run_uri"),
    [
        ("s3://bucket/runs?region=us-east-1", "S3FileSystem", "bucket/runs", "s3://bucket/runs/r"),
        ("gs://bucket/deep/runs/", "GcsFileSystem", "bucket/deep/runs", "gs://bucket/deep/runs/r"),
        (
            "file:///mnt/shared/runs",
            "LocalFileSystem",
            "/mnt/shared/runs",
            "file:///mnt/shared/runs/r",
        ),
    ],
)
def test_uris_keep_their_filesystem(uri, fs_type, path, run_uri):
    """A URI reaches Ray Train as pyarrow's filesystem and stripped path, not as a local path."""
    target = storage_target(uri)
    assert type(target.filesystem).__name__ == fs_type
    assert target.path.rstrip("/") == path and target.uri == uri
    assert target.run_uri("r") == run_uri


def test_a_plain_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = storage_target("runs")
    assert target.filesystem is None and target.path == str(tmp_path / "runs")
    assert target.run_uri("r") == str(tmp_path / "runs" / "r")


def test_a_bad_uri_is_one_clear_error():
    with pytest.raises(
        ValueError, match=r"storage 'nosuch://x/y' is not a location pyarrow can open"
    ):
        storage_target("nosuch://x/y")
    with pytest.raises(ValueError, match="empty storage location"):
        storage_target(" ")


def test_run_name_is_stable_and_follows_the_fingerprint():
    fp = {"config": {"train": {"lr": 1e-3}}, "data": {"uri": "census://2025-11-08"}, "genes": ["a"]}
    name = run_name_for(fp, "census://2025-11-08")
    assert name == run_name_for(dict(reversed(fp.items())), "census://2025-11-08")  # key order
    assert name.startswith("censusvi-census-2025-11-08-") and len(name.rsplit("-", 1)[1]) == 12
    other = run_name_for({**fp, "genes": ["b"]}, "census://2025-11-08")
    assert other != name
    assert run_name_for(fp, "/data/my ref.soma").startswith("censusvi-my-ref.soma-")


def test_run_record_tells_restarts_from_resubmissions():
    start = RunRecord.at_start(None, "s1")
    assert start.counts() == {"restarts_from_checkpoint": 0, "resubmissions": 0}
    restarted = RunRecord.at_start({**start.to_dict(), "mlflow_run_id": "abc"}, "s1")
    assert restarted.counts()["restarts_from_checkpoint"] == 1 and restarted.mlflow_run_id == "abc"
    resubmitted = RunRecord.at_start(restarted.to_dict(), "s2")
    assert resubmitted.submission == "s2" and resubmitted.counts() == {
        "restarts_from_checkpoint": 1,
        "resubmissions": 1,
    }
