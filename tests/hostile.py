"""Hostile request bodies, built from a small honest query: each one names what it attacks.

Shared by the server tests (over HTTP) and the decoder fuzz tests (in process).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from censusvi.wire import ARROW, H5AD, JSON, encode_arrow_request

SECRET = b"CENSUSVI-SERVER-SECRET-0123456789\n"


def csr_body(q, **change) -> dict:
    x = sp.csr_matrix(q.X)
    body = {
        "genes": list(q.var["gene_ids"]),
        "indptr": x.indptr.tolist(),
        "indices": x.indices.tolist(),
        "data": x.data.tolist(),
        "batch": list(q.obs["batch"]),
    }
    return {**body, **change}


def _json(d) -> tuple[bytes, str]:
    return json.dumps(d).encode(), JSON


def _arrow_table(table: pa.Table, compression: str | None = None) -> tuple[bytes, str]:
    sink = io.BytesIO()
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return sink.getvalue(), ARROW


def _arrow_bomb(genes: list[str], n: int = 20_000_000) -> tuple[bytes, str]:
    """~10 KB of zstd that would expand to 20 M entries in one cell."""
    offsets = pa.array([0, n], pa.int32())
    table = pa.table(
        {
            "indices": pa.ListArray.from_arrays(offsets, pa.array(np.zeros(n, np.int32))),
            "data": pa.ListArray.from_arrays(offsets, pa.array(np.ones(n, np.float32))),
            "batch": ["b0"],
        }
    ).replace_schema_metadata({b"genes": json.dumps(genes)})
    return _arrow_table(table, "zstd")


def _h5ad_variant(q, tmp: Path, name: str, change) -> tuple[bytes, str]:
    path = tmp / f"{name}.h5ad"
    q.write_h5ad(path)
    with h5py.File(path, "a") as f:
        change(f)
    return path.read_bytes(), H5AD


def _halved_counts(f) -> None:
    """X of a log-normalised file: fractions where counts were."""
    f["X/data"][...] = f["X/data"][...] / 2 + 0.25


def _external_storage(secret: Path):
    def change(f):
        n = f["obs"]["_index"].shape[0]
        del f["obs/_index"]
        f.create_dataset("obs/_index", shape=(n,), dtype="S8", external=[(str(secret), 0, 8 * n)])
        f["obs/_index"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})

    return change


def _external_link(secret_h5: Path):
    def change(f):
        del f["obs/_index"]
        f["obs/_index"] = h5py.ExternalLink(str(secret_h5), "secret")

    return change


def _virtual(secret_h5: Path):
    def change(f):
        n = f["obs"]["_index"].shape[0]
        layout = h5py.VirtualLayout(shape=(n,), dtype="S8")
        layout[:] = h5py.VirtualSource(str(secret_h5), "secret", shape=(n,))
        del f["obs/_index"]
        f.create_virtual_dataset("obs/_index", layout)

    return change


def _bad_index(value: int):
    def change(f):
        ind = f["X/indices"][...]
        ind[len(ind) // 2] = value
        del f["X/indices"]
        f.create_dataset("X/indices", data=ind.astype(np.int64))

    return change


def _as_csc(q):
    q = q.copy()
    q.X = sp.csc_matrix(q.X)
    return q


def _h5ad_bomb(f):
    f.create_dataset(
        "layers/zeros", shape=(f["obs/_index"].shape[0], 2_000_000), dtype="f4",
        compression="gzip", chunks=(8, 100_000),
    )  # fmt: skip


def server_secrets(tmp: Path) -> tuple[Path, Path]:
    """A plain secret file and an HDF5 file holding it, as files of the server's machine."""
    secret = tmp / "server-secret.txt"
    secret.write_bytes(SECRET * 200)
    secret_h5 = tmp / "server-secret.h5"
    with h5py.File(secret_h5, "w") as f:
        f["secret"] = np.array([SECRET[:8]] * 2000, dtype="S8")
    return secret, secret_h5


