"""--out replaces only a censusvi artifact of its kind, never an input; a killed swap is repaired."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from censusvi.artifacts import OutputRefused, artifact_kind
from censusvi.atomic import atomic_directory, recover, write_atomic
from censusvi.cli import main
from conftest import simulated_adata

DEAD_PID = 4_194_305  # above the largest pid_max Linux allows: no such process can run
DE_CSV = "gene,gene_id,lfc_mean,comparison,group1,group2\nA,ENSG1,0.5,a vs b,a,b\n"


def pretrain_args(src, out, *extra: str) -> list[str]:
    return [
        "pretrain", "--source", str(src), "--batch-keys", "batch", "--n-hvg", "0",
        "--max-epochs", "1", "--n-hidden", "16", "--n-latent", "4", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "x.h5ad"
    simulated_adata(n_cells=120, n_genes=40).write_h5ad(path)
    return path


def test_out_holding_the_source_is_refused_even_with_overwrite(src, capsys):
    before = src.read_bytes()
    code, err = run_cli(pretrain_args(src, src.parent), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "holds the input" in err and str(src) in err and "choose another --out" in err
    code, err = run_cli(pretrain_args(src, src.parent, "--overwrite"), capsys)
    assert code == 2 and "holds the input" in err
    code, err = run_cli(pretrain_args(src, src, "--overwrite"), capsys)
    assert code == 2 and f"--out {src} is the input" in err
    assert src.read_bytes() == before
    assert sorted(p.name for p in src.parent.iterdir()) == ["x.h5ad"]


def test_out_holding_the_current_directory_is_refused(src, tmp_path, capsys, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    code, err = run_cli(pretrain_args(src, tmp_path / "a", "--overwrite"), capsys)
    assert code == 2 and "holds the current directory" in err


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_unrelated_out_needs_overwrite(src, tmp_path, capsys, kind):
    out = tmp_path / "notes"
    if kind == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "a.txt").write_text("mine")
    code, err = run_cli(pretrain_args(src, out), capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--overwrite" in err and "choose another --out" in err
    found = (
        "a file of 8 bytes censusvi did not write"
        if kind == "file"
        else "a directory holding a.txt"
    )
    assert found in err
    assert (out.read_text() if kind == "file" else (out / "a.txt").read_text()) in (
        "my notes",
        "mine",
    )
    assert not out.with_name("notes.checkpoint").exists()
    # A model folder never deletes a user's file or folder, even with --overwrite (a data file
    # passed as --out by mistake was replaced by the model).
    code, err = run_cli(pretrain_args(src, out, "--overwrite"), capsys)
    says = (
        "a folder output never replaces a file"
        if kind == "file"
        else ("a model folder replaces only what censusvi wrote")
    )
    assert code == 2 and f"{found}; {says}" in err, err
    assert (out.read_text() if kind == "file" else (out / "a.txt").read_text()) in (
        "my notes",
        "mine",
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_previous_model_is_replaced_without_overwrite_and_other_kinds_are_not(
    src, tmp_path, capsys
):
    out = tmp_path / "m"
    assert run_cli(pretrain_args(src, out), capsys)[0] == 0
    first = (out / "weights.safetensors").read_bytes()
    assert run_cli(pretrain_args(src, out, "--seed", "1"), capsys)[0] == 0
    assert (out / "weights.safetensors").read_bytes() != first
    # a model is not an .h5ad, nor an index: embed and index refuse to replace it
    code, err = run_cli(["embed", "--model", out, "--data", src, "--out", out], capsys)
    assert code == 2 and f"--out {out} is the input {out}" in err
    other = tmp_path / "m2"
    assert run_cli(pretrain_args(src, other), capsys)[0] == 0
    code, err = run_cli(["embed", "--model", out, "--data", src, "--out", other], capsys)
    assert (
        code == 2 and "is a censusvi model directory; a file output never replaces a folder" in err
    )
    # an .h5ad censusvi wrote is replaced by the next embed
    emb = tmp_path / "e.h5ad"
    assert run_cli(["embed", "--model", out, "--data", src, "--out", emb], capsys)[0] == 0
    assert artifact_kind(emb) == ".h5ad"
    assert run_cli(["embed", "--model", other, "--data", src, "--out", emb], capsys)[0] == 0


def test_model_dir_with_extra_files_is_not_censusvis(src, tmp_path, capsys):
    out = tmp_path / "m"
    assert run_cli(pretrain_args(src, out), capsys)[0] == 0
    (out / "results.txt").write_text("keep me")
    code, err = run_cli(pretrain_args(src, out), capsys)
    assert code == 2 and "a directory holding config.json, results.txt, weights.safetensors" in err
    assert (out / "results.txt").read_text() == "keep me"


def test_killed_between_renames_restores_the_old_output(tmp_path):
    old = tmp_path / f".m.old-{DEAD_PID}"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "censusvi-model"}))
    (old / "weights.safetensors").write_bytes(b"old weights")
    half = tmp_path / f".m.tmp-{DEAD_PID}-0a1b2c3d"
    half.mkdir()
    (half / "config.json").write_text("{")
    recover(tmp_path / "m")
    assert (tmp_path / "m" / "weights.safetensors").read_bytes() == b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_killed_after_renames_removes_the_old_copy(tmp_path):
    (tmp_path / "r.csv").write_text(DE_CSV)
    (tmp_path / f".r.csv.old-{DEAD_PID}").write_text("older")
    (tmp_path / f".r.csv.tmp-{os.getpid()}-00ff.csv").write_text("a write of this process")
    write_atomic(tmp_path / "r.csv", lambda p: p.write_text(DE_CSV + "x"), ".csv")
    assert (tmp_path / "r.csv").read_text() == DE_CSV + "x"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".r.csv.tmp-{os.getpid()}-00ff.csv", "r.csv"]  # a live process's: kept


def test_restored_foreign_output_is_still_refused(src, tmp_path, capsys):
    """A kill while --overwrite replaced notes/: the next run puts notes/ back, then asks."""
    old = tmp_path / f".notes.old-{DEAD_PID}"
    old.mkdir()
    (old / "a.txt").write_text("mine")
    code, err = run_cli(pretrain_args(src, tmp_path / "notes"), capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine" and not old.exists()


KILL_BETWEEN_RENAMES = """
import os, sys
from censusvi import atomic
renames = []
def rename(a, b):
    renames.append(a)
    if len(renames) == 2:  # the new output's: the old one is already aside
        os._exit(9)
    os.replace(a, b)
