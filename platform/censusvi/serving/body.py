"""Request bodies read with the size limit enforced while they stream in (chunked or not)."""

from __future__ import annotations

import asyncio

from starlette.requests import Request


class BodyTooLarge(ValueError):
    """The body passed the server's limit; nothing past the limit was read."""


class BadUpload(ValueError):
    """A multipart upload without its file; the message says what to send."""


def too_large_message(limit_mb: float) -> str:
    return (
        f"the request body exceeds the limit of {limit_mb:g} MB: split the cells over several "
        "requests (censusvi.client.Client does)"
    )


class BodyStalled(ValueError):
    """The body stopped arriving: the client is gone, or holds the request slot on purpose."""


def stalled_message(idle_s: float) -> str:
    return (
        f"the request body stopped arriving for {idle_s:g} s: send it whole, without pauses "
        "(a slot stays taken while a body trickles in)"
    )


async def read_body(request: Request, limit_bytes: int, idle_s: float) -> bytes:
    """The body, refused as soon as its declared length or the bytes received pass the limit,
    or when no part of it arrives for ``idle_s``: a client that declares a body and sends a byte
    held one of the ingress's few request slots until Serve's 300 s request timeout, and 16 such
    connections kept /healthz from answering."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise BodyTooLarge()
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BodyStalled(stalled_message(idle_s)) from None
        size += len(chunk)
        if size > limit_bytes:
            raise BodyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_file(request: Request, body: bytes, field: str = "file") -> bytes:
    """The named file of a multipart body already read (so the limit held while it arrived)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=16)
    except Exception as e:  # python-multipart / starlette raise several kinds for a bad body
        raise BadUpload(f"the multipart body cannot be parsed ({type(e).__name__}: {e})") from e
    upload = form.get(field)
    if upload is None or isinstance(upload, str):
        raise BadUpload(f"a multipart upload needs the .h5ad in a field named '{field}'")
    return await upload.read()
