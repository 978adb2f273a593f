"""``python -m censusvi.demo --out X`` replaces X only when it is the demo's own output.

The demo itself takes minutes; these tests stop it at its first ``censusvi`` step (faked), or
before, at the refusal.
"""

from __future__ import annotations

import json

import pytest

from censusvi import demo
from censusvi.artifacts import MARKER, artifact_kind


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.h5ad").write_bytes(b"")  # only listed: a refusal comes before any read
    return d


def demo_output(path):
    """What a demo run leaves (a killed embed's temporary included)."""
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"kind": "demo"}))
    for d in ("reference.soma", "model"):
        (path / d).mkdir()
    for f in ("a.census.h5ad", "a.embedded.h5ad", "demo_metrics.json", ".b.embedded.h5ad.tmp-1-ab"):
        (path / f).write_text("x")
    return path


def test_a_folder_the_demo_did_not_write_is_refused_and_kept(tmp_path, data, capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert demo.main(["--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("censusvi.demo: error: ")
    assert f"{out} exists and is a directory holding thesis.tex" in err and "--overwrite" in err
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]  # no marker written either


@pytest.mark.parametrize(
    "foreign",
    [
        "notes.txt",  # beside the demo's files: the folder is no longer only the demo's
        MARKER,  # a marker naming another kind
    ],
)
def test_a_demo_folder_holding_something_else_is_refused(tmp_path, data, capsys, foreign):
    out = demo_output(tmp_path / "demo_out")
    if foreign == MARKER:
        (out / MARKER).write_text(json.dumps({"kind": "scvi-tools"}))
    else:
        (out / foreign).write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    assert artifact_kind(out) is None
    assert demo.main(["--data", str(data), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_file_is_refused(tmp_path, data, capsys):
    out = tmp_path / "results.csv"
    out.write_text("a,b\n1,2\n")
    assert demo.main(["--data", str(data), "--out", str(out)]) == 2
    assert "a file of 8 bytes censusvi did not write" in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"


def test_the_current_directory_and_the_data_are_refused_even_with_overwrite(
    tmp_path, data, monkeypatch, capsys
):
    here = tmp_path / "work" / "sub"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    argv = ["--data", str(data), "--overwrite", "--out"]
    assert demo.main([*argv, str(tmp_path / "work")]) == 2  # holds the current directory
    assert "holds the current directory" in capsys.readouterr().err
    assert demo.main([*argv, str(data)]) == 2
    assert f"is the input {data}" in capsys.readouterr().err
    assert here.is_dir() and (data / "a.h5ad").is_file()


def stop_at_first_step(monkeypatch):
    """A fake ``censusvi``: the first step fails, so the demo stops right after making --out."""
    calls = []
    monkeypatch.setattr(demo, "cli", lambda args: calls.append(args) or 1)
    return calls


def test_an_earlier_demo_output_is_replaced(tmp_path, data, monkeypatch):
    out = demo_output(tmp_path / "demo_out")
    assert artifact_kind(out) == "demo"
    calls = stop_at_first_step(monkeypatch)
    with pytest.raises(SystemExit, match="censusvi ingest failed"):
        demo.main(["--data", str(data), "--out", str(out)])
    assert calls[0][0] == "ingest"
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # the old run's files are gone
    assert artifact_kind(out) == "demo"  # a run killed now is still the demo's to replace


def test_overwrite_never_deletes_a_folder_censusvi_did_not_write(tmp_path, data, capsys):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert demo.main(["--data", str(data), "--out", str(out), "--overwrite"]) == 2
    assert "replaces only what censusvi wrote" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "x"
