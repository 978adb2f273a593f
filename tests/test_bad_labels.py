"""Hostile or careless input to the label commands (index, annotate, finetune): one error line
(exit 2) before any work, nothing written; a reference's missing labels are not a cell type."""

from __future__ import annotations

import os
import sys

import anndata as ad
import numpy as np
import pytest

from censusvi.annotate.index import load_index
from censusvi.cli import main
from conftest import simulated_adata


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def files(sim_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    a = simulated_adata()
    rng = np.random.default_rng(0)
    ct = a.obs["cell_type"].astype(str).to_numpy().astype(object)
    ct[rng.random(a.n_obs) < 0.3] = np.nan
    ct[rng.random(a.n_obs) < 0.1] = "unknown"
    a.obs["patchy"] = ct
    a.obs["allnan"] = np.nan
    a.obs["one"] = "T cell"
    a.write_h5ad(d / "ref.h5ad")
    main(["index", "--model", str(sim_model), "--data", str(d / "ref.h5ad"), "--label-keys",
          "cell_type", "--out", str(d / "ix")])  # fmt: skip
    return sim_model, d, a


def annotate_args(files, query, out) -> list[str]:
    model, d, _ = files
    return ["annotate", "--model", str(model), "--index", str(d / "ix"), "--query", str(query),
            "--batch-key", "batch", "--out", str(out)]  # fmt: skip


def index_args(files, keys: str, out) -> list[str]:
    model, d, _ = files
    return ["index", "--model", str(model), "--data", str(d / "ref.h5ad"), "--label-keys", keys,
            "--out", str(out)]  # fmt: skip


def test_unlabelled_reference_cells_are_left_out_of_the_index(files, tmp_path, capsys):
    _, _, a = files
    assert run(index_args(files, "patchy", tmp_path / "ix"), capsys)[0] == 0
    ix = load_index(tmp_path / "ix")
    kept = ix.labels["patchy"].astype(str)
    assert not kept.str.lower().isin(["nan", "unknown", ""]).any()
    labelled = a.obs["patchy"].notna() & (a.obs["patchy"] != "unknown")
    assert len(kept) == ix.meta["n_cells"] == int(labelled.sum())


@pytest.mark.parametrize(
    ("keys", "says"),
    [
        ("allnan", "0 labelled type(s) of 'allnan'"),
        ("one", "1 labelled type(s) of 'one'"),
        ("", "name at least one obs column"),
        ("cell_type,cell_type", "each obs column once"),
    ],
)
def test_an_index_of_no_types_or_no_keys_is_refused(files, tmp_path, capsys, keys, says):
    code, err = run(index_args(files, keys, tmp_path / "ix"), capsys)
    assert code == 2 and says in err and err.startswith("censusvi: error:"), err
    assert not (tmp_path / "ix").exists()


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--k", "0", "k 0: neighbours per cell must be an integer >= 1"),
        ("--class-balance", "nan", "class_balance nan"),
        ("--unknown-threshold", "5", "unknown_threshold 5.0: must be a number from 0 to 1"),
        ("--ontology-threshold", "2", "ontology_threshold 2.0"),
    ],
)
def test_annotate_settings_out_of_range(files, tmp_path, capsys, flag, value, says):
    model, d, _ = files
    args = ["annotate", "--model", str(model), "--index", str(d / "ix"), "--query",
            str(d / "ref.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad"), flag,
            value]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and says in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_outputs_that_cannot_be_written_are_refused_before_work(files, tmp_path, capsys):
    (tmp_path / "afile.h5ad").write_text("not a folder")
    code, err = run(index_args(files, "cell_type", tmp_path / "afile.h5ad" / "ix"), capsys)
    assert code == 2 and "is a file, not a folder" in err, err
    if sys.platform == "linux":  # not even root may create files in /proc
        code, err = run(index_args(files, "cell_type", "/proc/censusvi-ix"), capsys)
        assert code == 2 and "cannot write in /proc" in err, err


