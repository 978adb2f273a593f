"""Property-based fuzzing of ``censusvi embed`` on mutated small .h5ad files, in process.

The property: exit 0 with a readable output holding one finite latent row per written cell, or
exit 2 with exactly one ``censusvi: error: ...`` line and nothing left at ``--out``; never an
uncaught exception, never a crash. Files are mutated as bytes (``test_fuzz.mutations``) and as
AnnData (h5py edits of valid files: out-of-range indices, decreasing indptr, NaN / negative /
huge / fractional counts, wrong shapes and lengths, changed dtypes, deleted parts, repeated gene
ids, changed encodings), with good and bad options. About 1,200 cases, the same every run.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import example, given
from hypothesis import strategies as st

from censusvi.cli import main
from conftest import simulated_adata
from test_bad_input import pretrain_args
from test_fuzz import fuzz, mutations

N_CELLS, N_GENES, N_LATENT = 30, 50, 4
PREFIX = "censusvi: error: "


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny model (50 genes, batches b0..b2), trained once for the module."""
    d = tmp_path_factory.mktemp("fuzzmodel")
    simulated_adata(n_cells=200, n_genes=N_GENES, seed=0).write_h5ad(d / "ref.h5ad")
    args = pretrain_args(str(d / "ref.h5ad"), d / "m") + ["--n-hidden", "16"]
    assert main(args + ["--n-latent", str(N_LATENT)]) == 0
    return d / "m"


def _bases() -> dict[str, ad.AnnData]:
    """Valid queries (the model's genes and batches) that the mutations start from."""
    a = simulated_adata(n_cells=N_CELLS, n_genes=N_GENES, seed=1)
    csc, dense, layers, zeros = a.copy(), a.copy(), a.copy(), a.copy()
    csc.X = sp.csc_matrix(a.X)
    dense.X = a.X.toarray()
    layers.layers["counts"] = a.X.copy()
    layers.raw = a.copy()
    layers.X = sp.csr_matrix(np.log1p(a.X.toarray()))  # --layer counts or raw embeds; X is refused
    x = a.X.toarray()
    x[:5] = 0  # cells without counts: left out, with a warning
    zeros.X = sp.csr_matrix(x)
    return {"csr": a, "csc": csc, "dense": dense, "layers": layers, "zeros": zeros,
            "one": a[:1].copy(), "empty": a[:0].copy()}  # fmt: skip


BASES = tuple(_bases())


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, bytes]:
    """The valid queries as .h5ad bytes."""
    d = tmp_path_factory.mktemp("fuzzquery")
    for name, a in _bases().items():
        a.write_h5ad(d / f"{name}.h5ad")
    return {name: (d / f"{name}.h5ad").read_bytes() for name in BASES}


class Workdir:
    """A fresh input name per case (HDF5 may keep a handle of a failed read), one --out name."""

    def __init__(self, model: Path, root: Path) -> None:
        self.model, self.root, self.n = model, root, itertools.count()

    def embed(self, body: bytes, edits=(), options=()) -> int:
        data = self.root / f"q{next(self.n)}.h5ad"
        data.write_bytes(body)
        try:
            if edits:
                with h5py.File(data, "r+") as f:
                    for edit in edits:
                        apply(f, edit)
            return embeds_or_refuses(self.model, data, self.root / "o.h5ad", list(options))
        finally:
            data.unlink(missing_ok=True)
            (self.root / "o.h5ad").unlink(missing_ok=True)


def embeds_or_refuses(model: Path, data: Path, out: Path, options: list[str]) -> int:
    """The property, for one input file; returns the exit code."""
    err = io.StringIO()
    args = ["embed", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args + options)  # anything but a user error raises, and fails the test
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers
    if code == 0:
        assert err.getvalue() == ""
        written = ad.read_h5ad(out)
        z = written.obsm["X_scvi"]
        assert 0 < written.n_obs <= N_CELLS + 3 and z.shape == (written.n_obs, N_LATENT)
        assert np.isfinite(z).all()
        return code
    lines = err.getvalue().splitlines()
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith(PREFIX), lines
    assert len(lines[0]) > len(PREFIX) + 10, lines  # a reason, not a bare key or type name
    assert not out.exists()
    return code


@pytest.fixture
def work(model, tmp_path) -> Workdir:
    return Workdir(model, tmp_path)


