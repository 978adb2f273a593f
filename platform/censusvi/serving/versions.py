"""Model versions across the app's replicas, without Ray: what a replica holds, loaded off the
request path (``VersionStore``), and the one board that decides which version is served
(``VersionBoard``).

How an alias move reaches every replica: the board follows the alias; a new version becomes its
*target*. Every Mapper and Annotator replica reports what it holds each tick and gets back what to
hold (``wanted``: the served version and the target, and the version served before for a grace
period so that requests already pinned to it finish); it loads a missing version in the
background while it keeps answering with what it has. Only when every running replica of both
deployments reports the target does the board serve it, and the ingresses pin new requests to it.
A replica that starts (autoscaling) loads what is wanted before it takes requests. So no request
waits on a cold load, and a replica never holds more than two versions (the board starts the next
move only once the previous version is retired).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from censusvi.atomic import process_alive
from censusvi.serving.settings import Settings, current_version

log = logging.getLogger("censusvi.serve")

HELD = ("Mapper", "Annotator")  # the deployments that hold a version (model, index)
HOLD_AT_MOST = (
    2  # versions a replica holds at once: served + incoming (memory is reserved for both)
)


class VersionStore:
    """Whatever ``load(version)`` builds, per version. ``prepare`` loads outside the lock that
    requests take, so requests go on while a version loads; ``get`` of a version not prepared
    loads it there and then (a cold load, counted in ``cold_loads``: the board's protocol means
    it should not happen)."""

    def __init__(
        self,
        load: Callable[[str], Any],
        fits: Callable[[str, list[str]], str | None] | None = None,
    ) -> None:
        self.load = load
        self.fits = fits  # (version, versions held) -> why it cannot be held beside them, or None
        self.refused: dict[str, str] = {}
        self.failed: dict[str, tuple[float, int]] = {}  # version -> (next try, failures so far)
        self.items: dict[str, Any] = {}
        self.lock = threading.Lock()  # guards items: held for a lookup, never for a load
        self.loading = threading.Lock()  # one load at a time
        self.cold_loads = 0

    def prepare(self, version: str) -> Any:
        with self.loading:
            with self.lock:
                if version in self.items:
                    return self.items[version]
            item = self.load(version)
            with self.lock:
                self.items[version] = item
            return item

    def keep(self, versions: list[str]) -> list[str]:
        """Drop every version but ``versions``; the ones dropped."""
        with self.lock:
            gone = [v for v in self.items if v not in versions]
            for v in gone:
                del self.items[v]
        return gone

    def held(self) -> list[str]:
        with self.lock:
            return list(self.items)

    def admits(self, version: str) -> bool:
        """Whether ``version`` may be loaded beside what is held (the first always may); a
        refusal is logged once and kept in ``refused``."""
        held = self.held()
        reason = self.fits(version, held) if self.fits and held else None
        if reason and version not in self.refused:
            log.warning(reason)
        if reason:
            self.refused[version] = reason
        return reason is None

    def get(self, version: str) -> Any:
        with self.lock:
            if version in self.items:
                return self.items[version]
            self.cold_loads += 1
        log.warning("version %s asked for before it was loaded here: loading it now", version)
        return self.prepare(version)


class VersionBoard:
    """Which version the app serves, moved to the alias's version once every Mapper and
    Annotator replica holds it. ``running()`` counts running replicas per deployment name."""

    def __init__(
        self,
        s: Settings,
        running: Callable[[], dict[str, int]],
        resolve: Callable[[Settings], str] = current_version,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.s, self.running, self.resolve, self.clock = s, running, resolve, clock
        self.served = self.target = resolve(s)
        self.previous: str | None = None
        self.switched_at = -float("inf")
        self.reports: dict[str, tuple[str, tuple[str, ...], float]] = {}
        self.cold_loads: dict[str, int] = {}  # per replica: versions it had to load on request
        self.lock = threading.Lock()
        self.last_resolved = clock()

    @property
    def stale_s(self) -> float:
        return 5 * self.s.tick_s + 10  # a replica silent this long is gone

    def wanted(self) -> dict:
        keep = [self.served] + [v for v in (self.target, self.previous) if v and v != self.served]
        return {"served": self.served, "target": self.target, "keep": keep}

    def report(self, deployment: str, replica: str, versions: list[str], cold: int = 0) -> dict:
        """A replica's holdings (and its cold loads so far); the answer is what it should hold."""
        with self.lock:
            self.reports[replica] = (deployment, tuple(versions), self.clock())
            self.cold_loads[replica] = cold
            return self.wanted()

    def state(self) -> dict:
        """What the board knows: ``wanted`` and each replica's last report."""
        with self.lock:
            replicas = {
                r: {"deployment": d, "versions": list(v), "cold_loads": self.cold_loads.get(r, 0)}
                for r, (d, v, _) in self.reports.items()
            }
            return {**self.wanted(), "previous": self.previous, "replicas": replicas}

    def holders(self, version: str) -> dict[str, int]:
        now = self.clock()
        out = dict.fromkeys(HELD, 0)
        for deployment, versions, at in self.reports.values():
            if deployment in out and version in versions and now - at < self.stale_s:
                out[deployment] += 1
        return out

    def _retarget(self, alias: str) -> None:
        """Follow the alias, during a move too: a version no replica can load (refused, or too
        large) stayed the target for good, and a later promote or rollback went unseen."""
        if alias == self.target:
            return
        if self.target != self.served:
            log.warning(
                "alias %s moved to version %s before every replica held version %s: %s",
                self.s.model, alias, self.target,
                "the move is abandoned" if alias == self.served else "loading the new one instead",
            )  # fmt: skip
        else:
            log.info("alias %s moved to version %s: loading it everywhere", self.s.model, alias)
        with self.lock:
            self.target = alias

    def tick(self) -> dict:
        """Retire the previous version after its grace, start a move when the alias moved (one
        at a time), switch when every running replica holds the target. The new ``wanted``."""
        now = self.clock()
        if self.previous and now - self.switched_at > self.s.retire_after_s:
            with self.lock:
                self.previous = None
        if self.s.follows_alias and self.previous is None:
            if now - self.last_resolved >= self.s.registry_poll_s:
                self.last_resolved = now
                self._retarget(self.resolve(self.s))
        if self.target != self.served:
            running, holding = self.running(), self.holders(self.target)
            if all(holding[d] >= running.get(d, 0) for d in HELD):
                log.info("every replica holds version %s: serving it", self.target)
                with self.lock:
                    self.previous, self.served = self.served, self.target
                    self.switched_at = now
        with self.lock:
            self.reports = {r: v for r, v in self.reports.items() if now - v[2] < self.stale_s}
            return self.wanted()


