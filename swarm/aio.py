"""The event loops the library and the CLI run: uvloop's (libuv) wherever it is installed, asyncio's otherwise.

Every loop this project starts itself goes through :func:`run` or :func:`new_event_loop` (a stage peer, the
trainer, the bootstrap peer, ``swarm status``); hivemind starts its own loops in its DHT and averager processes,
already on uvloop. Nothing is installed globally: a program that imports the library keeps its own event loop
policy. Without uvloop (it does not build on Windows) both fall back to asyncio's loop, which the library also
runs on (the in-process tests do).
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a declared dependency where it builds
    uvloop = None

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's where available."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """:func:`asyncio.run` on a loop from :func:`new_event_loop`."""
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The running (or given) loop's class, e.g. ``uvloop.Loop`` or ``asyncio.unix_events._UnixSelectorEventLoop``."""
    loop = loop or asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__qualname__}"
