"""What an untrusted request body will decode to, read from its metadata before anything is decoded.

A 10 KB zstd Arrow stream can hold 20 M entries, and a 66 KB gzip-compressed .h5ad hundreds of
MiB, so the body limit alone bounds nothing: each decoder first sums the sizes its format
declares and refuses above ``DecodeLimits``. An .h5ad may also point outside itself (HDF5
external storage, external links, virtual datasets): reading it would read the server's files,
so such uploads are refused before anndata opens them. A small file a user names (a token,
a scib table) is read only if it is a regular file, and only up to its limit.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def read_small_file(
    path: Path,
    limit: int,
    what: str,
    hint: str,
    error: type[ValueError] = ValueError,
    regular: bool = True,
) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (/dev/zero named by mistake was read
    until memory ran out). ``regular``: only a regular file (a pipe would hang a server's start
    unread); else a pipe is read too (``--scib <(jq ...)``), a folder never. ``error`` says
    ``what`` is wrong with it, then ``hint``."""
    try:
        if not path.exists() or path.is_dir() or (regular and not path.is_file()):
            state = "does not exist" if not path.exists() else "is not a regular file"
            raise error(f"{what} {path} {state}: {hint}")
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if len(raw) > limit:
        raise error(f"{what} {path} is over {limit} bytes: {hint}")
    return raw


MAX_JSON_BYTES = 256 * 2**20  # a model's or index's JSON: a Census model's config is a few MB


def read_json_file(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> object:
    """The JSON value in ``path`` (a file a user may have handed over), read up to ``limit``
    bytes; a ValueError that names the file for anything else: not UTF-8, not JSON, nested too
    deep for the parser (a RecursionError), a device or pipe, too large (a sparse file of
    terabytes was read until memory ran out)."""
    raw = read_small_file(
        path, limit, what, "it is damaged or not what censusvi wrote", regular=True
    )
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{what} {path} is nested too deeply to be what censusvi wrote") from None


class PayloadError(ValueError):
    """The request body cannot be read as query cells; the message says why (HTTP 422)."""


class PayloadTooLarge(PayloadError):
    """The body would decode to more than the server accepts (HTTP 413)."""


@dataclass(frozen=True)
class DecodeLimits:
    max_cells: int = 50_000
    max_decoded_bytes: int = 4 << 30  # everything the body expands to, all arrays together

    @classmethod
    def for_body_limit(cls, max_cells: int, max_body_bytes: int) -> DecodeLimits:
        """Compressed bodies may expand, but not without bound: 8x the body limit (counts
        compress about 2-4x with gzip or zstd)."""
        return cls(max_cells, 8 * max_body_bytes)

    def cells(self, n: int) -> None:
        if n > self.max_cells:
            raise PayloadTooLarge(
                f"the request holds {n} cells; the limit is {self.max_cells} cells per request: "
                "split it (censusvi.client.Client does)"
            )

    def decoded(self, n_bytes: int, what: str) -> None:
        if n_bytes > self.max_decoded_bytes:
            raise PayloadTooLarge(
                f"the {what} would decode to {n_bytes / 2**20:.0f} MiB, above the server's "
                f"{self.max_decoded_bytes / 2**20:.0f} MiB: send fewer cells per request"
            )


# --- Arrow IPC: the record batches' flatbuffer headers ---------------------------------------


def _u32(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 4], "little")


def _field(b: bytes, table: int, i: int) -> int | None:
    """Where field ``i`` of the flatbuffer table at ``table`` is stored (None: absent)."""
    vtable = table - int.from_bytes(b[table : table + 4], "little", signed=True)
    vt_size = int.from_bytes(b[vtable : vtable + 2], "little")
    slot = vtable + 4 + 2 * i
    if slot + 2 > vtable + vt_size:
        return None
    off = int.from_bytes(b[slot : slot + 2], "little")
    return table + off if off else None


def _record_batch_sizes(meta: bytes, body: bytes, header_table: int) -> tuple[int, int]:
    """(rows, decoded bytes) of one RecordBatch: its buffers' lengths, or for a compressed
    batch the uncompressed length each buffer starts with (Arrow's IPC format)."""
    at = _field(meta, header_table, 0)
    rows = int.from_bytes(meta[at : at + 8], "little", signed=True) if at else 0
    at = _field(meta, header_table, 2)  # buffers: [struct {offset: long, length: long}]
    compressed = _field(meta, header_table, 3) is not None
    total = 0
    if at:
        vec = at + _u32(meta, at)
        for k in range(_u32(meta, vec)):
            off, length = np.frombuffer(meta, "<i8", 2, vec + 4 + 16 * k)
            if compressed and length >= 8:
                declared = int(np.frombuffer(body, "<i8", 1, int(off))[0])
                length = declared if declared >= 0 else length - 8
            total += max(int(length), 0)
    return rows, total