# --- structured (AnnData-level) edits ----------------------------------------------------------

MATRICES = ("X", "layers/counts", "raw/X")  # a group (sparse) or a dataset (dense)
ARRAYS = tuple(f"{m}/{k}" for m in MATRICES for k in ("data", "indices", "indptr")) + MATRICES
FRAMES = ("obs/_index", "var/_index", "var/gene_ids", "obs/batch/codes", "obs/batch/categories",
          "raw/var/_index")  # fmt: skip
PARTS = ARRAYS + FRAMES + ("obs", "var", "obs/batch", "raw", "layers", "uns")
INT32 = np.iinfo(np.int32)
BAD_INDEX = [-1, int(INT32.min), N_GENES, N_GENES + 1, 10**9, int(INT32.max)]
BAD_INDPTR = [-1, 0, 1, 10**9, int(INT32.max), int(INT32.min)]
BAD_VALUE = [np.nan, np.inf, -np.inf, -1.0, 0.5, 1e30, 1e9 + 1, 0.0, 3e38, 1e-45]
BAD_DTYPE = ["int8", "uint8", "int64", "uint64", "float16", "float64", "bool", "complex64", "S4",
             "str"]  # fmt: skip
SHAPES = [(N_CELLS, N_GENES + 1), (N_CELLS - 1, N_GENES), (N_CELLS + 5, N_GENES), (N_CELLS, 1),
          (0, N_GENES), (N_CELLS, 0), (0, 0), (-1, N_GENES), (2**40, N_GENES), (N_CELLS,),
          (N_CELLS, N_GENES, 1)]  # fmt: skip
GENE_IDS = ["", "nan", "None", "x", "ENSG00000000000", "ENSG00000000001", "two\nlines"]
pos = st.integers(0, 10**6)  # an entry, taken modulo the dataset's size at the time

edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(MATRICES), st.just("indices"), pos,
              st.sampled_from(BAD_INDEX)),
    st.tuples(st.just("set"), st.sampled_from(MATRICES), st.just("indptr"), pos,
              st.sampled_from(BAD_INDPTR)),
    st.tuples(st.just("set"), st.sampled_from(MATRICES), st.sampled_from(["data", ""]), pos,
              st.sampled_from(BAD_VALUE)),
    st.tuples(st.just("fill"), st.sampled_from(ARRAYS), pos, st.integers(1, 2000),
              st.sampled_from([0, 1, -1, 2**31 - 1])),  # e.g. cells without counts, flat indptr
    st.tuples(st.just("set"), st.just("obs/batch"), st.just("codes"), pos,
              st.sampled_from([-1, 3, 127, -128])),
    st.tuples(st.just("swap"), st.sampled_from(ARRAYS), pos, pos),  # e.g. indptr out of order
    st.tuples(st.just("retype"), st.sampled_from(ARRAYS + FRAMES), st.sampled_from(BAD_DTYPE)),
    st.tuples(st.just("resize"), st.sampled_from(ARRAYS + FRAMES), st.integers(-3, 3)),
    st.tuples(st.just("shape"), st.sampled_from(MATRICES), st.sampled_from(SHAPES)),
    st.tuples(st.just("delete"), st.sampled_from(PARTS)),
    st.tuples(st.just("attr"), st.sampled_from(MATRICES + ("obs", "var", "obs/batch", "")),
              st.sampled_from(["encoding-type", "encoding-version", "_index", "column-order"]),
              st.sampled_from(["csc_matrix", "csr_matrix", "array", "dataframe", "bogus",
                               "9.9.9", "gene_ids", None])),
    st.tuples(st.just("gene"), st.sampled_from(["var/gene_ids", "var/_index"]), pos,
              st.sampled_from(GENE_IDS)),
    st.tuples(st.just("column"), st.sampled_from(["obs/batch", "var/gene_ids"]),
              st.sampled_from(["int", "float", "nan", "bool", "text"])),
    st.tuples(st.just("dense"), st.sampled_from(SHAPES[:4] + [(N_CELLS, N_GENES)]),
              st.sampled_from(["float32", "int64", "S2"]), st.sampled_from(BAD_VALUE[:3] + [1.0])),
    st.tuples(st.just("copy"), st.sampled_from(["layers/counts", "obsm/extra", "obsp/extra"])),
)  # fmt: skip
options = st.sampled_from(
    [[], [], ["--batch-size", "7"], ["--batch-size", "1"], ["--layer", "counts"],
     ["--layer", "raw"], ["--batch-size", "0"], ["--batch-size", "-3"],
     ["--min-gene-overlap", "1.5"], ["--min-gene-overlap", "nan"], ["--min-gene-overlap", "0"],
     ["--min-gene-overlap", "1"]]
)  # fmt: skip


