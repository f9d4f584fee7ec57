"""A change counter that event streams wait on.

The switcher bumps it whenever its state moves (a decision with effects, a load's progress, a
load or wake ending); readers of `/proxy/events` sleep on it instead of polling. A bump costs
an event set and a new event, and only happens off the common request path: admitting a
request to a ready model changes nothing the stream shows but its counts, which streams pick up
on their periodic refresh.
"""

from __future__ import annotations

import anyio


class Changes:
    __slots__ = ("_event", "version")

    def __init__(self) -> None:
        self.version = 0
        self._event = anyio.Event()

    def bump(self) -> None:
        self.version += 1
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self, seen: int, at_most: float) -> int:
        """The version once it differs from `seen`, or after `at_most` seconds whatever it is."""
        if self.version == seen:
            event = self._event
            with anyio.move_on_after(at_most):
                await event.wait()
        return self.version
