"""An embed/annotate request's options and the HTTP answer to a body that cannot be served."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from censusvi.serving.body import BadUpload, BodyStalled, BodyTooLarge, too_large_message
from censusvi.serving.settings import Settings, check_transfer
from censusvi.typed import typed
from censusvi.untrusted import PayloadTooLarge
from censusvi.wire import ARROW, JSON

log = logging.getLogger("censusvi.serve")


def _option(value: str | None, default, kind: type, name: str):
    """A query-string option as ``kind`` (``default`` when absent)."""
    return default if value is None else typed(name, value, kind, text=True)


def transfer_options(params: Mapping[str, str], s: Settings) -> tuple[int, float, str | None]:
    """``?k=`` (neighbours), ``?unknown_threshold=`` and ``?method=`` of label transfer (None
    where neither the request nor the settings name one: the annotator resolves the default),
    checked as the settings are (``check_transfer``)."""
    k = _option(params.get("k"), s.k, int, "k")
    thr = _option(params.get("unknown_threshold"), s.unknown_threshold, float, "unknown_threshold")
    method = params.get("method", s.method)
    check_transfer(k, thr, method)
    return k, thr, method


def refusal(e: Exception, s: Settings) -> tuple[int, str]:
    """Status and reason for a body that could not be read, decoded or its options parsed."""
    if isinstance(e, BodyTooLarge):
        return 413, too_large_message(s.max_request_mb)
    if isinstance(e, PayloadTooLarge):
        return 413, str(e)
    if isinstance(e, BodyStalled):
        return 408, str(e)
    if isinstance(e, (ValueError, BadUpload)):
        return 422, str(e)
    # Whatever a decoder missed is the body's fault, not the server's; the log keeps the trace.
    log.error("request decoding failed", exc_info=e)
    return 422, f"the body cannot be decoded ({type(e).__name__}: {e})"


def wants_arrow(accept: str | None) -> bool:
    """Whether an Accept header asks for the Arrow stream before JSON, by its q-values (RFC
    9110): ``arrow;q=0`` is "not Arrow", where the media type's mere presence had answered in
    Arrow. JSON's weight is its own, else a wildcard's (``*/*``); equal weights go to Arrow,
    which the Client asks for."""
    weights: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = next((v for k, _, v in (p.partition("=") for p in params) if k.strip() == "q"), "1")
        try:
            weights[media] = max(float(q), weights.get(media, 0.0))
        except ValueError:
            continue  # a q that is not a number: that range is left out
    arrow = weights.get(ARROW, 0.0)  # named: a wildcard alone keeps the default, JSON
    json = next((weights[m] for m in (JSON, "application/*", "*/*") if m in weights), 0.0)
    return arrow > 0 and arrow >= json
