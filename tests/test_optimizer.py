"""Integration: two replicas of one stage optimizer, on two real DHT nodes on 127.0.0.1."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from swarm.network import create_dht
from swarm.optimizer import OptimizerConfig, StageOptimizer

pytestmark = pytest.mark.slow


def _replica(dht, seed: int) -> StageOptimizer:
    torch.manual_seed(seed)
    module = torch.nn.Linear(4, 4)
    cfg = OptimizerConfig(
        lr=0.1,
        target_batch_size=4,
        matchmaking_time_s=0.5,
        averaging_timeout_s=3.0,
        load_state_timeout_s=20.0,
    )
    return StageOptimizer(module, cfg, dht, run_id="otest_stage0")


def _step(replica: StageOptimizer) -> None:
    loss = replica.module(torch.randn(4, 4)).square().mean()
    loss.backward()
    replica.step(batch_size=4)


def test_replica_that_missed_steps_catches_up_without_work():
    first = create_dht("otest")
    second = create_dht("otest", initial_peers=[str(a) for a in first.get_visible_maddrs()])
    sigint = signal.getsignal(signal.SIGINT)
    a, b = _replica(first, 0), _replica(second, 1)
    # hivemind's averagers ignore SIGINT in the calling process; the stage optimizer puts the handler back, or Ctrl-C
    # would stop working here and in every process started from here afterwards
    assert signal.getsignal(signal.SIGINT) is sigint
    try:
        assert not b.should_catch_up()
        deadline = time.monotonic() + 60
        while a.epoch < 1:
            assert time.monotonic() < deadline, "replica a never stepped"
            _step(a)
        while b.epochs_behind < 1:  # b learns of a's progress through the DHT
            assert time.monotonic() < deadline, f"b never saw a's epoch {a.epoch}"
            time.sleep(0.2)
        # one behind is the normal lag right after a partner stepped: tolerated for a whole averaging round
        round_s = b.cfg.matchmaking_time_s + b.cfg.averaging_timeout_s
        assert not b.should_catch_up(now=b.last_step_at + round_s - 0.1)
        assert b.should_catch_up(now=b.last_step_at + round_s + 0.1)
        while a.epoch < 3:  # the only replica with work steps on its own (no partner to average with)
            assert time.monotonic() < deadline, "replica a never stepped"
            _step(a)
        while b.epochs_behind < 2:
            assert time.monotonic() < deadline, f"b never saw a's epoch {a.epoch}"
            time.sleep(0.2)
        assert b.epoch == 0 and b.should_catch_up()
        assert b.load_state_from_peers()
        assert b.epoch == a.epoch and b.epochs_behind == 0 and not b.should_catch_up()
        for pa, pb in zip(a.module.parameters(), b.module.parameters()):
            assert torch.equal(pa, pb)
        # a replica serves one caller a state at most every DOWNLOAD_COOLDOWN_S: asked again at once, it refuses
        # (a peer that claims to be far behind cannot make its partners upload their whole state in a loop)
        while a.epoch < 4:
            _step(a)
        b.load_state_from_peers()
        assert b.epoch == 3 < a.epoch
    finally:
        a.shutdown(), b.shutdown()
        second.shutdown(), first.shutdown()


def test_without_averaging_a_replica_is_never_behind():
    cfg = OptimizerConfig(lr=0.1, target_batch_size=4, averaging=False)
    local = StageOptimizer(torch.nn.Linear(2, 2), cfg, None, run_id="unused")
    assert local.epochs_behind == 0 and not local.should_catch_up(now=time.monotonic() + 1e6)


def test_a_replica_holds_the_weights_of_the_epoch_before_its_last_update():
    """An auditor recomputes another replica's tensor with the weights that replica used, which may be one step
    behind its own: the optimizer keeps the previous epoch's weights (a copy taken before each update), and no
    older ones."""
    torch.manual_seed(0)
    cfg = OptimizerConfig(lr=0.1, target_batch_size=4, averaging=False)
    local = StageOptimizer(torch.nn.Linear(4, 4), cfg, None, run_id="unused")
    assert local.weights_at(0) == {} and local.weights_at(1) is None
    before = {n: p.detach().clone() for n, p in local.module.named_parameters()}
    _step(local)
    assert local.epoch == 1 and local.weights_at(1) == {}
    held = local.weights_at(0)
    assert set(held) == set(before) and all(torch.equal(held[n], before[n]) for n in before)
    assert not torch.equal(local.module.weight, before["weight"])
    _step(local)
    assert local.weights_at(0) is None and local.weights_at(1) is not None and local.weights_at(2) == {}


def test_a_lone_replica_never_searches_for_an_averaging_group():
    """With no other replica in its stage, hivemind would still pre-schedule a gradient round before every step and
    cancel it at the step, its matchmaking polling the DHT the whole time (the largest control cost of a 2 x 1
    swarm, experiments/throughput). A lone replica starts no round at all and still steps."""
    dht = create_dht("otest-lone")
    replica = _replica(dht, 0)
    started = []

    def spy(averager, name):
        real = getattr(averager, name)

        def call(*args, **kwargs):
            # the state averager's step also applies the local optimizer step: only a round with others counts
            if name != "step" or averager is replica.opt.grad_averager or kwargs.get("averaging_round"):
                started.append((type(averager).__name__, name))
            return real(*args, **kwargs)

        setattr(averager, name, call)

    for averager in (replica.opt.grad_averager, replica.opt.state_averager):
        spy(averager, "schedule_step"), spy(averager, "step")
    try:
        deadline = time.monotonic() + 60
        while replica.epoch < 3:
            assert time.monotonic() < deadline, "the lone replica never stepped"
            _step(replica)
            # let the progress tracker run between micro-batches, as it does in a stage server
            time.sleep(0.05)
        assert replica.opt.tracker.global_progress.num_peers <= 1
        assert started == [], started
        # hivemind's steps hold the previous epoch's weights too
        held = replica.weights_at(replica.epoch - 1)
        assert held and not torch.equal(held["weight"], replica.module.weight)
    finally:
        replica.shutdown()
        dht.shutdown()
