"""Session affinity through the session tracker (claims 31-32, 50).

A higher-level session (the router's affinity cookie, an application's own
session cookie, a TLS session id) maps to a host. The map lives in the
distributed session tracker as ``session_key(kind, value) -> host``, so that
every router instance honours a session another one started, also after that
one died; a small LRU cache in front of it answers most lookups locally.

Writes do not hold up the response: ``record`` updates the cache at once and
inserts into the tracker in a background task (acknowledged by one replica,
``ACK_ONE``). Lookups that miss the cache wait for the tracker at most
``timeout`` seconds; a session the tracker cannot answer for is treated as
unknown (the request is balanced anew and gets a new cookie). Without a
tracker the map is local to this router.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict

from ..tracker.client import AsyncTrackerClient
from ..tracker.entry import Entry, session_key
from ..tracker.messages import ACK_ONE

__all__ = ["AffinityTable"]


class AffinityTable:
    def __init__(
        self,
        tracker: AsyncTrackerClient | None,
        counters: Counter[str],
        *,
        cache_size: int = 100_000,
        timeout: float = 0.5,
    ) -> None:
        self.tracker = tracker
        self.counters = counters
        self.cache_size = cache_size
        self.timeout = timeout
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def key(kind: str, value: str) -> str:
        return session_key(kind, value)

    def cached(self, key: str) -> str | None:
        host = self._cache.get(key)
        if host is not None:
            self._cache.move_to_end(key)
        return host

    async def lookup(self, key: str) -> str | None:
        """The host of session ``key``: from the cache, else from the tracker, else None."""
        host = self.cached(key)
        if host is not None:
            self.counters["affinity_cache_hits"] += 1
            return host
        if self.tracker is None:
            self.counters["affinity_unknown"] += 1
            return None
        self.counters["affinity_tracker_queries"] += 1
        try:
            found = await asyncio.wait_for(self.tracker.query([key]), self.timeout)
        except (TimeoutError, RuntimeError, ConnectionError):
            self.counters["affinity_tracker_failures"] += 1
            return None
        entry = found.get(key)
        if entry is None:
            self.counters["affinity_unknown"] += 1
            return None
        self.counters["affinity_tracker_hits"] += 1
        self._put(key, entry.host)
        return entry.host

    def record(self, key: str, host: str) -> None:
        """Remember ``key -> host`` here at once and in the tracker in the background."""
        self._put(key, host)
        self.counters["affinity_recorded"] += 1
        if self.tracker is not None:
            task = asyncio.create_task(self._insert(key, host))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    @property
    def pending(self) -> int:
        """Tracker inserts still in flight."""
        return len(self._tasks)

    async def _insert(self, key: str, host: str) -> None:
        assert self.tracker is not None
        try:
            failed = await self.tracker.insert([Entry(key, host)], ACK_ONE)
        except (RuntimeError, ConnectionError):
            failed = [key]
        if failed:
            self.counters["affinity_tracker_insert_failures"] += 1
        else:
            self.counters["affinity_tracker_inserts"] += 1

    def _put(self, key: str, host: str) -> None:
        cache = self._cache
        if key in cache:
            cache[key] = host
            cache.move_to_end(key)
        else:
            cache[key] = host  # a new key goes last
        while len(cache) > self.cache_size:
            cache.popitem(last=False)

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            self._tasks.clear()
