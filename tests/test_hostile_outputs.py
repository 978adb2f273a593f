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


def embed_args(model, data, out) -> list:
    return ["embed", "--model", model, "--data", data, "--out", out]


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
    assert code == 2 and "never replaces a folder, even with --overwrite" in err, err
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
    for beside in (tmp_path, tmp_path / "new"):  # a folder holding the inputs is fine
        code, err = run([*base, "--png-dir", beside], capsys)
        assert code == 2 and "--png-dir" not in err and "m.h5ad" in err, err  # the empty file


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--n-samples", "99999999999999"], "from 2 to 100,000 posterior draws"),
        (["--fdr", "2"], "fdr=2.0: a target false discovery rate in (0, 1)"),
        (["--delta", "nan"], "delta=nan: a log fold-change threshold >= 0"),
        (["--group2", "A"], "group 'A' is both group1 and group2"),
        (["--train", "--max-epochs", "0"], "max_epochs=0: surgery needs at least 1 epoch"),
    ],
)
def test_de_options_out_of_range(sim_model, query, tmp_path, capsys, extra, says):
    q = ad.read_h5ad(query)
    q.obs["group"] = ["A", "B"] * (q.n_obs // 2)
    q.write_h5ad(tmp_path / "q.h5ad")
    args = ["de", "--model", sim_model, "--data", tmp_path / "q.h5ad", "--groupby", "group",
            "--group1", "A", "--batch-key", "batch", "--quiet", "--out", tmp_path / "de.csv"]  # fmt: skip
    code, err = run([*args, *extra], capsys)
    assert code == 2 and says in err, err
    assert not (tmp_path / "de.csv").exists()


def test_de_takes_a_group_whose_name_has_a_comma_whole(sim_model, query, tmp_path, capsys):
    """Cell Ontology labels have commas ("CD4-positive, alpha-beta T cell"): such a group could
    not be chosen, as --group1 split it in two. A name the data hold is now taken whole; A,B
    still means each in turn."""
    import pandas as pd

    q = ad.read_h5ad(query)
    q.obs["group"] = ["CD4-positive, alpha-beta T cell", "B cell", "NK"] * (q.n_obs // 3)
    q.write_h5ad(tmp_path / "q.h5ad")
    args = ["de", "--model", sim_model, "--data", tmp_path / "q.h5ad", "--groupby", "group",
            "--batch-key", "batch", "--quiet", "--n-samples", "50", "--out"]  # fmt: skip
    for group1, expected in [
        ("CD4-positive, alpha-beta T cell", {"CD4-positive, alpha-beta T cell"}),
        ("B cell,NK", {"B cell", "NK"}),
    ]:
        out = tmp_path / f"de{len(expected)}.csv"
        code, err = run([*args, out, "--group1", group1], capsys)
        assert code == 0, err
        assert set(pd.read_csv(out)["group1"]) == expected


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--library-size", "nan"], "library_size=nan: counts per this many, a number in"),
        (["--library-size", "0"], "library_size=0.0"),
        (
            ["--library-size", "1e308"],
            "library_size=1e+308: counts per this many, a number in [1e-06, 1e+09]",
        ),
        (["--library-size", "1e-320"], "library_size=1e-320: counts per this many"),  # all 0.0
        (["--genes", ""], "no genes to impute"),
    ],
)
def test_impute_options_out_of_range(sim_model, query, tmp_path, capsys, extra, says):
    from censusvi.model.io import load_model

    gene = load_model(sim_model).genes.ids[0]
    args = ["impute", "--model", sim_model, "--query", query, "--batch-key", "batch", "--genes",
            gene, "--quiet", "--out", tmp_path / "i.h5ad"]  # fmt: skip
    code, err = run([*args, *extra], capsys)
    assert code == 2 and says in err, err
    assert not (tmp_path / "i.h5ad").exists()


