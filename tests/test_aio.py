"""swarm.aio: the loops the library and the CLI start are uvloop's, without changing anyone's global policy, and fall
back to asyncio's where uvloop is missing. (A live stage peer reports its loop: tests/test_local_swarm.py.)"""

from __future__ import annotations

import asyncio
import threading

import uvloop

from swarm import aio


async def _running_loop():
    await asyncio.sleep(0)
    return asyncio.get_running_loop()


def test_run_and_new_event_loop_are_uvloop():
    loop = aio.run(_running_loop())
    assert isinstance(loop, uvloop.Loop) and aio.loop_name(loop) == "uvloop.Loop"
    fresh = aio.new_event_loop()
    try:
        assert isinstance(fresh, uvloop.Loop)
        assert isinstance(fresh.run_until_complete(_running_loop()), uvloop.Loop)
    finally:
        fresh.close()
    # nothing installed globally: asyncio.run still gives asyncio's own loop
    assert not isinstance(asyncio.run(_running_loop()), uvloop.Loop)


def test_what_the_library_does_on_its_loop_works_on_uvloop():
    """Executor work, thread-safe callbacks and signal-free shutdown, as a stage peer uses them."""

    async def main():
        loop = asyncio.get_running_loop()
        in_thread = await loop.run_in_executor(
            None, lambda: threading.current_thread() is not threading.main_thread()
        )
        done = loop.create_future()
        threading.Thread(target=lambda: loop.call_soon_threadsafe(done.set_result, 7)).start()
        return in_thread, await asyncio.wait_for(done, 5), aio.loop_name()

    assert aio.run(main()) == (True, 7, "uvloop.Loop")


def test_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setattr(aio, "uvloop", None)
    loop = aio.run(_running_loop())
    assert not isinstance(loop, uvloop.Loop) and isinstance(loop, asyncio.AbstractEventLoop)
    fresh = aio.new_event_loop()
    try:
        assert not isinstance(fresh, uvloop.Loop)
    finally:
        fresh.close()
