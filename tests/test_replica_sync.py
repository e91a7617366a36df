"""Keeping a stage replica in step without believing any one peer (swarm.replica_sync): quorum progress and the
checks of a downloaded state, as pure logic."""

import time

import hivemind
import torch
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils.timed_storage import ValueWithExpiration

from swarm.replica_sync import (
    QuorumProgressTracker,
    param_sketch,
    quorum_epoch,
    sketch_distance,
    state_verdict,
)


def test_quorum_epoch_needs_a_majority_of_the_others():
    assert quorum_epoch(5, []) == 5
    assert quorum_epoch(5, [1000, 5]) == 5  # a lone liar among 3
    assert quorum_epoch(5, [6, 6]) == 6  # both others are ahead: this replica is behind
    assert quorum_epoch(5, [6]) == 6  # 2 replicas: the partner alone decides (no quorum possible)
    assert quorum_epoch(5, [1000, 1000, 5, 5, 5]) == 5
    assert quorum_epoch(7, [3, 3]) == 7  # never below its own


def test_progress_tracker_ignores_a_lone_far_ahead_claim_and_caps_sample_counts():
    tracker = QuorumProgressTracker.__new__(QuorumProgressTracker)  # the parsing only, no DHT or thread
    tracker.local_progress = LocalTrainingProgress(
        peer_id=b"me",
        epoch=5,
        samples_accumulated=8,
        samples_per_second=1.0,
        time=time.time(),
        client_mode=False,
    )
    tracker.target_batch_size, tracker.min_refresh_period, tracker.max_refresh_period = 64, 0.5, 1.0
    tracker.expected_drift_peers, tracker.expected_drift_rate = 3, 0.2
    tracker.performance_ema = hivemind.utils.PerformanceEMA(alpha=0.1)
    tracker.status_loglevel, tracker.prefix, tracker.default_refresh_period = 10, "test", 1.0
    tracker.is_alive = lambda: False  # never started (its __del__ asks)

    def record(peer: bytes, epoch: int, samples: int):
        value = LocalTrainingProgress(
            peer_id=peer,
            epoch=epoch,
            samples_accumulated=samples,
            samples_per_second=1.0,
            time=time.time(),
            client_mode=False,
        ).dict()
        return ValueWithExpiration(value, time.time() + 60)

    progress = tracker._parse_swarm_progress_data(
        {b"me": record(b"me", 5, 8), b"a": record(b"a", 5, 8), b"liar": record(b"liar", 1000, 10**6)}
    )
    assert progress.epoch == 5 and progress.samples_accumulated == 16
    progress = tracker._parse_swarm_progress_data(
        {b"me": record(b"me", 5, 8), b"a": record(b"a", 5, 8), b"liar": record(b"liar", 5, 10**6)}
    )
    assert (
        progress.epoch == 5 and progress.samples_accumulated == 8 + 8 + 16
    )  # the liar counts as 2x the median
    progress = tracker._parse_swarm_progress_data(
        {b"me": record(b"me", 5, 8), b"a": record(b"a", 6, 8), b"b": record(b"b", 6, 0)}
    )
    assert progress.epoch == 6  # both others moved on: this replica is behind


def test_sketch_estimates_relative_distance_and_depends_on_the_seed():
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(300, 70, generator=gen), torch.randn(5000, generator=gen)]
    near = [p + 0.01 * torch.randn(p.shape, generator=gen) for p in params]
    seed = 12345
    base = param_sketch(params, seed, 16)
    assert sketch_distance(param_sketch(params, seed, 16), base) == 0.0
    assert sketch_distance(param_sketch(near, seed, 16), base) < 0.05
    assert 3.0 < sketch_distance(param_sketch([5 * p for p in params], seed, 16), base) < 5.5
    assert sketch_distance(param_sketch(params, seed + 1, 16), base) > 0.5  # another seed, another sketch
    assert sketch_distance(base, base[:8]) == float("inf")
    assert sketch_distance([float("nan")] * 16, base) == float("inf")


def test_state_verdict_is_a_quorum_of_the_other_replicas():
    assert state_verdict([0.01, 0.02], 0.25)[0]
    assert not state_verdict([4.0, 4.0], 0.25)[0]  # a poisoned source: every other replica disagrees
    assert state_verdict([0.01, 4.0], 0.25)[0]  # one other replica lies about its own weights: still accepted
    assert not state_verdict([4.0], 0.25)[0]
    ok, why = state_verdict([], 0.25)
    assert ok and "no quorum" in why


def test_a_state_not_ahead_of_this_replica_must_match_its_own_weights():
    """At a swarm's start every replica is initialised alike from the seed, and the only replica online may be a
    poisoner, with no quorum to ask: a downloaded state whose epoch is not ahead of this replica's is held against
    this replica's own parameters (x5 refused; an identical one goes on to the usual quorum check)."""
    import asyncio
    import threading

    from swarm.config import model_preset
    from swarm.optimizer import OptimizerConfig
    from swarm.stage_server import StageServer, StageServerConfig

    server = StageServer(
        StageServerConfig(run_id="own", stage=0, num_stages=2),
        model_preset("tiny", num_layers=2),
        None,
        OptimizerConfig(averaging=False),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server._loop = loop
    try:
        params = [p.detach().clone() for p in server.module.parameters()]
        why = server._check_state("QmPoisoner", 0, [5 * p for p in params])
        assert why is not None and "not ahead" in why
        assert (
            server._check_state("QmHonest", 0, params) is None
        )  # no quorum reachable here: accepted, and said so
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
