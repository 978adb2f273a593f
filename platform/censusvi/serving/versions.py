"""Model versions in a replica: local copies, a small cache of what was built from them, and the
ingress's loop that follows an alias (warm the new version everywhere, then switch)."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from censusvi.serving.settings import Settings, current_version

log = logging.getLogger("censusvi.serve")


class VersionCache:
    """Whatever ``load(version)`` builds, for the last ``capacity`` versions, built once each
    (threads asking together wait for one). Two: the version served and the one before it,
    which requests still under way finish on."""

    def __init__(self, load: Callable[[str], Any], capacity: int = 2) -> None:
        self.load, self.capacity = load, capacity
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, version: str) -> Any:
        with self.lock:
            if version not in self.items:
                self.items[version] = self.load(version)
                while len(self.items) > self.capacity:
                    self.items.popitem(last=False)
            self.items.move_to_end(version)
            return self.items[version]


class VersionFetcher:
    """A local copy of a version's files (a registry download), or the model directory given."""

    def __init__(self, s: Settings, part: str) -> None:
        self.s, self.part = s, part  # "model" or "index": what this replica reads
        self.tmp = tempfile.TemporaryDirectory(prefix="censusvi-serve-")

    def __call__(self, version: str):
        from censusvi.registry.versions import VersionFiles, fetch_version, parse_model_uri

        if not self.s.registered:
            return VersionFiles(self.s.model, "local", self.s.model, self.s.index)
        name = parse_model_uri(self.s.model)[0]
        dst, uri, part = f"{self.tmp.name}/{version}", self.s.tracking_uri, self.part
        return fetch_version(name, version, dst, uri, model=part == "model", index=part == "index")


class AliasFollower:
    """The version an ingress serves. With ``models:/NAME@ALIAS`` a daemon thread re-resolves the
    alias every ``registry_poll_s``; a new version is passed to ``warm`` (load it in every replica
    that reads it) and only then served, then ``on_switch`` is told."""

    def __init__(
        self,
        s: Settings,
        warm: Callable[[str], None],
        on_switch: Callable[[str], None],
        resolve: Callable[[Settings], str] = current_version,
    ) -> None:
        self.s, self.warm, self.on_switch, self.resolve = s, warm, on_switch, resolve
        self.version = resolve(s)
        if s.follows_alias:
            threading.Thread(target=self._follow, daemon=True).start()

    def poll(self) -> None:
        version = self.resolve(self.s)
        if version != self.version:
            self.warm(version)
            log.info("alias %s moved: serving version %s", self.s.model, version)
            self.version = version
            self.on_switch(version)

    def _follow(self) -> None:
        while True:
            time.sleep(self.s.registry_poll_s)
            try:
                self.poll()
            except Exception as e:  # the registry being briefly unreachable must not stop serving
                log.warning("registry poll failed (still serving %s): %s", self.version, e)
