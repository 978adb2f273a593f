"""Property-based fuzzing of every decoder the server exposes, in process (thousands of cases):
each body decodes to sound query cells or raises ``PayloadError``; nothing else, never a crash."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from censusvi.serving.body import BadUpload, upload_file
from censusvi.untrusted import DecodeLimits
from censusvi.wire import ARROW, H5AD, JSON, PayloadError, decode_request, encode_arrow_request
from conftest import simulated_adata

LIMITS = DecodeLimits.for_body_limit(max_cells=200, max_body_bytes=2**20)
BASE = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def fuzz(n: int) -> settings:
    """n cases, the same ones every run (CI reruns what failed), no time limit per case."""
    return settings(BASE, max_examples=n)


Q = simulated_adata(n_cells=12, n_genes=30, seed=3)
GENES = list(Q.var["gene_ids"])
X = sp.csr_matrix(Q.X)


def decodes_soundly(body: bytes, ctype: str, batch_key: str | None = "batch") -> None:
    """The property: sound cells, or a PayloadError with a reason."""
    try:
        cells = decode_request(body, ctype, batch_key, None, LIMITS)
    except PayloadError as e:
        assert str(e).strip()
        return
    x = cells.x
    assert 0 < x.shape[0] <= LIMITS.max_cells and x.shape[1] == len(cells.genes)
    assert len(cells.batch) == x.shape[0] and len(set(cells.genes)) == len(cells.genes)
    assert (np.diff(x.indptr) >= 0).all() and x.indptr[-1] == x.nnz
    assert x.nnz == 0 or (x.indices.min() >= 0 and x.indices.max() < x.shape[1])
    assert np.isfinite(x.data).all() and (x.data >= 0).all()
    x.toarray()  # the operation an out-of-range index would turn into a wild write


def mutations(base: bytes) -> st.SearchStrategy[bytes]:
    """Byte edits of a valid body: overwrites, truncations and insertions."""
    edit = st.tuples(st.integers(0, len(base) - 1), st.binary(min_size=1, max_size=8))
    return st.one_of(
        st.lists(edit, min_size=1, max_size=6).map(lambda es: _overwrite(base, es)),
        st.integers(0, len(base) - 1).map(lambda n: base[:n]),
        edit.map(lambda e: base[: e[0]] + e[1] + base[e[0] :]),
    )


def _overwrite(base: bytes, edits) -> bytes:
    b = bytearray(base)
    for pos, chunk in edits:
        b[pos : pos + len(chunk)] = chunk
    return bytes(b[: len(base)])


numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
json_csr = st.fixed_dictionaries(
    {},
    optional={
        "genes": st.one_of(st.lists(st.sampled_from(GENES + ["", "x"]), max_size=35), numbers),
        "indptr": st.one_of(st.lists(st.integers(-3, 60), max_size=14), numbers),
        "indices": st.one_of(st.lists(st.integers(-2, 40), max_size=60), st.lists(numbers, max_size=4)),
        "data": st.one_of(st.lists(st.floats(-1, 1e31), max_size=60), st.lists(numbers, max_size=4)),
        "batch": st.one_of(st.text(max_size=5), st.lists(st.one_of(st.text(max_size=3), numbers), max_size=14)),
    },
)  # fmt: skip


@fuzz(2000)
@given(json_csr)
def test_json_csr_fields(d):
    decodes_soundly(json.dumps(d).encode(), JSON)


def _valid_json() -> bytes:
    return json.dumps(
        {"genes": GENES, "indptr": X.indptr.tolist(), "indices": X.indices.tolist(),
         "data": X.data.tolist(), "batch": list(Q.obs["batch"])}
    ).encode()  # fmt: skip


@fuzz(1500)
@given(mutations(_valid_json()))
def test_json_bytes(body):
    decodes_soundly(body, JSON)


def _valid_arrow(compression: str | None = None) -> bytes:
    body = encode_arrow_request(X, GENES, Q.obs["batch"])
    if compression is None:
        return body
    table = pa.ipc.open_stream(body).read_all()
    sink = io.BytesIO()
    opts = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=opts) as w:
        w.write_table(table)
    return sink.getvalue()


@fuzz(1500)
@given(st.one_of(mutations(_valid_arrow()), mutations(_valid_arrow("zstd"))))
@example(_overwrite(_valid_arrow(), [(937, b"\0\0\0\0")]))  # a 0-bit integer type: NotImplemented
def test_arrow_bytes(body):
    decodes_soundly(body, ARROW)


@pytest.fixture(scope="module")
def h5ad_body(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "q.h5ad"
    Q.write_h5ad(path)
    return path.read_bytes()


def test_h5ad_bytes(h5ad_body):
    @fuzz(1000)
    @given(mutations(h5ad_body))
    def run(body):
        decodes_soundly(body, H5AD)

    run()


def _multipart(file_bytes: bytes, boundary: str = "fuzzboundary") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.h5ad"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + file_bytes
        + f"\r\n--{boundary}--\r\n".encode()
    )


def multipart_then_decode(body: bytes) -> None:
    from starlette.requests import Request

    scope = {"type": "http", "method": "POST", "path": "/v1/annotate", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=fuzzboundary")]}  # fmt: skip
    try:
        upload = asyncio.run(upload_file(Request(scope), body))
    except BadUpload as e:
        assert str(e).strip()
        return
    decodes_soundly(upload, H5AD)


def test_multipart_bytes(h5ad_body):
    base = _multipart(h5ad_body[:4000])  # the envelope is what is fuzzed; the file is cut short

    @fuzz(1000)
    @given(mutations(base))
    def run(body):
        multipart_then_decode(body)

    run()
    multipart_then_decode(_multipart(h5ad_body))  # and the intact upload decodes


def test_an_h5ad_upload_with_cells_without_a_batch_is_refused(tmp_path):
    """As the command line refuses it: a NaN batch is not a new batch called "nan"."""
    q = Q.copy()
    q.obs["batch"] = q.obs["batch"].astype(object)
    q.obs.iloc[:3, q.obs.columns.get_loc("batch")] = np.nan
    q.write_h5ad(tmp_path / "q.h5ad")
    with pytest.raises(PayloadError, match=r"3 of \d+ cells have no 'batch' \(NaN\)"):
        decode_request((tmp_path / "q.h5ad").read_bytes(), H5AD, "batch")