def apply(f: h5py.File, edit: tuple) -> None:
    """One structured edit of an open .h5ad; an edit of a part that is not there does nothing."""
    kind = edit[0]
    if kind == "set":
        _, group, name, i, value = edit
        path = f"{group}/{name}" if name else group
        if isinstance(f.get(path), h5py.Dataset) and f[path].size:
            values = f[path][...]
            with np.errstate(all="ignore"):
                values.flat[i % values.size] = np.array(value).astype(values.dtype)
            f[path][...] = values
    elif kind == "fill":
        _, path, start, n, value = edit
        if isinstance(f.get(path), h5py.Dataset) and f[path].size and f[path].dtype.kind in "iuf":
            values = f[path][...]
            start %= values.size
            with np.errstate(all="ignore"):
                values.flat[start : start + n] = np.array(value).astype(values.dtype)
            f[path][...] = values
    elif kind == "swap":
        _, path, i, j = edit
        if isinstance(f.get(path), h5py.Dataset) and f[path].size:
            values = f[path][...]
            i, j = i % values.size, j % values.size
            values.flat[i], values.flat[j] = values.flat[j], values.flat[i]
            f[path][...] = values
    elif kind == "gene":
        _, path, i, gene = edit
        if isinstance(f.get(path), h5py.Dataset) and f[path].size and f[path].dtype.kind == "O":
            values = f[path][...]
            values[i % len(values)] = gene
            f[path][...] = values
    elif kind in ("retype", "resize"):
        _, path, arg = edit
        if isinstance(f.get(path), h5py.Dataset) and f[path].ndim:
            values = f[path][...]
            if kind == "retype":
                values = _retyped(values, arg)
            else:  # fewer entries, or some repeated at the end
                values = values[:arg] if arg < 0 else np.concatenate([values, values[:arg]])
            _replace(f, path, values)
    elif kind == "shape":
        _, path, shape = edit
        if path in f:
            f[path].attrs["shape"] = np.array(shape, dtype=np.int64)
    elif kind == "delete":
        if edit[1] in f:
            del f[edit[1]]
    elif kind == "attr":
        _, path, attr, value = edit
        if not path or path in f:
            attrs = f[path].attrs if path else f.attrs
            if value is None:
                attrs.pop(attr, None)
            else:
                attrs[attr] = value
    elif kind == "column":  # a categorical column (or gene ids) as a plain array of another kind
        _, path, what = edit
        if path in f:
            n = len(f["obs/_index"]) if path.startswith("obs") and "obs/_index" in f else N_GENES
            values = {"int": np.arange(n) % 3, "float": np.arange(n) / 2.0, "bool": np.arange(n) > 1,
                      "nan": np.full(n, np.nan),
                      "text": np.array([f"b{i % 3}" for i in range(n)], dtype=object)}[what]  # fmt: skip
            enc = "string-array" if what == "text" else "array"
            _replace(f, path, values, {"encoding-type": enc, "encoding-version": "0.2.0"})
    elif kind == "dense":  # X as a dense array of another shape or type
        _, shape, dtype, value = edit
        if "X" in f:
            del f["X"]
        x = np.ones(shape)
        x.flat[0] = value
        with np.errstate(all="ignore"):
            x = x.astype(dtype)
        _replace(f, "X", x, {"encoding-type": "array", "encoding-version": "0.2.0"})
    elif kind == "copy":  # X again, where it must have other dimensions or be counts
        group, name = edit[1].split("/")
        if "X" in f and group in f and name not in f[group]:
            f.copy(f["X"], f[group], name)


def _replace(f: h5py.File, path: str, values: np.ndarray, attrs: dict | None = None) -> None:
    """``path`` rewritten as ``values`` (a new dataset: dtype and length may change)."""
    if attrs is None:
        attrs = dict(f[path].attrs) if path in f else {}
    if path in f:
        del f[path]
    if values.dtype.kind in "OU":
        values = values.astype(str).astype(object)
        f.create_dataset(path, data=values, dtype=h5py.string_dtype())
    else:
        f.create_dataset(path, data=values)
    f[path].attrs.update(attrs)