atomic.os.rename = rename
atomic.write_atomic(sys.argv[1], lambda p: p.write_text(sys.argv[2]), ".csv")
"""


def test_real_kill_between_renames_loses_nothing(tmp_path):
    out = tmp_path / "r.csv"
    write_atomic(out, lambda p: p.write_text(DE_CSV), ".csv")
    kill = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out), DE_CSV + "new"])
    assert kill.returncode == 9
    assert not out.exists() and len(list(tmp_path.glob(".r.csv.old-*"))) == 1
    write_atomic(out, lambda p: p.write_text(DE_CSV + "next"), ".csv")  # the next run
    assert out.read_text() == DE_CSV + "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]
    kill = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out), "x"])
    assert kill.returncode == 9 and not out.exists()
    recover(out)  # or a run that fails: the old output is back either way
    assert out.read_text() == DE_CSV + "next"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_have_the_umasks_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "ix", "index") as tmp:
            (tmp / "index.json").write_text(json.dumps({"kind": "flat", "label_keys": []}))
        write_atomic(tmp_path / "r.csv", lambda p: p.write_text(DE_CSV), ".csv")
    finally:
        os.umask(previous)
    assert (tmp_path / "ix").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "ix" / "index.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_pretrained_model_has_normal_permissions(src, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        assert run_cli(pretrain_args(src, tmp_path / "m"), capsys)[0] == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == {0o644}


def test_library_writers_refuse_too(tmp_path):
    (tmp_path / "page.html").write_text("<html>someone's page</html>")
    with pytest.raises(OutputRefused, match=r"page.html exists and is a file of 27 bytes"):
        write_atomic(tmp_path / "page.html", lambda p: p.write_text("x"), ".html")
    with pytest.raises(
        OutputRefused, match="a scvi-tools folder replaces only what censusvi wrote"
    ):
        with atomic_directory(tmp_path, "scvi-tools"):
            pass
    with atomic_directory(tmp_path / "export", "scvi-tools") as tmp:
        (tmp / "model.pt").write_bytes(b"weights")
    assert artifact_kind(tmp_path / "export") == "scvi-tools"
    (tmp_path / "empty").mkdir()
    with atomic_directory(tmp_path / "empty", "scvi-tools") as tmp:  # nothing to lose
        (tmp / "model.pt").write_bytes(b"weights")
