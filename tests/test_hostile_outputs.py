"""What a careless or hostile user found (session 16): outputs that replaced or wrote into an
input, a file output that deleted a folder, batch names that broke the .h5ad written after all
the work. Each is one error line (exit 2) before any work, or now simply works."""

from __future__ import annotations

import anndata as ad
import pytest

from censusvi.cli import main
from conftest import simulated_adata


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def query(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_out")
    q = simulated_adata(n_cells=60, seed=1)
    q.obs["batch"] = ["x", "x/y", "", "a\nb", "ünï/../z", " "] * 10
    q.write_h5ad(d / "q.h5ad")
    return d / "q.h5ad"


def map_args(model, query, out, *extra) -> list:
    return ["map", "--model", model, "--query", query, "--batch-key", "batch", "--max-epochs",
            "2", "--quiet", "--out", out, *extra]  # fmt: skip


def test_any_batch_name_is_written_and_read_back(sim_model, query, tmp_path, capsys):
    """Batch names are values, not HDF5 keys: '', ' ', 'a/b', a newline all round-trip."""
    code, err = run(map_args(sim_model, query, tmp_path / "o.h5ad"), capsys)
    assert code == 0, err
    report = ad.read_h5ad(tmp_path / "o.h5ad").uns["censusvi"]["cells_per_batch"]
    got = dict(zip(map(str, report["batch"]), map(int, report["cells"])))
    assert got == {"x": 10, "x/y": 10, "": 10, "a\nb": 10, "ünï/../z": 10, " ": 10}


@pytest.mark.parametrize("where", ["model", "model/sub"])
def test_the_mapped_model_never_replaces_or_enters_the_input_model(
    sim_model, query, tmp_path, capsys, where
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(sim_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    args = map_args(model, query, tmp_path / "o.h5ad", "--save-model", tmp_path / where)
    code, err = run([*args, "--overwrite"], capsys)
    assert code == 2 and "--save-model" in err and f"the input {model}" in err, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not (tmp_path / "o.h5ad").exists()


def test_a_file_output_never_deletes_a_folder(sim_model, query, tmp_path, capsys):
    victim = tmp_path / "victim.h5ad"
    (victim / "sub").mkdir(parents=True)
    (victim / "thesis.txt").write_text("years of work")
    code, err = run([*map_args(sim_model, query, victim), "--overwrite"], capsys)
    assert code == 2 and "never replaces it, even with --overwrite" in err, err
    assert (victim / "thesis.txt").read_text() == "years of work"


def test_report_extras_stay_out_of_its_inputs(tmp_path, capsys):
    """--png-dir inside an input (or onto a file) and a --umap-key anndata cannot read back are
    refused before any work; nothing is written."""
    ix = tmp_path / "ix"
    ix.mkdir()
    mapped = tmp_path / "m.h5ad"
    mapped.write_bytes(b"")
    base = ["report", "--mapped", mapped, "--reference", ix, "--out", tmp_path / "r.html"]
    code, err = run([*base, "--png-dir", ix / "png"], capsys)
    assert code == 2 and f"--png-dir {ix / 'png'} is inside the input {ix}" in err, err
    (tmp_path / "file").write_text("x")
    code, err = run([*base, "--png-dir", tmp_path / "file"], capsys)
    assert code == 2 and "not a folder" in err, err
    with pytest.raises(SystemExit):
        main([str(a) for a in [*base, "--umap-out", tmp_path / "u.h5ad", "--umap-key", "x/y"]])
    assert "give a non-empty obsm name without '/'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists() and not (ix / "png").exists()
