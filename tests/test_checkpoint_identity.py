"""A checkpoint is resumed only on the data it was written from: a changed source is refused."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

import censusvi.train.checkpoint as ckpt_mod
from censusvi.cli import main
from censusvi.train.checkpoint import source_identity
from conftest import simulated_adata


def pretrain_args(src, out) -> list[str]:
    return [
        "pretrain", "--source", str(src), "--batch-keys", "batch", "--n-hvg", "0",
        "--max-epochs", "1", "--n-hidden", "16", "--n-latent", "4", "--quiet", "--out", str(out),
    ]  # fmt: skip


@pytest.fixture
def kept_checkpoint(tmp_path, monkeypatch, capsys):
    """A finished run whose checkpoint was not removed, as after a kill before the model."""
    src = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120, n_genes=40).write_h5ad(src)
    monkeypatch.setattr(ckpt_mod.CheckpointStore, "remove", lambda self: None)
    assert main(pretrain_args(src, tmp_path / "m")) == 0
    capsys.readouterr()
    assert (tmp_path / "m.checkpoint" / "state.json").is_file()
    return src


def test_rewritten_source_is_refused(kept_checkpoint, tmp_path, capsys):
    src = kept_checkpoint
    size = src.stat().st_size
    a = simulated_adata(n_cells=120, n_genes=40, seed=1)  # same cells, genes, batches
    a.obs["note"] = "x"
    a.write_h5ad(src)
    assert main(pretrain_args(src, tmp_path / "m")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"the source {src.resolve()} changed since checkpoint {tmp_path / 'm.checkpoint'}" in err
    assert f"size {size} -> {src.stat().st_size}" in err and "modified 20" in err
    assert f"delete {tmp_path / 'm.checkpoint'} to start over (or pass --no-resume" in err


def test_touched_source_is_refused_naming_the_time(kept_checkpoint, tmp_path, capsys):
    src = kept_checkpoint
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert main(pretrain_args(src, tmp_path / "m")) == 2
    err = capsys.readouterr().err
    assert "changed since checkpoint" in err and "(modified " in err and "size" not in err


def test_unchanged_source_resumes(kept_checkpoint, tmp_path, capsys):
    assert main(pretrain_args(kept_checkpoint, tmp_path / "m")) == 0


class Payload:
    """Unpickled, it would run a shell command (``torch.load`` without weights_only did)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_damaged_checkpoint_is_one_line_naming_the_file(kept_checkpoint, tmp_path, capsys):
    """An interrupted copy or a full disk damages a file of MODEL.checkpoint/; the rerun that
    resumes from it ended in a traceback from safetensors, json or torch."""
    import pickle
    import shutil

    ck = tmp_path / "m.checkpoint"
    shutil.copytree(ck, tmp_path / "good")
    marker = tmp_path / "pwned"
    cases = [
        ("state.json", b"[]"), ("state.json", b'{"fingerprint": '), ("state.json", b"\xff\xfe"),
        ("weights.safetensors", b"[]"), ("optimizer.pt", b"[]"),
        ("optimizer.pt", pickle.dumps(Payload(marker))),
    ]  # fmt: skip
    for name, damage in cases:
        shutil.rmtree(ck)
        shutil.copytree(tmp_path / "good", ck)
        (ck / name).write_bytes(damage)
        assert main(pretrain_args(kept_checkpoint, tmp_path / "m")) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"checkpoint {ck} is damaged ({name}: " in err, err
        assert f"delete {ck} to start over" in err and not marker.exists()
    state = (tmp_path / "good" / "state.json").read_text().replace('"history"', '"h"')
    (ck / "state.json").write_text(state)
    (ck / "optimizer.pt").write_bytes((tmp_path / "good" / "optimizer.pt").read_bytes())
    assert main(pretrain_args(kept_checkpoint, tmp_path / "m")) == 2
    assert "is damaged (state.json: " in capsys.readouterr().err


class FakeSoma:
    """The parts of a SomaSource that identify it."""

    def __init__(self, uri: str, joinids: np.ndarray) -> None:
        self.uri, self._ids = uri, joinids
        self.obs = pd.DataFrame({"soma_joinid": joinids})

    def joinids(self, rows: np.ndarray) -> np.ndarray:
        return self._ids[rows]


def test_soma_identity_is_the_uri_and_the_cells():
    a = source_identity(FakeSoma("census://2025-01-30", np.arange(10)))
    assert set(a) == {"uri", "cells_sha1"} and a["uri"] == "census://2025-01-30"
    assert source_identity(FakeSoma("census://2025-01-30", np.arange(10))) == a
    assert (
        source_identity(FakeSoma("census://2025-01-30", np.arange(1, 11)))["cells_sha1"]
        != (a["cells_sha1"])
    )
    assert source_identity(FakeSoma("census://2024-07-01", np.arange(10)))["uri"] != a["uri"]


def test_a_checkpoint_past_max_epochs_says_so(kept_checkpoint, tmp_path, caplog):
    """Rerun with fewer --max-epochs than the checkpoint holds: the model is the checkpoint's,
    and the log says so rather than a silent model trained longer than asked."""
    import json
    import logging

    args = pretrain_args(kept_checkpoint, tmp_path / "m")
    at = args.index("--max-epochs") + 1
    assert main([*args[:at], "2", *args[at + 1 :]]) == 0  # the checkpoint now holds 2 epochs
    with caplog.at_level(logging.WARNING, logger="censusvi.train.loop"):
        assert main(args) == 0  # --max-epochs 1
    assert "holds 2 epochs, more than max_epochs=1: the model is that of epoch 2" in caplog.text
    assert json.loads((tmp_path / "m" / "config.json").read_text())["provenance"]["epochs"] == 2
