"""Finished annotations kept for ``GET /explorer/{id}``: bounded in count, cells and age, and each
one opens only for the token that created it."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable


def new_result_id() -> str:
    return secrets.token_urlsafe(24)  # 192 random bits: unguessable


def explorer_path(rid: str) -> str:
    """Where ``GET /explorer/{id}`` shows result ``rid`` (the answer's ``explorer`` link)."""
    return f"/explorer/{rid}"


class ResultStore:
    """At most ``kept`` results, ``max_cells`` cells (rows of their ``latent``) in all, none older
    than ``ttl_s``; the oldest go first."""

    def __init__(
        self,
        kept: int,
        max_cells: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kept, self.max_cells, self.ttl_s, self.clock = kept, max_cells, ttl_s, clock
        self.items: OrderedDict[str, dict] = OrderedDict()

    def put(self, item: dict, owner: str | None, rid: str | None = None) -> str:
        """Keep ``item`` for the token digest ``owner`` (None: a server without a token), under
        ``rid`` (a ``new_result_id()``; a new one when None)."""
        rid = rid or new_result_id()
        self.items[rid] = {**item, "result_id": rid, "owner": owner, "kept_at": self.clock()}
        self._evict()
        return rid

    def get(self, rid: str, owner: str | None) -> dict | None:
        """The result, only for the token that created it (None for any other)."""
        self._evict()
        item = self.items.get(rid)
        if item is None or not hmac.compare_digest(str(item["owner"]), str(owner)):
            return None
        return item

    def _evict(self) -> None:
        now = self.clock()
        while self.items and (
            len(self.items) > self.kept
            or sum(len(i["latent"]) for i in self.items.values()) > self.max_cells
            or now - next(iter(self.items.values()))["kept_at"] > self.ttl_s
        ):
            self.items.popitem(last=False)


def kept_result(mapped: dict, labelled: dict, version: str, **keep) -> dict:
    """What ``GET /explorer/{id}`` shows of one answer: the mapping, its labels, the cells'
    batches; ``keep``: result_id, owner, model name and the request's batch labels."""
    return {
        "model": {"name": keep["name"], "version": version},
        "n_cells": len(keep["batch"]),
        **{k: v for k, v in mapped.items() if k != "replica"},
        "labels": labelled["labels"],
        "result_id": keep["result_id"],
        "explorer": explorer_path(keep["result_id"]),
        "batch": keep["batch"][mapped["positions"]],
    }