def test_a_latent_key_anndata_cannot_read_back_is_refused(files, tmp_path, capsys):
    model, d, _ = files
    args = ["annotate", "--model", str(model), "--index", str(d / "ix"), "--query",
            str(d / "ref.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad"),
            "--latent-key", ""]  # fmt: skip
    with pytest.raises(SystemExit):
        main(args)
    assert "give a non-empty obsm name" in capsys.readouterr().err


def test_finetune_on_a_gpu_this_machine_lacks(files, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    model, d, _ = files
    args = ["finetune", "--model", str(model), "--data", str(d / "ref.h5ad"), "--labels-key",
            "cell_type", "--device", "cuda", "--out", str(tmp_path / "ft")]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and ("sees no CUDA GPU" in err or "has no CUDA build" in err), err
    assert not (tmp_path / "ft").exists()


def _edit_json(d, fn) -> None:
    import json

    meta = json.loads((d / "index.json").read_text())
    (d / "index.json").write_text(json.dumps(fn(meta)))


def _edit_heads(d, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "heads.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "heads.safetensors"))


def _pickle_in(d, name: str) -> None:
    import pickle

    (d / name).write_bytes(pickle.dumps({"not": "an index"}))


def _edit_novelty(meta: dict, field: str, value) -> dict:
    fitted = meta["novelty"]["keys"]["cell_type"]
    if field == "q":
        fitted["signals"]["distance"]["q"] = value
    else:
        fitted[field] = value
    return meta


def _edit_ontology(meta: dict) -> dict:
    label = meta["label_frequency"]["cell_type"]["labels"][0]
    terms = {"version": "x", "label_terms": {label: "CL:1"}, "ancestors": {"CL:1": ["CL:1"]},
             "names": {}, "depth": {}, "flat": []}  # fmt: skip
    return {**meta, "ontology": {"cell_type": terms}}  # a term without a name or a depth


def _names_not_text(meta: dict) -> dict:
    label = meta["label_frequency"]["cell_type"]["labels"][0]
    terms = {"version": "x", "label_terms": {label: "CL:1"}, "ancestors": {"CL:1": ["CL:1"]},
             "names": {"CL:1": ["cell", {"y": 1}]}, "depth": {"CL:1": 0}, "flat": []}  # fmt: skip
    return {**meta, "ontology": {"cell_type": terms}}  # was "setting an array element ..."


TAMPERED = {
    "index.json": lambda d: (d / "index.json").write_text("[1, 2]"),
    "index.json ": lambda d: _edit_json(d, lambda m: {**m, "metric": "manhattan"}),
    "index.json  ": lambda d: _edit_json(
        d,
        lambda m: {
            **m,
            "label_frequency": {
                k: {**v, "shares": [0.0] * len(v["shares"])}
                for k, v in m["label_frequency"].items()
            },
        },
    ),
    "index.json   ": lambda d: _edit_json(d, lambda m: _edit_novelty(m, "q", [1.0, "x"])),
    "index.json    ": lambda d: _edit_json(d, lambda m: _edit_novelty(m, "alpha", 0)),
    "index.json     ": lambda d: _edit_json(d, _edit_ontology),
    "index.faiss": lambda d: _pickle_in(d, "index.faiss"),
    "index.faiss ": lambda d: ((d / "index.faiss").unlink(), os.mkfifo(d / "index.faiss")),
    "labels.parquet": lambda d: (
        __import__("pandas")
        .read_parquet(d / "labels.parquet")
        .iloc[:10]
        .to_parquet(d / "labels.parquet")
    ),
    "labels.parquet ": lambda d: (
        __import__("pandas")
        .read_parquet(d / "labels.parquet")
        .pipe(lambda t: t.assign(cell_type=t.cell_type.where(t.index % 2 == 0, None)))
        .to_parquet(d / "labels.parquet")
    ),
    "index.json      ": lambda d: _edit_json(d, lambda m: {**m, "k_factor": 1e5}),
    "index.json         ": lambda d: _edit_json(d, _names_not_text),
    "index.json       ": lambda d: _edit_json(d, lambda m: {**m, "nprobe": 10**30}),
    "index.json        ": lambda d: (d / "index.json").write_text("[" * 100_000 + "]" * 100_000),
    "heads.safetensors": lambda d: (d / "heads.safetensors").unlink(),
    "heads.safetensors ": lambda d: _pickle_in(d, "heads.safetensors"),
    # heads that loaded and answered one class for every cell (a hostile probe, session 21)
    "heads.safetensors  ": lambda d: _edit_heads(
        d, lambda t: t["cell_type.2.weight"].fill_(float("nan"))
    ),
    "heads.safetensors   ": lambda d: _edit_heads(d, lambda t: t["cell_type.scale"].fill_(0.0)),
    "heads.safetensors    ": lambda d: _edit_heads(
        d, lambda t: t.update({k: v > 0 for k, v in t.items()})
    ),
    "heads.safetensors     ": lambda d: os.truncate(d / "heads.safetensors", 300 * 2**20),
    "heads.safetensors      ": lambda d: _edit_heads(
        d, lambda t: t.update({"cell_type.mean": t["cell_type.mean"].repeat(2, 1)})
    ),
}


@pytest.mark.parametrize("damaged", list(TAMPERED))
def test_a_tampered_index_is_one_line_naming_the_file(files, tmp_path, capsys, damaged):
    import shutil

    model, d, _ = files
    ix = tmp_path / "ix"
    shutil.copytree(d / "ix", ix)
    TAMPERED[damaged](ix)
    args = ["annotate", "--model", str(model), "--index", str(ix), "--query",
            str(d / "ref.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad")]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and f"{ix}/{damaged.strip()}" in err and "rebuild the index" in err, err
    assert not (tmp_path / "o.h5ad").exists()


def _head_classes(fn):
    def edit(meta: dict) -> dict:
        meta["heads"]["cell_type"]["classes"] = fn(meta["heads"]["cell_type"]["classes"])
        return meta

    return edit


def _frequency_labels(meta: dict) -> dict:
    stored = meta["label_frequency"]["cell_type"]
    stored["labels"] = [f"x{i}" for i in range(len(stored["labels"]))]
    return meta


EDITED = {  # each was accepted, and answered wrong labels, or a traceback or a 5xx mid-request
    "classes renamed": (_head_classes(lambda c: ["X", *c[1:]]), "heads.safetensors",
                        "classes of the 'cell_type' head are not the sorted labels"),
    "classes reordered": (_head_classes(lambda c: [c[-1], *c[1:-1], c[0]]), "heads.safetensors",
                          "classes of the 'cell_type' head are not the sorted labels"),
    "classes numbers": (_head_classes(lambda c: list(range(len(c)))), "heads.safetensors",
                        "classes of the 'cell_type' head are not the sorted labels"),
    "heads unlisted": (lambda m: {**m, "heads": None}, "heads.safetensors",
                       "is present, but index.json lists no heads"),
    "metric": (lambda m: {**m, "metric": "cosine"}, "index.faiss",
               "was not built for the metric 'cosine'"),
    "dim": (lambda m: {**m, "dim": "abc"}, "index.json", "dim 'abc' is not a whole number"),
    "nprobe": (lambda m: {**m, "nprobe": "x"}, "index.json", "nprobe 'x' is not a whole number"),
    "kind": (lambda m: {**m, "kind": "bogus"}, "index.json", "kind 'bogus' is not one of"),
    "frequency labels": (_frequency_labels, "labels.parquet",
                         "label_frequency of 'cell_type' names other labels"),
    "frequency sum": (lambda m: {**m, "label_frequency": {"cell_type": {
        **m["label_frequency"]["cell_type"],
        "shares": [1e308] * len(m["label_frequency"]["cell_type"]["shares"])}}},
        "index.json", "shares that sum to inf, not 1"),
}  # fmt: skip


@pytest.mark.parametrize("edited", list(EDITED))
def test_an_index_json_that_disagrees_with_its_files_is_one_line(files, tmp_path, capsys, edited):
    import shutil

    model, d, _ = files
    ix = tmp_path / "ix"
    shutil.copytree(d / "ix", ix)
    edit, where, says = EDITED[edited]
    _edit_json(ix, edit)
    args = ["annotate", "--model", str(model), "--index", str(ix), "--query",
            str(d / "ref.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad")]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and f"{ix}/{where}: " in err and says in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_an_index_of_an_older_censusvi_still_loads(files, tmp_path):
    """IVF indexes written before the kinds were named say kind "ivf<nlist>": still accepted."""
    import shutil

    from censusvi.annotate.index import load_index

    _, d, _ = files
    shutil.copytree(d / "ix", tmp_path / "ix")
    _edit_json(tmp_path / "ix", lambda m: {**m, "kind": "ivf447"})
    assert load_index(tmp_path / "ix").meta["kind"] == "ivf447"


def test_a_query_cell_without_a_batch_is_refused(files, tmp_path, capsys):
    """A NaN batch is not a new batch called "nan": one line, nothing written."""
    model, d, a = files
    q = a.copy()
    q.obs["batch"] = q.obs["batch"].astype(object)
    q.obs.iloc[:7, q.obs.columns.get_loc("batch")] = np.nan
    q.write_h5ad(tmp_path / "q.h5ad")
    args = ["annotate", "--model", str(model), "--index", str(d / "ix"), "--query",
            str(tmp_path / "q.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad")]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 2 and f"7 of {a.n_obs} query cells have no 'batch' (NaN)" in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_an_output_inside_an_input_directory_is_refused(files, tmp_path, capsys):
    model, d, _ = files
    code, err = run(annotate_args(files, d / "ref.h5ad", model / "o.h5ad"), capsys)
    assert code == 2 and f"is inside the input {model}" in err, err
    assert not (model / "o.h5ad").exists()


@pytest.mark.parametrize("out", ["o.txt", "o"])
def test_a_file_output_named_for_another_kind_is_refused(files, tmp_path, capsys, out):
    """annotate writes an .h5ad: an --out named otherwise is one line, nothing written."""
    _, d, _ = files
    code, err = run(annotate_args(files, d / "ref.h5ad", tmp_path / out), capsys)
    assert code == 2 and "writes a .h5ad file; give a name ending in .h5ad" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_given_as_the_query_file_says_so(files, tmp_path, capsys):
    _, d, _ = files
    code, err = run(annotate_args(files, d / "ix", tmp_path / "o.h5ad"), capsys)
    assert code == 2 and f"{d / 'ix'} is a folder, not an .h5ad file" in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_an_unknown_index_json_key_is_not_copied_into_the_output(files, tmp_path, capsys):
    """index.json's entries went into the annotated file's uns whole: a hand-added 10^30 or a
    mixed list made the h5ad write fail after all the work. Only censusvi's own keys travel."""
    import shutil

    model, d, _ = files
    ix = tmp_path / "ix"
    shutil.copytree(d / "ix", ix)
    _edit_json(ix, lambda m: {**m, "zzz": 10**30, "notes": [1, "a", {"b": 2}]})
    out = tmp_path / "o.h5ad"
    args = ["annotate", "--model", str(model), "--index", str(ix), "--query",
            str(d / "ref.h5ad"), "--batch-key", "batch", "--out", str(out)]  # fmt: skip
    code, err = run(args, capsys)
    assert code == 0, err
    recorded = ad.read_h5ad(out).uns["censusvi"]["index"]
    assert "zzz" not in recorded and "notes" not in recorded and recorded["kind"] == "flat"