def _retyped(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as another type: numbers wrap or round, text becomes bytes, str or zeros."""
    if values.dtype.kind == "O":  # strings (ids, names)
        if dtype == "S4":
            return values.astype(str).astype("S4")
        return values if dtype == "str" else np.zeros(len(values), dtype=dtype)
    if dtype == "str":
        return values.astype(str).astype(object)
    with np.errstate(all="ignore"):
        return values.astype(dtype)


cases = st.fixed_dictionaries(
    {"base": st.sampled_from(BASES), "edits": st.lists(edits, max_size=3), "opts": options}
)


def test_embed_structured_mutations(work, bases):
    @fuzz(800)
    @given(cases)
    @example({"base": "csr", "edits": [("set", "X", "indices", 0, 10**9)], "opts": []})  # segfault
    @example({"base": "csr", "edits": [("set", "X", "indptr", 5, 1)], "opts": []})  # decreasing
    @example({"base": "csc", "edits": [("set", "X", "indices", 3, -1)], "opts": []})
    @example({"base": "csr", "edits": [("gene", "var/gene_ids", 1, "ENSG00000000000")], "opts": []})  # fmt: skip
    @example({"base": "csr", "edits": [("gene", "var/gene_ids", 1, "a\nb"), ("gene", "var/gene_ids", 2, "a\nb")], "opts": []})  # fmt: skip
    @example({"base": "csr", "edits": [("set", "X", "data", 0, 1e30)], "opts": []})
    @example({"base": "layers", "edits": [("set", "layers/counts", "data", 0, 0.5)], "opts": ["--layer", "counts"]})  # fmt: skip
    @example({"base": "csr", "edits": [], "opts": ["--batch-size", "0"]})  # was a range() error
    @example({"base": "csr", "edits": [], "opts": ["--batch-size", "-3"]})  # was "zero counts"
    @example({"base": "csr", "edits": [], "opts": ["--min-gene-overlap", "nan"]})  # was exit 0
    def run(case):
        work.embed(bases[case["base"]], case["edits"], case["opts"])

    run()


def test_embed_byte_mutations(work, bases):
    @fuzz(400)
    @given(st.one_of(*(mutations(bases[b]) for b in ("csr", "csc", "dense"))))
    def run(body):
        work.embed(body)

    run()


@pytest.mark.parametrize(
    ("base", "options", "n_out"),
    [("csr", [], N_CELLS), ("csc", [], N_CELLS), ("dense", [], N_CELLS), ("zeros", [], N_CELLS - 5),
     ("one", [], 1), ("layers", ["--layer", "counts"], N_CELLS), ("layers", ["--layer", "raw"], N_CELLS),
     ("csr", ["--batch-size", "7"], N_CELLS)],
)  # fmt: skip
def test_bases_embed(work, bases, base, options, n_out):
    """The fuzzing starts from files that embed: every cell with counts, in one row each."""
    data, out = work.root / "q.h5ad", work.root / "o.h5ad"
    data.write_bytes(bases[base])
    assert main(["embed", "--model", str(work.model), "--data", str(data), "--out", str(out),
                 "--quiet", *options]) == 0  # fmt: skip
    assert ad.read_h5ad(out).obsm["X_scvi"].shape == (n_out, N_LATENT)


@pytest.mark.parametrize(
    ("base", "options", "message"),
    [("empty", [], "0 cells; there is nothing to embed"),
     ("layers", [], "non-integer values"),
     ("csr", ["--batch-size", "0"], "batch size 0: cells per minibatch must be an integer >= 1"),
     ("csr", ["--batch-size", "-3"], "batch size -3: cells per minibatch must be an integer >= 1"),
     ("csr", ["--min-gene-overlap", "nan"], "minimum gene overlap nan: it is a fraction"),
     ("csr", ["--min-gene-overlap", "1.5"], "minimum gene overlap 1.5: it is a fraction")],
)  # fmt: skip
def test_bases_refused(work, bases, base, options, message, capsys):
    data, out = work.root / "q.h5ad", work.root / "o.h5ad"
    data.write_bytes(bases[base])
    assert main(["embed", "--model", str(work.model), "--data", str(data), "--out", str(out),
                 "--quiet", *options]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith(PREFIX) and message in err and not out.exists()