def hostile_payloads(q, tmp: Path) -> dict[str, tuple[bytes, str, dict, int, str]]:
    """name -> (body, content type, query params, expected status, text the error must hold)."""
    genes = list(q.var["gene_ids"])
    body = csr_body(q)
    n_nz = len(body["data"])
    secret, secret_h5 = server_secrets(tmp)
    x = sp.csr_matrix(q.X)
    h5 = {"batch_key": "batch"}
    p: dict[str, tuple[bytes, str, dict, int, str]] = {
        "json index 1e9": (
            *_json({**body, "indices": [10**9] + body["indices"][1:]}),
            {},
            422,
            "out of range",
        ),
        "json index -1": (
            *_json({**body, "indices": [-1] + body["indices"][1:]}),
            {},
            422,
            "out of range",
        ),
        "json indptr decreasing": (
            *_json({**body, "indptr": [0, n_nz] + [0] * (len(body["indptr"]) - 3) + [n_nz]}),
            {},
            422,
            "indptr decreases",
        ),
        "json nnz inconsistent": (
            *_json({**body, "data": body["data"][:-1]}),
            {},
            422,
            "pair one to one",
        ),
        "json deeply nested": (b"[" * 200_000 + b"]" * 200_000, JSON, {}, 422, "nests too deeply"),
        "json not an object": (*_json([1, 2, 3]), {}, 422, "must be an object"),
        "json nested data": (
            *_json({**body, "data": [[v] for v in body["data"]]}),
            {},
            422,
            "flat list",
        ),
        "json index overflow": (
            *_json({**body, "indices": [10**30] + body["indices"][1:]}),
            {},
            422,
            "indices",
        ),
        "json counts 1e30": (
            *_json({**body, "data": [1e30] + body["data"][1:]}),
            {},
            422,
            "above 1e+09",
        ),
        "json counts 1e308": (  # infinite in float32, but a number the sender wrote
            *_json({**body, "data": [1e308] + body["data"][1:]}),
            {},
            422,
            "a count of 1e+308 is above 1e+09",
        ),
        "json counts as strings": (
            *_json({**body, "data": [str(v) for v in body["data"]]}),
            {},
            422,
            "data must be a flat list of numbers, got '",
        ),
        "json counts as booleans": (
            *_json({**body, "data": [True] * len(body["data"])}),
            {},
            422,
            "data must be a flat list of numbers, got True",
        ),
        "json one huge string": (  # a <U100000 array of every entry: GBs once
            *_json({**body, "data": ["7" * 100_000] + [""] * (len(body["data"]) - 1)}),
            {},
            422,
            "data must be a flat list of numbers, got '7777",
        ),
        "json one huge batch label": (
            *_json({**body, "batch": ["b" * 100_000] + ["b0"] * (len(body["indptr"]) - 2)}),
            {},
            422,
            "a batch label is longer than 1000 characters",
        ),
        "json fractional gene index": (  # 0.5 was truncated to gene 0: a count moved genes
            *_json({**body, "indices": [0.5] + body["indices"][1:]}),
            {},
            422,
            "indices must hold whole numbers, got 0.5",
        ),
        "json 0 cells": (
            *_json({**body, "indptr": [0], "indices": [], "data": [], "batch": []}),
            {},
            422,
            "no cells",
        ),
        "json not utf-8": (b"\xff\xfe{", JSON, {}, 422, "not JSON"),
        "arrow index -1": (
            encode_arrow_request(
                sp.csr_matrix(
                    (x.data, np.where(np.arange(x.nnz) == 0, -1, x.indices), x.indptr),
                    shape=x.shape,
                ),
                genes,
                q.obs["batch"],
            ),
            ARROW,
            {},
            422,
            "out of range",
        ),  # fmt: skip
        "arrow index 1e9": (
            encode_arrow_request(
                sp.csr_matrix(
                    (x.data, np.where(np.arange(x.nnz) == 0, 10**9, x.indices), x.indptr),
                    shape=(x.shape[0], 2 * 10**9),
                ),
                genes,
                q.obs["batch"],
            ),
            ARROW,
            {},
            422,
            "column index out of range",
        ),  # fmt: skip
        "json repeated gene ids": (
            *_json({**body, "genes": [genes[1]] + genes[1:]}),
            {},
            422,
            "must be unique",
        ),
        "json all cells zero": (*_json({**body, "data": [0.0] * n_nz}), {}, 422, "zero counts"),
        "arrow flat indices": (
            *_arrow_table(
                pa.table(
                    {
                        "indices": pa.array(x.indices[: q.n_obs]),
                        "data": pa.array(x.data[: q.n_obs]),
                        "batch": pa.array(["b0"] * q.n_obs),
                    }
                ).replace_schema_metadata({b"genes": json.dumps(genes)})
            ),
            {},
            422,
            "list of numbers",
        ),  # fmt: skip
        "arrow without batch": (
            *_arrow_table(
                pa.ipc.open_stream(encode_arrow_request(x, genes, q.obs["batch"]))
                .read_all()
                .drop_columns(["batch"])
            ),
            {},
            422,
            "lacks column(s) ['batch']",
        ),
        "arrow without genes": (
            *_arrow_table(
                pa.ipc.open_stream(encode_arrow_request(x, genes, q.obs["batch"]))
                .read_all()
                .replace_schema_metadata({})
            ),
            {},
            422,
            "metadata lacks 'genes'",
        ),
        "arrow zstd bomb": (*_arrow_bomb(genes), {}, 413, "would decode to"),
        "arrow garbage": (b"\xff\xff\xff\xff" + b"\x00" * 64, ARROW, {}, 422, "Arrow"),
        "h5ad unknown layer": (  # the file is fine: the message is about ?layer=
            *_h5ad_variant(q, tmp, "plain", lambda f: None),
            {**h5, "layer": "spliced"},
            422,
            "?layer=spliced: layer 'spliced' not in the file",
        ),
        "h5ad log-normalised X": (  # the advice is a request's ?layer=, not the CLI's --layer
            *_h5ad_variant(q, tmp, "lognorm", _halved_counts),
            h5,
            422,
            "pass ?layer=counts (or ?layer=raw)",
        ),
        "h5ad external storage": (
            *_h5ad_variant(q, tmp, "ext", _external_storage(secret)),
            h5,
            422,
            "external file",
        ),
        "h5ad external link": (
            *_h5ad_variant(q, tmp, "link", _external_link(secret_h5)),
            h5,
            422,
            "external link",
        ),
        "h5ad virtual dataset": (
            *_h5ad_variant(q, tmp, "vds", _virtual(secret_h5)),
            h5,
            422,
            "virtual dataset",
        ),
        "h5ad index 1e9": (
            *_h5ad_variant(q, tmp, "big", _bad_index(10**9)),
            h5,
            422,
            "out of range",
        ),
        "h5ad index -1": (*_h5ad_variant(q, tmp, "neg", _bad_index(-1)), h5, 422, "out of range"),
        "h5ad CSC index 1e9": (
            *_h5ad_variant(_as_csc(q), tmp, "csc", _bad_index(10**9)),
            h5,
            422,
            "row index out of range",
        ),
        "h5ad gzip bomb": (*_h5ad_variant(q, tmp, "bomb", _h5ad_bomb), h5, 413, "would decode to"),
        "h5ad truncated": (
            (tmp / "ext.h5ad").read_bytes()[:3000],
            H5AD,
            h5,
            422,
            "not a readable .h5ad",
        ),
    }
    return p
