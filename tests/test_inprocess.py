"""swarm.inprocess: hivemind's DHT and averagers as threads of this process (a stage peer is itself and its p2p
daemon), with pipes that pass objects by reference."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import torch
import uvloop
from hivemind.averaging.control import StepControl
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

from swarm.inprocess import InProcessDHT, InProcessGradientAverager, local_pipe
from swarm.network import create_dht


def _children() -> list:
    """(pid, command name) of this process's child processes, read from /proc."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == me:
            out.append((int(entry), name))
    return out


def test_local_pipe_passes_objects_by_reference_both_ways():
    host, worker = local_pipe()
    payload = {"tensor": torch.zeros(3)}
    host.send(("_method", [payload], {}))
    assert worker.poll(1.0)
    method, args, _ = worker.recv()
    assert method == "_method" and args[0] is payload  # the very object, not a copy
    assert not worker.poll()
    worker.send("back")
    assert host.recv() == "back"


def test_local_pipe_wakes_an_event_loop_and_a_blocked_reader_even_after_the_loop_made_it_non_blocking():
    host, worker = local_pipe()
    got = []

    async def serve():
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(worker.fileno(), ready.set)  # uvloop makes the descriptor non-blocking
        try:
            await asyncio.wait_for(ready.wait(), 5)
            while worker.poll():
                got.append(worker.recv())
        finally:
            loop.remove_reader(worker.fileno())

    threading.Timer(0.2, host.send, args=["first"]).start()
    uvloop.run(serve())
    assert got == ["first"]

    # a thread blocked in recv on the (now non-blocking) descriptor still waits for the next object
    out = []
    reader = threading.Thread(target=lambda: out.append(worker.recv()))
    reader.start()
    time.sleep(0.2)
    assert out == []
    host.send("second")
    reader.join(5)
    assert out == ["second"]

    # closing wakes a blocked reader with EOFError
    errors = []

    def read_until_closed():
        try:
            worker.recv()
        except EOFError as e:
            errors.append(e)

    reader = threading.Thread(target=read_until_closed)
    reader.start()
    host.close()
    reader.join(5)
    assert len(errors) == 1


def test_a_step_control_takes_the_same_trigger_futures_twice_but_not_others():
    trigger, cancel = (
        MPFuture(),
        MPFuture(),
    )  # (hivemind's backend must start with a plain MPFuture, not a subclass)
    step = StepControl(
        scheduled_time=get_dht_time() + 1,
        deadline=get_dht_time() + 10,
        allow_retries=True,
        weight=1.0,
        data_for_gather=b"",
    )
    step.attach(trigger, cancel)
    step.attach(trigger, cancel)  # the worker's and the host's attach, on one shared object
    with pytest.raises(AssertionError):
        step.attach(MPFuture(), cancel)
    step.allow_allreduce()
    step.cancel()


@pytest.mark.slow
def test_dht_is_a_thread_of_this_process_and_serves_another_node():
    before = {pid for pid, _ in _children()}
    policy = asyncio.get_event_loop_policy()
    first = create_dht("inproc")
    second = create_dht("inproc", [str(a) for a in first.get_visible_maddrs()])
    try:
        assert isinstance(first, InProcessDHT) and first.is_alive() and first.pid is None
        new = [name for pid, name in _children() if pid not in before]
        assert sorted(new) == ["p2pd", "p2pd"], new  # one p2p daemon per node and nothing else: no forked DHT
        # a future made in this (the main) thread, whose loop is idle, is set by the DHT's thread: hivemind's MPFuture
        # would try to run this idle loop inside the DHT's running one and never wake us
        assert first.store("key", 7, get_dht_time() + 60)
        found = second.get("key", latest=True)
        assert found is not None and found.value == 7
        assert first.peer_id != second.peer_id
        assert asyncio.get_event_loop_policy() is policy  # nothing installed process-wide
    finally:
        second.shutdown()
        first.shutdown()
    assert not first.is_alive() and not second.is_alive()
    deadline = time.monotonic() + 10
    while {pid for pid, _ in _children()} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {pid for pid, _ in _children()} - before, "a p2p daemon outlived its node"


@pytest.mark.slow
def test_two_averagers_in_threads_average_without_a_process_and_leave_the_loop_policy_alone():
    policy = asyncio.get_event_loop_policy()
    first = create_dht("inproc-avg")
    second = create_dht("inproc-avg", [str(a) for a in first.get_visible_maddrs()])
    before = {pid for pid, _ in _children()}
    params = [torch.nn.Parameter(torch.full((4,), float(v))) for v in (1.0, 3.0)]
    averagers = []
    try:
        for dht, param in zip((first, second), params):
            param.grad = param.detach().clone()
            averagers.append(
                InProcessGradientAverager(
                    [param],
                    dht=dht,
                    prefix="inproc",
                    target_group_size=2,
                    min_matchmaking_time=1.0,
                    start=True,
                )
            )
        assert all(a.is_alive() and a.pid is None for a in averagers)
        assert {pid for pid, _ in _children()} == before  # no forked averager
        for averager in averagers:
            averager.accumulate_grads_(batch_size=1)
        controls = [a.step(wait=False, timeout=30) for a in averagers]
        for control in controls:
            control.result(30)
        for averager, param in zip(averagers, params):
            with averager.use_averaged_gradients():
                assert torch.allclose(param.grad, torch.full((4,), 2.0)), param.grad
        assert asyncio.get_event_loop_policy() is policy
    finally:
        for averager in averagers:
            averager.shutdown()
        second.shutdown()
        first.shutdown()
    assert not any(a.is_alive() for a in averagers)
