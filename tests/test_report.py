"""The mapping report: one self-contained HTML page whose data and numbers are the annotation's."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest

from censusvi.cli import main


def report_data(page: str) -> dict:
    m = re.search(r'<script id="report-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "the page embeds its data"
    return json.loads(m.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def annotated(cellbench_split):
    d = cellbench_split
    assert main(["index", "--model", str(d / "m"), "--data", str(d / "ref.h5ad"),
                 "--label-keys", "cell_type", "--out", str(d / "ix-report")]) == 0  # fmt: skip
    assert main(["annotate", "--model", str(d / "m"), "--index", str(d / "ix-report"),
                 "--query", str(d / "query.h5ad"), "--batch-key", "batch",
                 "--out", str(d / "annotated.h5ad")]) == 0  # fmt: skip
    return d


def test_report_holds_every_query_cell_and_the_evaluation(annotated, tmp_path, capsys):
    d = annotated
    capsys.readouterr()
    assert main(["report", "--mapped", str(d / "annotated.h5ad"), "--reference", str(d / "ix-report"),
                 "--out", str(tmp_path / "report.html"), "--png-dir", str(tmp_path / "png")]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    page = (tmp_path / "report.html").read_text()
    data = report_data(page)
    out = ad.read_h5ad(d / "annotated.h5ad")
    q = data["query"]
    assert len(q["x"]) == len(q["predicted"]) == out.n_obs  # every query cell is drawn
    assert q["predicted"] == out.obs["predicted_cell_type"].astype(str).tolist()
    np.testing.assert_allclose(q["probability"], out.obs["cell_type_probability"], atol=1e-4)
    assert np.isfinite(q["x"]).all() and np.isfinite(q["y"]).all()
    evaluation = out.uns["censusvi"]["evaluation"]["cell_type"]
    shown = data["evaluation"]
    for key in ("accuracy", "macro_f1", "ece", "n_cells_with_reference_label"):
        assert shown[key] == pytest.approx(evaluation[key]), key
    assert sum(map(sum, shown["confusion"]["counts"])) == evaluation["n_cells_with_reference_label"]
    assert (
        sum(b["cells"] for b in shown["calibration"]) == evaluation["n_cells_with_reference_label"]
    )
    assert (
        f"accuracy {evaluation['accuracy']:.3f}" in page
        and printed["accuracy"] == shown["accuracy"]
    )
    assert {r["label"] for r in data["predicted_counts"]} == set(q["predicted"])
    assert set(data["reference"]["label"]) == {"A549", "H1975", "H2228", "H838", "HCC827"}
    assert data["mapping"]["cells_per_batch"] == {"batch": ["sc_dropseq"], "cells": [out.n_obs]}
    # self-contained: nothing is fetched when the file is opened
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    for name in ("umap_predicted", "umap_uncertainty", "umap_batch", "confusion", "calibration"):
        png = tmp_path / "png" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_report_refuses_an_unannotated_file(cellbench_split, annotated, tmp_path, capsys):
    d = cellbench_split
    rc = main(["report", "--mapped", str(d / "query.h5ad"), "--reference", str(d / "ix-report"),
               "--out", str(tmp_path / "r.html")])  # fmt: skip
    assert rc == 2 and "censusvi annotate" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_progress_bars_show_on_a_terminal_only(monkeypatch):
    import sys

    from censusvi import progress

    monkeypatch.setattr(progress, "QUIET", False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not progress.bar(total=3).disable  # an interactive terminal: a bar
    assert progress.bar(total=3, quiet=True).disable  # --quiet
    monkeypatch.setattr(progress, "QUIET", True)
    assert progress.bar(total=3).disable
    monkeypatch.setattr(progress, "QUIET", False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.bar(total=3).disable  # a log file or CI: no bar


def test_scib_table_appears_when_evaluation_ran():
    from censusvi.report.page import render_page

    content = {
        "title": "t", "label_key": "cell_type", "n_query_cells": 1,
        "reference": {"x": [0.0], "y": [0.0], "label": ["A"]},
        "query": {"x": [1.0], "y": [1.0], "predicted": ["A"], "probability": [0.9],
                  "uncertainty": [0.1], "batch": ["b"]},
        "mapping": {}, "qc_nll_per_count": None, "evaluation": None,
        "predicted_counts": [{"label": "A", "cells": 1, "mean_probability": 0.9}],
        "scib": [{"embedding": "X_scvi", "bio_conservation": 0.71, "batch_correction": 0.62},
                 {"embedding": "X_pca", "bio_conservation": 0.55, "batch_correction": 0.40}],
    }  # fmt: skip
    page = render_page(content)
    assert "Integration (scib-metrics)" in page
    assert "<td>X_scvi</td><td>0.710</td><td>0.620</td>" in page
    content["scib"] = None
    assert "scib-metrics" not in render_page(content)
    # An undefined metric (NaN) or a NaN probability: json.dumps wrote NaN, on which the
    # browser's JSON.parse stops, and the page drew nothing.
    content["scib"] = [{"embedding": "X_scvi", "kbet": float("nan"), "ilisi": float("inf")}]
    content["query"]["probability"] = [float("nan")]
    data = render_page(content).split('type="application/json"', 1)[1]
    data = data.split(">", 1)[1].split("</script>", 1)[0]
    assert "NaN" not in data and "Infinity" not in data  # JSON.parse refuses them
    parsed = json.loads(data)
    assert parsed["scib"][0]["kbet"] is None and parsed["query"]["probability"] == [None]


def test_cells_without_a_latent_are_left_out_of_the_report(annotated, tmp_path, caplog):
    """The Python API's annotate keeps cells without counts as NaN rows; the report stopped at
    'Input contains NaN' (UMAP's check). Now they are left out, counted in a warning, and have
    no place (NaN) in the UMAP coordinates written back."""
    from censusvi.report.build import build_report

    d = annotated
    a = ad.read_h5ad(d / "annotated.h5ad")
    latent_key = a.uns["censusvi"].get("latent_key", "X_scvi")
    a.obsm[latent_key][:5] = np.nan
    for c in ("cell_type_probability", "cell_type_uncertainty"):
        a.obs.iloc[:5, a.obs.columns.get_loc(c)] = np.nan
    build_report(a, d / "ix-report", tmp_path / "r.html", umap_key="X_umap")
    q = report_data((tmp_path / "r.html").read_text())["query"]
    assert len(q["x"]) == a.n_obs - 5 and np.isfinite(q["probability"]).all()
    assert "5 cells have no latent (NaN: no counts); left out of the report" in caplog.text
    assert np.isnan(a.obsm["X_umap"][:5]).all() and np.isfinite(a.obsm["X_umap"][5:]).all()
    a.obsm[latent_key][:] = np.nan
    with pytest.raises(ValueError, match="no cell has a latent"):
        build_report(a, d / "ix-report", tmp_path / "r2.html")
    assert not (tmp_path / "r2.html").exists()


def test_odd_uns_entries_and_labels_are_drawn_not_a_traceback(annotated, tmp_path, caplog):
    """An annotated file edited, or written by another tool: uns entries of other types were
    tracebacks; they are left out with a warning. Labels are drawn as given: a '$\\frac{$' batch
    stopped the PNGs after the page was written (a half set), '$5 and $6' was drawn as math, a
    label starting with '_' was left out of the legend."""
    from censusvi.report.build import build_report
    from censusvi.report.figures import _legend_text

    d = annotated
    base = ad.read_h5ad(d / "annotated.h5ad")
    for key, value in [("scib", {"x": 1}), ("scib", "abc"), ("new_batches", 5), ("genes", "x"),
                       ("cells_per_batch", {"batch": 3, "cells": "x"})]:  # fmt: skip
        a = base.copy()
        a.uns["censusvi"][key] = value
        caplog.clear()
        build_report(a, d / "ix-report", tmp_path / "r.html", overwrite=True)
        assert f"entries ['{key}'] are not as annotate writes them" in caplog.text
    from censusvi.report.build import recorded

    caplog.clear()
    assert set(recorded(base)) >= {"latent_key", "batch_key", "genes", "cells_per_batch"}
    assert "not as annotate writes them" not in caplog.text  # annotate's own record is read
    a = base.copy()
    a.uns["censusvi"] = "hello"
    with pytest.raises(ValueError, match="the file records no batch column: pass --batch-key"):
        build_report(a, d / "ix-report", tmp_path / "r.html", overwrite=True)
    a = base.copy()
    batch = np.array(["$\\frac{$", "cost $5 and $6", "__proto__"], dtype=object)
    a.obs["batch"] = batch[np.arange(a.n_obs) % 3]
    build_report(a, d / "ix-report", tmp_path / "m.html", png_dir=tmp_path / "png")
    assert sorted(p.name for p in (tmp_path / "png").iterdir())[-1] == "umap_uncertainty.png"
    assert report_data((tmp_path / "m.html").read_text())["query"]["batch"][:3] == batch.tolist()
    assert _legend_text("_hidden") == " _hidden" and _legend_text("B") == "B"


def test_a_figure_that_fails_leaves_neither_page_nor_pngs(annotated, tmp_path, monkeypatch):
    from censusvi.report import figures
    from censusvi.report.build import build_report

    def fail(content, out):
        (out / "umap_predicted.png").write_bytes(b"half")
        raise RuntimeError("a figure failed")

    monkeypatch.setattr(figures, "_draw", fail)
    with pytest.raises(RuntimeError, match="a figure failed"):
        build_report(annotated / "annotated.h5ad", annotated / "ix-report", tmp_path / "r.html",
                     png_dir=tmp_path / "png")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "mine.html").write_text("a page of the user's")  # not censusvi's: refused first
    with pytest.raises(ValueError, match="mine.html exists and is a file of 20 bytes censusvi"):
        build_report(annotated / "annotated.h5ad", annotated / "ix-report", tmp_path / "mine.html",
                     png_dir=tmp_path / "png")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.html"]


def test_a_latent_of_another_width_or_the_umap_slot_is_refused(annotated, tmp_path):
    """A latent of another width (another model's, a UMAP) was placed on the reference's UMAP
    as if it were this index's; --umap-key naming the latent replaced it with the UMAP."""
    from censusvi.report.build import build_report

    d = annotated
    a = ad.read_h5ad(d / "annotated.h5ad")
    key = a.uns["censusvi"]["latent_key"]
    width = a.obsm[key].shape[1]
    a.obsm["other"] = np.zeros((a.n_obs, width + 3), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"obsm\['other'\] is float32 of shape \({a.n_obs}, "
                       rf"{width + 3}\), but the index's latent has {width} columns"):  # fmt: skip
        build_report(a, d / "ix-report", tmp_path / "r.html", latent_key="other")
    with pytest.raises(ValueError, match=f"--umap-key {key} is the latent the report reads"):
        build_report(a, d / "ix-report", tmp_path / "r.html", umap_key=key)
    assert a.obsm[key].shape[1] == width and list(tmp_path.iterdir()) == []


def test_a_scib_file_is_read_only_if_it_is_a_small_table(tmp_path):
    """--scib /dev/zero was read until memory ran out; a pipe (--scib <(jq ...)) is read."""
    from censusvi.report.build import MAX_SCIB_BYTES, read_scib

    rows = [{"embedding": "X_scvi", "ilisi": 0.3}, {"embedding": "X_pca", "ilisi": 0.1}]
    (tmp_path / "scib.json").write_text(json.dumps(rows))
    assert read_scib(tmp_path / "scib.json") == rows
    for path, says in [("/dev/zero", f"is over {MAX_SCIB_BYTES} bytes"),
                       (tmp_path, "is not a regular file"),
                       (tmp_path / "no.json", "does not exist")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"--scib {path} {says}: give the scib.json"):
            read_scib(path)
    (tmp_path / "big.json").write_bytes(b" " * (MAX_SCIB_BYTES + 1))
    with pytest.raises(ValueError, match=f"is over {MAX_SCIB_BYTES} bytes"):
        read_scib(tmp_path / "big.json")
    import os
    import threading

    os.mkfifo(tmp_path / "pipe")
    writer = threading.Thread(target=(tmp_path / "pipe").write_text, args=(json.dumps(rows),))
    writer.start()
    assert read_scib(tmp_path / "pipe") == rows
    writer.join()
    (tmp_path / "dict.json").write_text('{"x": 1}')
    with pytest.raises(ValueError, match="is not a table"):
        read_scib(tmp_path / "dict.json")
