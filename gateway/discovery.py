"""What runs on the bus, as the gateway sees it: a small cache over `$SRV.INFO`."""

from __future__ import annotations

import time
from collections.abc import Iterable

import anyio

from bus.client import Bus

FRESH_S = 2.0


class RunningNames:
    """Names of running specialists, gathered at most every ``FRESH_S`` seconds unless a name is asked
    for that the cache does not have (then gathered again once)."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self._names: set[str] = set()
        self._at = 0.0

    async def names(self, need: Iterable[str] = (), *, refresh: bool = False) -> set[str]:
        stale = time.monotonic() - self._at > FRESH_S
        if refresh or stale or not set(need) <= self._names:
            self._names = set(await self.bus.running_names())
            self._at = time.monotonic()
        return self._names

    async def keep_fresh(self) -> None:
        """Refresh in the background, so a request never waits for a gather of names it knows."""
        while True:
            await self.names(refresh=True)
            await anyio.sleep(FRESH_S / 2)