def check_arrow(body: bytes, limits: DecodeLimits) -> None:
    """Refuse an Arrow IPC stream whose batches hold too many rows or decode too large."""
    import pyarrow as pa

    rows = size = 0
    try:
        for msg in pa.ipc.MessageReader.open_stream(body):
            if msg.type not in ("record batch", "dictionary batch"):
                continue
            meta, payload = msg.metadata.to_pybytes(), msg.body.to_pybytes() if msg.body else b""
            header = _field(meta, _u32(meta, 0), 2)
            if header is None:
                raise PayloadError("an Arrow message has no header")
            table = header + _u32(meta, header)
            if msg.type == "dictionary batch":  # DictionaryBatch {id, data: RecordBatch, ...}
                at = _field(meta, table, 1)
                if at is None:
                    continue
                size += _record_batch_sizes(meta, payload, at + _u32(meta, at))[1]
            else:
                r, s = _record_batch_sizes(meta, payload, table)
                rows, size = rows + r, size + s
            limits.cells(rows)
            limits.decoded(size, "Arrow stream")
    except (pa.ArrowException, OSError, ValueError, IndexError) as e:
        if isinstance(e, PayloadError):
            raise
        raise PayloadError(f"the body is not an Arrow IPC stream ({e})") from e


# --- HDF5 (.h5ad uploads) ---------------------------------------------------------------------


def outside_references(f, soft_links: bool = True, on_dataset=None) -> list[str]:
    """What in the open HDF5 file ``f`` points outside it: external links, external storage,
    virtual datasets (and, with ``soft_links``, links within it, which anndata never writes).
    ``on_dataset`` is called with every self-contained dataset, in the same walk."""
    import h5py

    problems: list[str] = []

    def visit(name: str, link) -> None:
        if isinstance(link, h5py.ExternalLink):
            problems.append(f"'{name}' is an external link to {link.filename!r}")
        elif soft_links and isinstance(link, h5py.SoftLink):
            problems.append(f"'{name}' is a soft link")

    def dataset(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.is_virtual:
            problems.append(f"'{name}' is a virtual dataset")
        elif obj.external:
            problems.append(f"'{name}' keeps its data in external file(s)")
        elif on_dataset is not None:
            on_dataset(obj)

    f.visititems_links(visit)
    if not problems:  # visiting the objects follows the links
        f.visititems(dataset)
    return problems


def check_hdf5(body: bytes, limits: DecodeLimits) -> None:
    """Refuse an .h5ad that reaches outside itself, or whose datasets would decode too large."""
    import h5py

    size = 0

    def add(obj) -> None:
        nonlocal size
        if obj.shape is not None:
            size += int(np.prod(obj.shape, dtype=np.float64)) * max(obj.dtype.itemsize, 1)

    try:
        with h5py.File(io.BytesIO(body), "r") as f:
            problems = outside_references(f, on_dataset=add)
            n_obs = _n_obs(f)
    except Exception as e:  # h5py raises OSError, RuntimeError, KeyError... for damaged files
        raise PayloadError(
            f"the upload is not a readable .h5ad file ({type(e).__name__}: {e})"
        ) from e
    if problems:
        raise PayloadError(
            f"the upload reaches outside itself ({problems[0]}); send a self-contained .h5ad "
            "(anndata's write_h5ad writes one)"
        )
    limits.cells(n_obs)
    limits.decoded(size, ".h5ad upload")


def _n_obs(f) -> int:
    """Cells of an .h5ad from its metadata: X's shape attribute or dataset shape, else obs."""
    x = f.get("X")
    if x is not None:
        shape = x.attrs.get("shape") if not hasattr(x, "shape") else x.shape
        if shape is not None and len(shape) >= 1:
            return int(shape[0])
    obs = f.get("obs")
    if obs is not None:
        index = obs.attrs.get("_index", "_index")
        if isinstance(index, bytes):
            index = index.decode()
        ds = obs.get(str(index))
        if ds is not None and hasattr(ds, "shape") and ds.shape:
            return int(ds.shape[0])
    return 0