def test_report_scib_and_per_type_are_checked(tmp_path, capsys):
    from censusvi.report.build import build_report

    (tmp_path / "list.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="is not a table"):
        build_report(
            tmp_path / "m.h5ad", tmp_path, tmp_path / "r.html", scib=tmp_path / "list.json"
        )
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not JSON"):
        build_report(tmp_path / "m.h5ad", tmp_path, tmp_path / "r.html", scib=tmp_path / "bin.json")
    with pytest.raises(ValueError, match="per_type=0: reference cells drawn per label"):
        build_report(tmp_path / "m.h5ad", tmp_path, tmp_path / "r.html", per_type=0)
    assert not (tmp_path / "r.html").exists()


def test_ingest_refuses_repeated_genes_cells_and_files(tmp_path, capsys):
    """ingest used to keep the first of two columns of one gene id (the other's counts lost):
    now one line, as every other reader of gene names; so are repeated cell names and two
    files of one name (a file's name is its dataset_id); no experiment is left."""
    a = simulated_adata(n_cells=40)
    ids = a.var["gene_ids"].astype(str).to_numpy().copy()
    ids[1] = ids[0]
    b = a.copy()
    b.var["gene_ids"] = ids
    b.write_h5ad(tmp_path / "genes.h5ad")
    code, err = run(["ingest", tmp_path / "genes.h5ad", "--out", tmp_path / "x.soma"], capsys)
    assert code == 2 and ids[0] in err and "2 columns" in err, err
    c = a.copy()
    c.obs_names = ["cell"] * c.n_obs
    c.write_h5ad(tmp_path / "cells.h5ad")
    code, err = run(["ingest", tmp_path / "cells.h5ad", "--out", tmp_path / "x.soma"], capsys)
    assert code == 2 and "cell names repeat" in err, err
    (tmp_path / "d").mkdir()
    a.write_h5ad(tmp_path / "ok.h5ad")
    a.write_h5ad(tmp_path / "d" / "ok.h5ad")
    args = [
        "ingest",
        tmp_path / "ok.h5ad",
        tmp_path / "d" / "ok.h5ad",
        "--out",
        tmp_path / "x.soma",
    ]
    code, err = run(args, capsys)
    assert code == 2 and "files named ['ok'] are given more than once" in err, err
    assert not (tmp_path / "x.soma").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.soma")]


def test_ingest_reads_counts_from_the_layer_its_error_names(tmp_path, capsys):
    """ingest told a user with log-normalised X to "pass --layer counts", a flag it lacked; it
    now has it, and the experiment holds the layer's counts."""
    import numpy as np
    import tiledbsoma

    a = simulated_adata(n_cells=40)
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray() / 7.0)
    a.write_h5ad(tmp_path / "lognorm.h5ad")
    args = ["ingest", tmp_path / "lognorm.h5ad", "--quiet", "--out"]
    code, err = run([*args, tmp_path / "x.soma"], capsys)
    assert code == 2 and "pass --layer counts" in err, err
    code, err = run([*args, tmp_path / "x.soma", "--layer", "counts"], capsys)
    assert code == 0, err
    with tiledbsoma.Experiment.open(str(tmp_path / "x.soma")) as exp:
        x = exp.ms["RNA"].X["raw"].read().tables().concat()
    assert float(np.sum(x["soma_data"])) == float(a.layers["counts"].sum())
    code, err = run([*args, tmp_path / "y.soma", "--layer", "spliced"], capsys)
    assert code == 2 and "layer 'spliced' not in the file; it has layers ['counts']" in err, err


def test_index_and_finetune_read_counts_from_a_layer(sim_model, tmp_path, capsys):
    """index and finetune (whose errors, too, said "pass --layer counts") take --layer."""
    import numpy as np

    a = simulated_adata(n_cells=120, seed=2)
    a.obs["cell_type"] = np.where(np.arange(a.n_obs) % 2, "T cell", "B cell")
    a.layers["counts"] = a.X.copy()
    a.X = np.log1p(a.X.toarray() / 7.0)
    a.write_h5ad(tmp_path / "ref.h5ad")
    base = {
        "index": ["index", "--model", sim_model, "--data", tmp_path / "ref.h5ad", "--label-keys",
                  "cell_type", "--no-head", "--quiet"],
        "finetune": ["finetune", "--model", sim_model, "--data", tmp_path / "ref.h5ad",
                     "--labels-key", "cell_type", "--max-epochs", "1", "--quiet"],
    }  # fmt: skip
    for name, args in base.items():
        code, err = run([*args, "--out", tmp_path / f"{name}1"], capsys)
        assert code == 2 and "pass --layer counts" in err, err
        code, err = run([*args, "--out", tmp_path / f"{name}2", "--layer", "counts"], capsys)
        assert code == 0, err
        assert (tmp_path / f"{name}2").is_dir() and not (tmp_path / f"{name}1").exists()


def test_embed_names_the_model_batch_column_the_data_lack(sim_model, query, tmp_path, capsys):
    """embed told the user to "choose --batch-keys", a flag it lacks: the model's batch is
    fixed, so it now says which column to add."""
    q = ad.read_h5ad(query)
    del q.obs["batch"]
    q.write_h5ad(tmp_path / "q.h5ad")
    code, err = run(
        [*embed_args(sim_model, tmp_path / "q.h5ad", tmp_path / "e.h5ad"), "--quiet"], capsys
    )
    assert code == 2 and "obs lacks ['batch'], which the model's batch is built from" in err, err
    assert "--batch-keys" not in err


def test_an_uns_value_anndata_cannot_write_back_is_refused_before_work(sim_model, tmp_path, capsys):
    """Raw pickle bytes in uns (read back as a numpy void, never unpickled) used to fail the
    write after all the work; now one line naming the entry, before any."""
    import h5py
    import numpy as np

    q = simulated_adata(n_cells=30, seed=2)
    q.write_h5ad(tmp_path / "q.h5ad")
    with h5py.File(tmp_path / "q.h5ad", "a") as f:
        f["uns"].create_dataset("blob", data=np.void(b"\x80\x04\x95pickle"))
    code, err = run(embed_args(sim_model, tmp_path / "q.h5ad", tmp_path / "o.h5ad"), capsys)
    assert code == 2 and "uns['blob'] holds a value anndata cannot write back" in err, err
    assert not (tmp_path / "o.h5ad").exists()