SCRATCH_PREFIX = "censusvi-serve-"  # + the replica's pid: its downloaded versions


def replica_scratch(root: str | None = None) -> str:
    """A new folder for this replica's downloaded versions, named by its process id. A replica
    that Serve stops, kills or loses to the OOM killer never cleans up after itself, so the
    folders of replicas whose process is gone are removed first: replicas that come and go
    (autoscaling, redeploys) do not fill the node's disk with copies of every version."""
    base = Path(root or tempfile.gettempdir())
    for d in base.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = d.name[len(SCRATCH_PREFIX) :].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):  # this process counts as alive
            shutil.rmtree(d, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=base)


class VersionFetcher:
    """A local copy of a version's files (a registry download, into ``replica_scratch``), or
    the model directory given."""

    def __init__(self, s: Settings, part: str) -> None:
        self.s, self.part = s, part  # "model" or "index": what this replica reads
        self.scratch = replica_scratch() if s.registered else None

    def __call__(self, version: str):
        from censusvi.registry.uris import parse_model_uri
        from censusvi.registry.versions import VersionFiles, fetch_version

        if not self.s.registered:
            return VersionFiles(self.s.model, "local", self.s.model, self.s.index)
        name = parse_model_uri(self.s.model)[0]
        dst, uri, part = f"{self.scratch}/{version}", self.s.tracking_uri, self.part
        return fetch_version(name, version, dst, uri, model=part == "model", index=part == "index")


MAX_RETRY_S = 300.0  # the longest wait before a replica tries a version that failed to load


def sync(
    store: VersionStore,
    report: Callable[[list[str]], dict],
    keep: Callable[[list[str]], Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """One round of a replica with the board: report, drop what is no longer wanted (``keep``,
    by default the store's), load what is (a version whose load failed: after a growing wait),
    report again. Returns the board's last answer."""
    wanted = report(store.held())
    (keep or store.keep)(wanted["keep"])
    missing = [v for v in wanted["keep"] if v not in store.held()]
    for v in missing:
        next_try, failures = store.failed.get(v, (0.0, 0))
        if clock() < next_try or not store.admits(v):
            continue  # a version not held is never reported, so the board never serves it
        try:
            store.prepare(v)
        except Exception:  # tried again after 1, 2, 4 ... 300 s, not every tick for ever
            store.failed[v] = (clock() + min(2.0**failures, MAX_RETRY_S), failures + 1)
            raise
        store.failed.pop(v, None)
    return report(store.held()) if missing else wanted
