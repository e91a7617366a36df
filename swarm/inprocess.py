"""hivemind's DHT and averagers as threads of the peer's own process, not forked processes (lean peers).

hivemind runs its DHT node and each averager as a forked ``multiprocessing.Process`` that the host talks to through a
pipe: a stage peer was the peer, a DHT, a gradient and a state averager, and the p2p daemon, each fork with its own
copy of the interpreter's heap (copy-on-write pages that Python's reference counting soon dirties). Here the same
hivemind code runs in threads of the peer's process, so a peer is two processes: itself and its p2p daemon.

Only how the worker is started and how the host reaches it change:

- :class:`LocalPipe` stands in for ``multiprocessing.Pipe``: the same ``send``/``recv``/``poll``/``fileno``, but
  objects pass by reference. That matters beyond speed: an ``MPFuture`` pickled through a real pipe and set in the
  *same* process would be a copy, and its waiter would wait forever. One object hivemind does mutate on both sides:
  an averaging round's ``StepControl`` gets the same trigger futures attached by the worker and by the host, which
  is allowed here (:func:`_attach`).
- :class:`InProcessWorker` is mixed in before a hivemind process class: ``start`` runs ``run`` in a daemon thread,
  and ``is_alive``/``join``/``terminate``/``pid`` answer for that thread (``pid`` is None: hivemind's "not from inside
  the worker" checks compare it with ``os.getpid()``).
- :class:`InProcessDHT` serves its commands on its own event loop in its thread (hivemind's ``DHT.run`` sets a
  signal handler, which only the main thread may do), and gives each event loop of the process its own replica of
  the p2p daemon's client (a replica's streams belong to the loop that opened them; in hivemind each process had one
  loop).
- Averagers (:class:`InProcessAveraging`) run hivemind's own loop (``_run_internal``) with their pipes swapped
  before they start. hivemind's averager installs uvloop as the process-wide event loop policy when its thread
  starts, which in a forked process touched nobody; here a worker thread gets a uvloop loop of its own and the
  policy is left alone.
- An ``MPFuture`` set by a worker thread wakes awaiters in an idle loop directly (:func:`_set_event_threadsafe`).

What the threads cost: they share the peer's GIL. The DHT and the averagers mostly wait on sockets, and the heavy
parts of a round (torch ops, serialization of large buffers) release the GIL; the throughput benchmark measures the
difference (``experiments/throughput``). ``create_dht(in_process=False)`` keeps hivemind's forked DHT.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing as mp
import os
import select
import threading
import weakref
from typing import Any, Optional, Tuple

import hivemind
import hivemind.averaging.averager as hivemind_averager
import torch
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.control import StepControl
from hivemind.dht.node import DHTNode
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import P2P
from hivemind.utils.mpfuture import MPFuture

from swarm import aio

logger = logging.getLogger(__name__)


class _Channel:
    """One direction of a :class:`LocalPipe`: a queue of objects and an OS pipe with one byte per queued object, so
    that an event loop can wait on ``fileno()`` and a thread can block in ``get``."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        self.closed = False

    def put(self, obj: Any) -> None:
        if self.closed:
            raise OSError("the pipe is closed")
        with self._lock:
            self._items.append(obj)
            os.write(self._write_fd, b"\0")

    def get(self) -> Any:
        while True:  # blocks until an object (or the closing wake-up) is there
            try:
                os.read(self._read_fd, 1)
                break
            except BlockingIOError:  # an event loop watching this descriptor made it non-blocking
                select.select([self._read_fd], [], [])
        with self._lock:
            if not self._items:
                raise EOFError("the pipe was closed")
            return self._items.popleft()

    def ready(self, timeout: Optional[float]) -> bool:
        """Whether ``get`` would return at once (its byte is written after the object is queued)."""
        readable, _, _ = select.select([self._read_fd], [], [], timeout)
        return bool(readable)

    def close(self) -> None:
        """Wake a blocked reader (it gets EOFError once the queue is empty); the descriptors go with the object."""
        if not self.closed:
            self.closed = True
            try:
                os.write(self._write_fd, b"\0")
            except OSError:
                pass

    def __del__(self):
        for fd in (getattr(self, "_read_fd", None), getattr(self, "_write_fd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class LocalPipe:
    """One end of an in-process pipe with ``multiprocessing.Connection``'s methods that hivemind uses."""

    def __init__(self, inbox: _Channel, outbox: _Channel):
        self._inbox, self._outbox = inbox, outbox

    def send(self, obj: Any) -> None:
        self._outbox.put(obj)

    def recv(self) -> Any:
        return self._inbox.get()

    def poll(self, timeout: Optional[float] = 0.0) -> bool:
        return self._inbox.ready(timeout)

    def fileno(self) -> int:
        return self._inbox._read_fd

    def close(self) -> None:
        self._outbox.close()


def local_pipe() -> Tuple[LocalPipe, LocalPipe]:
    """Two connected ends (duplex; a one-way user simply sends on one end and receives on the other)."""
    one, two = _Channel(), _Channel()
    return LocalPipe(one, two), LocalPipe(two, one)


_worker_thread = threading.local()  # .active: this thread runs an in-process worker


class InProcessWorker:
    """Mixed in before a hivemind ``multiprocessing.Process`` class: runs the worker in a thread of this process."""

    _thread: Optional[threading.Thread] = None

    def _swap_pipes(self) -> None:
        """Replace the worker's ``multiprocessing`` pipe pair by an in-process one (before anyone uses it)."""
        self._inner_pipe, self._outer_pipe = local_pipe()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("an in-process worker can only be started once")
        if not isinstance(self._inner_pipe, LocalPipe):
            self._swap_pipes()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"swarm-{type(self).__name__}", daemon=True
        )
        self._thread.start()

    def _thread_main(self) -> None:
        _worker_thread.active = True
        try:
            self.run()
        except BaseException:
            logger.exception(f"{type(self).__name__} stopped with an error")

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def terminate(self) -> None:
        """A thread cannot be killed: it is a daemon thread and ends with the process."""
        if self.is_alive():
            logger.warning(f"{type(self).__name__} did not stop in time; it ends with this process")

    kill = terminate

    def close(self) -> None:
        pass

    @property
    def pid(self) -> None:
        """No process of its own (hivemind refuses calls from "inside" a worker by comparing its pid with ours)."""
        return None

    @property
    def exitcode(self) -> Optional[int]:
        return None if self.is_alive() or self._thread is None else 0


def _thread_event_loop() -> asyncio.AbstractEventLoop:
    """hivemind's averager thread asks for a fresh loop with ``switch_to_uvloop``, which installs uvloop's policy
    process-wide; a worker thread here gets a uvloop loop of its own instead (a forked worker still gets hivemind's)."""
    if getattr(_worker_thread, "active", False):
        loop = aio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop
    return _hivemind_switch_to_uvloop()


# hivemind shares tensors between its processes with torch's "file_system" strategy, whose first shared tensor starts
# torch's shared-memory manager, one more process per peer. In one process nothing needs sharing; "file_descriptor"
# works without a manager (and still across processes, for a forked DHT). HIVEMIND_MEMORY_SHARING_STRATEGY, where
# set, still decides, as it does in hivemind.
if "HIVEMIND_MEMORY_SHARING_STRATEGY" not in os.environ:
    torch.multiprocessing.set_sharing_strategy("file_descriptor")

_hivemind_switch_to_uvloop = hivemind_averager.switch_to_uvloop
hivemind_averager.switch_to_uvloop = _thread_event_loop


def _set_event_threadsafe(future: MPFuture) -> None:
    """hivemind's ``MPFuture`` wakes its awaiters by running the loop it was made in, when that loop is idle, in the
    thread that sets it: in a forked worker that thread is the host's update thread, which runs no loop; here it is
    the worker's, which runs its own, and asyncio refuses to run a second loop there. Setting the event directly is
    what running that loop would do."""
    loop = future._loop
    if loop is not None and not loop.is_closed() and not loop.is_running():
        future._aio_event.set()
    else:
        _hivemind_set_event_threadsafe(future)


_hivemind_set_event_threadsafe = MPFuture._set_event_threadsafe
MPFuture._set_event_threadsafe = _set_event_threadsafe


def _attach(step: StepControl, trigger: MPFuture, cancel: MPFuture) -> None:
    """An averaging round's ``StepControl`` crosses the pipe: hivemind's worker attaches its trigger futures to its
    copy, and the host attaches the same futures to its own. Through a :class:`LocalPipe` both hold one object, so the
    host's attach finds them attached already; the same futures twice is that case, anything else still an error."""
    if step._trigger is trigger and step._cancel is cancel:
        return
    _hivemind_attach(step, trigger, cancel)


_hivemind_attach = StepControl.attach
StepControl.attach = _attach


class InProcessDHT(InProcessWorker, hivemind.DHT):
    """``hivemind.DHT`` served by a thread of this process (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self._replicas: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, P2P]" = (
            weakref.WeakKeyDictionary()
        )
        self._replicas_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        loop = aio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        finally:
            pending = asyncio.all_tasks(loop)  # the node's background tasks, after it shut down
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        try:
            p2p = None
            if self._daemon_listen_maddr is not None:
                p2p = await P2P.replicate(self._daemon_listen_maddr)
            self._node = await DHTNode.create(
                initial_peers=self.initial_peers,
                num_workers=self.num_workers,
                record_validator=self._record_validator,
                p2p=p2p,
                **self.kwargs,
            )
        except Exception as e:
            logger.debug(e, exc_info=True)
            self._ready.set_exception(e)
            return
        self._peer_id = self._node.peer_id  # asked for often, never changes: no round trip through the pipe
        self._ready.set_result(None)

        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._inner_pipe.fileno(), wake.set)
        tasks = set()
        try:
            while True:
                await wake.wait()
                wake.clear()
                while self._inner_pipe.poll():
                    try:
                        method, args, kwargs = self._inner_pipe.recv()
                    except EOFError:
                        return
                    except Exception as e:  # as hivemind's DHT process: log it and keep serving
                        logger.exception(f"the DHT's command pipe failed: {e!r}")
                        break
                    task = asyncio.create_task(getattr(self, method)(*args, **kwargs))
                    if method == "_shutdown":
                        await task
                        return
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            loop.remove_reader(self._inner_pipe.fileno())

    async def replicate_p2p(self) -> P2P:
        """A client of this node's p2p daemon for the calling event loop (one per loop, made on first use)."""
        loop = asyncio.get_running_loop()
        with self._replicas_lock:
            replica = self._replicas.get(loop)
        if replica is None:
            maddr = await self.run_coroutine(hivemind.DHT._get_p2p_daemon_listen_maddr, return_future=True)
            replica = await P2P.replicate(maddr)
            with self._replicas_lock:
                replica = self._replicas.setdefault(
                    loop, replica
                )  # another task of this loop may have made one
        return replica


class InProcessAveraging(InProcessWorker):
    """Mixed in before a hivemind averager class: the averager runs in a thread of this process.

    A subclass that sets ``in_process = False`` (and takes ``multiprocessing.Process``'s own process methods back, as
    :class:`Forked` does) keeps hivemind's forked process: the averaging benchmark runs every replica so, one process
    each, as replicas on different machines would."""

    in_process = True

    def __init__(self, *args, start: bool = False, **kwargs):
        if not self.in_process:
            super().__init__(*args, start=start, **kwargs)
            return
        super().__init__(*args, start=False, **kwargs)
        old_inner = self._inner_pipe
        self._swap_pipes()
        # hivemind's __init__ started a host thread that serves the averager's state requests on the old pipe: stop
        # it (it exits on this message) and serve on the new one
        old_inner.send(("_SHUTDOWN", None))
        threading.Thread(
            target=hivemind_averager._background_thread_fetch_current_state,
            args=[self.serializer, self._outer_pipe, weakref.WeakMethod(self.get_current_state)],
            name=f"swarm-{type(self).__name__}-state",
            daemon=True,
        ).start()
        if start:
            self.run_in_background(await_ready=True)

    def run(self) -> None:
        """hivemind's ``run`` starts yet another thread for ``_run_internal`` (a fix for OpenMP after a fork); here
        the worker's thread is already a fresh one."""
        self._run_internal()


class InProcessGradientAverager(InProcessAveraging, GradientAverager):
    """hivemind's plain gradient averager (its weighted mean), in a thread."""


class Forked:
    """Mixed in first: a hivemind process class that :class:`InProcessWorker` made a thread is a forked process again."""

    in_process = False
    start = mp.Process.start
    is_alive = mp.Process.is_alive
    join = mp.Process.join
    terminate = mp.Process.terminate
    kill = mp.Process.kill
    close = mp.Process.close
    pid = mp.Process.pid
    exitcode = mp.Process.exitcode
    run = DecentralizedAverager.run
