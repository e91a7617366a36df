"""Byzantine-tolerant averaging (swarm.averaging): the aggregation rule, quorum progress and state checks as pure
logic; then hivemind averagers in this process, on a real DHT on 127.0.0.1, with one attacker among three."""

import asyncio
import concurrent.futures
import signal
import time
from types import SimpleNamespace
from typing import Optional

import hivemind
import pytest
import torch
from hivemind.averaging.averager import DecentralizedAverager

from peers.adversary import AttackConfig, AveragingAdversary
from swarm.aggregator_check import RoundInputs
from swarm.averaging import (
    AveragingConfig,
    RobustAveraging,
    RobustGradientAverager,
    RobustPartReducer,
    robust_aggregate,
    slice_outliers,
)

CFG = AveragingConfig()


def honest(n: int, dim: int = 4000, noise: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    true = torch.randn(dim, generator=gen)
    return true, [true + noise * torch.randn(dim, generator=gen) for _ in range(n)]


def cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0))


@pytest.mark.parametrize(
    "attack", [lambda g: -20 * g, lambda g: 1000 * torch.randn_like(g), lambda g: 0 * g + 50, lambda g: -g]
)
@pytest.mark.parametrize("n", [3, 5, 8])
def test_centered_clip_tolerates_a_minority_of_attackers(n, attack):
    """floor((n-1)/2) attackers sending the same poison: the aggregate stays close to the honest mean."""
    true, parts = honest(n)
    byz = (n - 1) // 2
    mean_honest = torch.stack(parts[byz:]).mean(0)
    poisoned = [attack(p) for p in parts[:byz]] + parts[byz:]
    robust = robust_aggregate(poisoned, CFG).result
    plain = torch.stack(poisoned).mean(0)
    honest_spread = torch.stack([(p - mean_honest).norm() for p in parts[byz:]]).max()
    assert (robust - mean_honest).norm() <= 1.5 * honest_spread, n
    assert cos(robust, true) > 0.8
    if n >= 5 or attack(torch.ones(1)).abs().max() > 5:  # plain averaging is ruined by the same attack
        assert (plain - mean_honest).norm() > (robust - mean_honest).norm()


def test_outliers_are_judged_over_a_slice():
    _, parts = honest(3)
    sq = [float(p.norm()) ** 2 for p in parts]
    assert slice_outliers(sq, CFG) == [False, False, False]
    assert slice_outliers(sq[:2] + [400 * sq[2]], CFG) == [False, False, True]  # x20
    assert slice_outliers([1.0, 9.0, 0.5], CFG) == [
        False,
        False,
        False,
    ]  # 3x noisier: one micro-batch against ten
    assert slice_outliers([1.0], CFG) == [False]


def test_two_replicas_bound_the_norm_of_a_scaled_contribution():
    """With 2 replicas the rule cannot tell who is honest; what it guarantees is the norm bound."""
    true, (good, _) = honest(2)
    out = robust_aggregate([good, -20 * good], CFG)
    assert out.result.norm() <= good.norm() * (1 + CFG.norm_bound) / 2 + 1e-4
    assert slice_outliers([v * v for v in out.norms], CFG) == [
        False,
        True,
    ]  # its partner reports it (alone: no verdict)


def test_mean_aggregator_is_the_plain_mean():
    _, parts = honest(3)
    cfg = AveragingConfig(aggregator="mean")
    assert torch.allclose(robust_aggregate(parts, cfg).result, torch.stack(parts).mean(0))


def test_reducer_ignores_claimed_weights_and_excluded_senders():
    """hivemind's reducer weighs by claimed batch size: here a claim of 1000x changes nothing, and a blacklisted
    sender's part is left out."""
    _, parts = honest(3, dim=64)

    async def reduce(weights, excluded=()):
        reducer = RobustPartReducer([parts[0].shape], 3, CFG, excluded=excluded)
        out = await asyncio.gather(
            *(reducer.accumulate_part(i, 0, p, weight=w) for i, (p, w) in enumerate(zip(parts, weights)))
        )
        return out[0]

    equal = asyncio.run(reduce([1.0, 1.0, 1.0]))
    assert torch.allclose(asyncio.run(reduce([1.0, 1.0, 1000.0])), equal)
    without = asyncio.run(reduce([1.0, 1.0, 1.0], excluded=[2]))
    assert torch.allclose(without, robust_aggregate(parts[:2], CFG).result)
    assert not torch.allclose(without, equal)


def test_config_from_a_record_falls_back_to_defaults():
    assert AveragingConfig.from_dict({"clip_radius": 2.0}).clip_radius == 2.0
    assert AveragingConfig.from_dict({"clip_radius": -1}) == AveragingConfig()
    assert AveragingConfig.from_dict({"bogus": 1}) == AveragingConfig()
    assert AveragingConfig.from_dict("nonsense") == AveragingConfig()
    assert AveragingConfig.from_dict({"clip_radius": float("inf")}) == AveragingConfig()
    assert AveragingConfig.from_dict({"verify_rate": float("nan")}) == AveragingConfig()
    with pytest.raises(ValueError):
        AveragingConfig(aggregator="median-of-means")


# ---- live averagers ----------------------------------------------------------------------------------------------
def _averagers(attack: str, n: int = 3, dim: int = 6000, cfg: AveragingConfig = CFG):
    dht0 = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [dht0] + [
        hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht0.get_visible_maddrs()
        )
        for _ in range(n - 1)
    ]
    true, grads = honest(n, dim=dim)
    averagers = []
    for i, dht in enumerate(dhts):
        params = [torch.nn.Parameter(torch.zeros(dim // 6)) for _ in range(6)]
        for param, grad in zip(params, grads[i].clone().chunk(6)):
            param.grad = grad.clone()
        # seed 4: the equivocating attacker lies to both other aggregators in the first round (each is a coin flip)
        hooks = AveragingAdversary(AttackConfig(name=attack, seed=4)).hooks() if i == n - 1 else None
        # every replica accumulates 4 samples: a claim above 16 is one no honest replica makes
        averager = RobustGradientAverager(
            params,
            dht=dht,
            prefix="test_avg",
            averaging=cfg,
            hooks=hooks,
            max_weight=16,
            start=True,
            min_matchmaking_time=2.0,
            request_timeout=1.0,
            target_group_size=n,
            min_vector_size=1,
            allreduce_timeout=8.0,
        )
        averager.accumulate_grads_(batch_size=4)
        averagers.append(averager)
    return dhts, averagers, true, grads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["avg-scale", "avg-weight", "avg-equivocate"])
def test_one_attacker_among_three_averagers(attack):
    """Three hivemind gradient averagers on a real DHT, one attacking its contribution: the honest two end with an
    average close to the honest mean (plain hivemind averaging would point the other way), and each honest one
    that aggregated a part of the attacker's contribution reports it and only it: a far-out norm (scale, the -20x
    parts of equivocation) or a claim of 400 samples (weight, whose flip of norm 1x hides in the honest spread)."""
    dhts, averagers, true, grads = _averagers(attack)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            done = [f.result() for f in [pool.submit(a.step, timeout=60) for a in averagers]]
        assert all(d is not None for d in done)
        mean_honest = torch.stack(grads[:2]).mean(0)
        for averager in averagers[:2]:
            with averager.get_tensors() as avg:
                assert cos(torch.cat(list(avg)), mean_honest) > 0.9, attack
        time.sleep(0.5)
        attacker = str(dhts[2].peer_id)
        reports = [averager.drain_outcomes() for averager in averagers[:2]]
        flagged = {peer for report in reports for peer, clean, _ in report if not clean}
        assert flagged == {attacker}, reports
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def _round(averagers, timeout: float = 60):
    """One averaging round of all averagers; the result of each (None: it failed, as a caught aggregator whose
    groupmates no longer send it anything does)."""
    for averager in averagers:
        averager.reset_accumulated_grads_()
        averager.accumulate_grads_(batch_size=4)
    return _state_round(averagers, timeout)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("attack", ["avg-aggregate", None])
def test_a_lying_aggregator_is_caught_by_rechecks_and_dropped(attack):
    """The attacker returns -5x the true aggregate of its slice to everyone. Every honest replica re-checks every
    other aggregator each round (verify_rate 2 among 3): the signed inputs it gets back do not reproduce what it
    received, so it counts an ``aggregate`` strike and stops using that aggregator (later rounds are clean again).
    Without an attack, no re-check fails (the recomputation reproduces the result to float rounding)."""
    cfg = AveragingConfig(verify_rate=2.0, verify_parts=2)
    dhts, averagers, true, grads = _averagers(
        attack or "avg-state", cfg=cfg, dim=600_000
    )  # avg-state: no-op here
    attacker = str(dhts[2].peer_id)
    mean_honest = torch.stack(grads[:2]).mean(0)
    try:
        outcomes, quality = [], []
        for _ in range(3):
            assert all(d is not None for d in _round(averagers, timeout=20)[:2])
            time.sleep(2.0)  # re-checks run after the round
            for averager in averagers[:2]:
                outcomes += averager.drain_outcomes()
                with averager.get_tensors() as avg:
                    quality.append(cos(torch.cat(list(avg)), mean_honest))
        checks = [(peer, clean) for peer, clean, reason in outcomes if reason == "aggregate"]
        assert checks, outcomes
        if attack is None:
            assert all(clean for _, clean in checks), checks
            assert (
                min(quality) > 0.95
            )  # the robust aggregate of three honest contributions, vs the mean of two
        else:
            caught = {peer for peer, clean in checks if not clean}
            assert caught == {attacker}, checks
            assert min(quality[-2:]) > 0.9, quality  # the last round does not use the caught aggregator
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(180)
def test_an_aggregator_that_serves_no_evidence_is_not_proven_wrong():
    """An aggregator whose evidence comes back empty (withheld, or a round it no longer holds) returned results that
    its signed inputs can neither confirm nor refute: an ``evidence`` strike (quorum rules), never an ``aggregate``
    proof that stops using it (seen live: an honest aggregator "off by 1", its empty evidence read as "no input")."""
    cfg = AveragingConfig(verify_rate=2.0, verify_parts=2)
    dhts, averagers, _, _ = _averagers("avg-state", cfg=cfg, dim=60_000)  # avg-state: no-op here

    class Forgetful(dict):  # the third aggregator keeps no round: its evidence stream is empty
        def __setitem__(self, key, value):
            pass

    averagers[2]._rounds = Forgetful()
    try:
        outcomes = []
        for _ in range(2):
            assert all(d is not None for d in _round(averagers, timeout=20))
            time.sleep(2.0)  # re-checks run after the round
            for averager in averagers[:2]:
                outcomes += averager.drain_outcomes()
        about = [(clean, reason) for peer, clean, reason in outcomes if peer == str(dhts[2].peer_id)]
        assert (False, "evidence") in about and (False, "aggregate") not in about, outcomes
        assert all(str(dhts[2].peer_id) not in a._caught for a in averagers[:2])
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(120)
def test_a_recheck_counts_the_checkers_own_part_whatever_the_evidence_says():
    """The checker knows its own input without anyone's evidence. The third aggregator aggregates honestly but serves
    no evidence of the first replica's parts: the first replica's re-check (its own part missing) reproduces the
    result with its own part counted, clean (seen in CI: an honest aggregator "off by 0.097", three inputs against
    two); the second replica's (another's part missing) cannot, and proves the aggregator wrong."""
    cfg = AveragingConfig(verify_rate=2.0, verify_parts=2)
    dhts, averagers, _, _ = _averagers("avg-state", cfg=cfg, dim=60_000)  # avg-state: no-op here
    left_out = averagers[0].peer_id.to_bytes()

    class Omitting(dict):  # the third aggregator's evidence leaves the first replica's parts out
        def __setitem__(self, key, value):
            full = value[0].round_inputs

            def round_inputs():
                kept = full()
                parts = {s: p for s, p in kept.parts.items() if s != left_out}
                return RoundInputs(kept.group_id, kept.aggregator, kept.senders, parts)

            value[0].round_inputs = round_inputs
            super().__setitem__(key, value)

    averagers[2]._rounds = Omitting()
    try:
        assert all(d is not None for d in _round(averagers, timeout=20))
        time.sleep(2.0)  # re-checks run after the round
        third = str(dhts[2].peer_id)
        first, second = (
            [o[1:] for o in a.drain_outcomes() if o[0] == third and o[2] == "aggregate"]
            for a in averagers[:2]
        )
        assert first == [(True, "aggregate")], first
        assert second == [(False, "aggregate")], second
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


# ---- the parameter (state) round ---------------------------------------------------------------------------------
class _StateRound(RobustAveraging, DecentralizedAverager):
    """The parameter round of VerifiedStateAverager, without an optimizer around it."""

    state_round = True


def _state_averagers(attack: Optional[str], n: int, dim: int = 60_000, bandwidths=None):
    dht0 = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [dht0] + [
        hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=dht0.get_visible_maddrs()
        )
        for _ in range(n - 1)
    ]
    torch.manual_seed(0)
    base = torch.randn(dim)
    replicas = [
        base + 1e-3 * torch.randn(dim) for _ in range(n)
    ]  # honest replicas: the same weights, give or take
    averagers = []
    for i, dht in enumerate(dhts):
        hooks = AveragingAdversary(AttackConfig(name=attack)).hooks() if attack and i == n - 1 else None
        averagers.append(
            _StateRound(
                list(replicas[i].clone().chunk(6)),
                dht=dht,
                prefix="test_state",
                averaging=CFG,
                hooks=hooks,
                start=True,
                min_matchmaking_time=2.0,
                request_timeout=1.0,
                target_group_size=n,
                min_vector_size=1,
                allreduce_timeout=8.0,
                bandwidth=(bandwidths or {}).get(i),
            )
        )
    return dhts, averagers, base, replicas


def _state_round(averagers, timeout: float = 30):
    """One round of every averager at once: the result of each (None where it failed)."""

    def step(averager):
        try:
            return averager.step(timeout=timeout)
        except Exception:
            return None

    with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
        return list(pool.map(step, averagers))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["avg-state", "avg-aggregate", None])
def test_parameter_round_among_three(attack):
    """hivemind averages parameters every epoch with a plain mean: one replica sending x5 parameters (or, as an
    aggregator, returning -5x) would set everyone's weights. Robust: the honest replicas end within their own
    spread of the honest weights, and the attacker is reported (``state``); a clean round averages as before. The
    attacker also claims a huge bandwidth, which in hivemind would make it aggregate nearly everything."""
    dhts, averagers, base, replicas = _state_averagers(attack, 3, bandwidths={2: 1e12})
    attacker = str(dhts[2].peer_id)
    try:
        assert all(r is not None for r in _state_round(averagers)[:2])
        time.sleep(1.0)
        for averager, before in zip(averagers[:2], replicas):
            with averager.get_tensors() as tensors:
                after = torch.cat([t.detach().clone() for t in tensors])
            assert (after - base).norm() <= 2 * (before - base).norm()
            if attack is None:  # the round did apply: every replica moved towards the others
                assert (after - before).norm() > 0
        flagged = {
            peer
            for a in averagers[:2]
            for peer, clean, reason in a.drain_outcomes()
            if not clean and reason == "state"
        }
        assert flagged == ({attacker} if attack else set())
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", ["avg-state", None])
def test_parameter_round_of_two(attack):
    """Of two replicas, neither is a majority: a partner's x5 weights change nothing (they would otherwise pull the
    honest replica to x3), while two honest replicas a little apart (as one failed gradient round leaves them) both
    move to their mean and end level."""
    dhts, averagers, base, replicas = _state_averagers("avg-state" if attack else None, 2)
    try:
        _state_round(averagers)
        after = []
        for averager in averagers:
            with averager.get_tensors() as tensors:
                after.append(torch.cat([t.detach().clone() for t in tensors]))
        if attack:
            assert torch.equal(after[0], replicas[0])
        else:
            mean = (replicas[0] + replicas[1]) / 2
            for values in after:
                assert torch.allclose(values, mean, atol=1e-6)
        assert not [o for o in averagers[0].drain_outcomes() if not o[1]]  # and nobody is blamed
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_equal_slices_whatever_bandwidth_is_claimed():
    from hivemind.utils.serializer import MSGPackSerializer

    class Group:
        gathered = [
            MSGPackSerializer.dumps((bw, mode, b"")) for bw, mode in [(1e12, 0), (1.0, 0), (5.0, 1), (1.0, 2)]
        ]

    fractions = RobustAveraging._equal_fractions(SimpleNamespace(serializer=MSGPackSerializer), Group())
    assert fractions == (1 / 3, 1 / 3, 0.0, 1 / 3)  # a client aggregates nothing; an auxiliary peer does


def test_nonfinite_contributions_are_left_out():
    """A contribution holding NaN or inf would make every coordinate of the aggregate NaN: it is left out and
    reported with an infinite norm (so slice_outliers flags it)."""
    true, grads = honest(4, dim=1000)
    poisoned = grads[3].clone()
    poisoned[7] = float("nan")
    outcome = robust_aggregate([*grads[:3], poisoned], CFG, distances=True)
    assert torch.isfinite(outcome.result).all()
    assert torch.equal(outcome.result, robust_aggregate(grads[:3], CFG).result)
    assert outcome.norms[3] == float("inf") and outcome.distances[3] == float("inf")
    assert slice_outliers([v * v for v in outcome.norms], CFG) == [False, False, False, True]
    alone = robust_aggregate([poisoned], CFG)
    assert alone.norms == [float("inf")] and not alone.result.any()  # nothing usable: zeros, not NaN


def test_coordinate_median_matches_torch():
    from swarm.averaging import coordinate_median

    for n in (1, 2, 3, 4, 7, 8, 16, 17):
        x = torch.randn(n, 999)
        assert torch.equal(coordinate_median(x), x.median(dim=0).values)


def test_leave_one_out_sums_match_a_direct_computation():
    _, grads = honest(4, dim=500)
    outcome = robust_aggregate(grads, CFG)
    for i, g in enumerate(grads):
        others = torch.stack([h for j, h in enumerate(grads) if j != i]).mean(0)
        assert outcome.loo_dots[i] == pytest.approx(float(g @ others), rel=1e-4)
        assert outcome.loo_sq[i] == pytest.approx(float(others @ others), rel=1e-4)
    assert robust_aggregate(grads[:2], CFG).loo_dots is None  # two senders: each one's "others" is the other


def test_direction_monitor_flags_a_consistent_flip_not_a_noisy_honest_replica():
    """Honest replicas (one of them much noisier, as one that accumulated fewer micro-batches) and one that sends
    its gradient flipped, all of honest norm, over 30 rounds: only the flip is ever flagged."""
    from swarm.averaging import DirectionMonitor, slice_cosines

    gen = torch.Generator().manual_seed(3)
    monitor, flagged = DirectionMonitor(window=8, t=3.0), set()
    for _ in range(30):
        g = torch.randn(2000, generator=gen) * 0.3
        sends = [g + torch.randn(2000, generator=gen) * s for s in (1.0, 1.0, 3.0)]
        sends.append(-(g + torch.randn(2000, generator=gen)))
        outcome = robust_aggregate(sends, CFG)
        cosines = slice_cosines(outcome.loo_dots, [v * v for v in outcome.norms], outcome.loo_sq)
        for i, cosine in enumerate(cosines):
            if monitor.observe(f"p{i}", cosine):
                flagged.add(i)
    assert flagged == {3}


def test_direction_monitor_is_bounded():
    from swarm.averaging import DirectionMonitor

    monitor = DirectionMonitor(window=4, max_senders=16)
    for i in range(1000):
        monitor.observe(f"id{i}", -1.0)
    assert len(monitor.history) == 16
    assert not monitor.observe("x", float("nan")) and "x" not in monitor.history


@pytest.mark.timeout(120)
def test_a_reported_sender_is_left_out_at_once_even_with_two_senders():
    """Two replicas, one handing the all-reduce -20x its gradient. Bounded to twice the honest norm it would still
    reverse the step (no majority of two). The honest replica reports it in the first round and, from the next one
    on, leaves it out of its own slice and does not use the attacker's slice: it steps on its own gradient."""
    dhts, averagers, true, grads = _averagers("avg-scale", n=2)
    # hivemind leaves SIGINT ignored in the process that creates an averager; ours puts the handler back (else every
    # process started from here, such as `swarm status --watch` in a later test, would ignore Ctrl-C)
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    try:
        first = _round(averagers, timeout=20)
        assert first[0] is not None
        reported = [o for o in averagers[0].drain_outcomes() if not o[1]]
        assert [peer for peer, _, _ in reported] == [str(dhts[1].peer_id)]
        for _ in range(2):  # still judged while left out: reported again each round, not silently ignored
            _round(averagers, timeout=20)
            with averagers[0].get_tensors() as avg:
                assert torch.allclose(torch.cat(list(avg)), grads[0])
            time.sleep(0.5)
            assert [o for o in averagers[0].drain_outcomes() if not o[1]] == reported
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_excluded_senders_are_still_judged():
    """A sender this aggregator excluded is not aggregated, but its norm and direction are measured against the
    included ones, so the aggregator keeps reporting it (or finds it clean again)."""
    from swarm.averaging import judge_excluded

    _, grads = honest(4, dim=800)
    flipped = -grads[3]
    outcome = robust_aggregate(grads[:3], CFG)
    judge_excluded(outcome, grads[:3], [flipped * 20])
    assert torch.equal(outcome.result, robust_aggregate(grads[:3], CFG).result)
    assert len(outcome.norms) == len(outcome.loo_dots) == 4
    assert outcome.norms[3] == pytest.approx(float((flipped * 20).norm()), rel=1e-5)
    assert outcome.loo_dots[3] < 0 < min(outcome.loo_dots[:3])
    assert slice_outliers([v * v for v in outcome.norms], CFG) == [False, False, False, True]


def _reduce_slice(parts, own_index=None, weights=None, max_weight=float("inf")):
    """One part aggregated by a RobustPartReducer from these senders; its SliceJudge (cosines, outliers)."""

    async def run():
        reducer = RobustPartReducer(
            [parts[0].shape], len(parts), CFG, own_index=own_index, max_weight=max_weight
        )
        await asyncio.gather(
            *(
                reducer.accumulate_part(i, 0, p, weight=w)
                for i, (p, w) in enumerate(zip(parts, weights or [1.0] * len(parts)))
            )
        )
        return reducer.judge

    return asyncio.run(run())


def test_a_flip_is_measured_against_the_aggregators_own_contribution_in_a_part_of_two():
    """In a part of two senders, one of them this aggregator, the other's cosine is taken against the aggregator's
    own contribution (the one it knows is honest): a flip of honest norm is measured every such round, and the
    direction test flags it over a window. Of two senders that are both others, nothing is measured (a negative
    cosine would not say which one flipped)."""
    from swarm.averaging import DirectionMonitor

    gen = torch.Generator().manual_seed(5)
    monitor, flagged, measured = DirectionMonitor(window=8, t=3.0), [], []
    for _ in range(12):
        g = torch.randn(3000, generator=gen) * 0.3
        mine, honest_other = (g + torch.randn(3000, generator=gen) for _ in range(2))
        flip = -(g + torch.randn(3000, generator=gen))
        for name, other in (("flip", flip), ("honest", honest_other)):
            cosine = _reduce_slice([mine, other], own_index=0).cosines()[1]
            measured.append(cosine)
            if monitor.observe(name, cosine):
                flagged.append(name)
    assert all(c == c for c in measured)  # measured in every round
    assert set(flagged) == {"flip"}
    strangers = _reduce_slice([honest(2)[1][0], -honest(2)[1][1]], own_index=None).cosines()
    assert all(c != c for c in strangers)  # NaN: not measured


def test_a_claimed_sample_count_above_the_stage_bound_is_reported():
    """Equal weights make an inflated claim harmless, but it is a lie no honest replica tells (more samples than the
    stage accumulates between two steps), and it is reported; a NaN claim too."""
    _, parts = honest(3, dim=64)
    assert _reduce_slice(parts, weights=[4.0, 4.0, 400.0], max_weight=16).outliers() == [False, False, True]
    assert _reduce_slice(parts, weights=[4.0, float("nan"), 8.0], max_weight=16).outliers() == [
        False,
        True,
        False,
    ]
    assert _reduce_slice(parts, weights=[4.0, 16.0, 0.0], max_weight=16).outliers() == [False, False, False]


def test_equivocation_sends_different_parts_to_different_aggregators():
    adversary = AveragingAdversary(AttackConfig(name="avg-equivocate", seed=0))
    hooks = adversary.hooks()
    seen = {"a": [], "b": []}
    for _ in range(40):
        hooks.contribution([torch.ones(3)])
        for aggregator in seen:
            seen[aggregator].append(float(hooks.part(aggregator, torch.ones(3))[0]))
            assert (
                float(hooks.part(aggregator, torch.ones(3))[0]) == seen[aggregator][-1]
            )  # one choice per round
    for values in seen.values():
        assert set(values) == {1.0, -20.0}
    assert any(a != b for a, b in zip(seen["a"], seen["b"]))


def test_a_weak_flip_is_caught_over_a_longer_memory():
    """Where honest gradients are nearly orthogonal (small micro-batches), a flip's cosine is small too: 8 rounds
    cannot tell -0.05 (sd 0.06) from noise, but the monitor keeps up to 32 and tests them all, at the same t."""
    from swarm.averaging import DirectionMonitor

    rng = torch.Generator().manual_seed(0)
    flips = (-0.05 + 0.06 * torch.randn(32, generator=rng)).tolist()
    honest_values = (
        0.0 + 0.06 * torch.randn(32, generator=rng)
    ).tolist()  # the worst honest case: expectation 0
    short, long = DirectionMonitor(window=8, memory=8), DirectionMonitor(window=8, memory=32)
    caught_short = [short.observe("flip", v) for v in flips]
    caught_long = [long.observe("flip", v) for v in flips]
    assert any(caught_long) and sum(caught_long) > sum(caught_short)
    assert not any(long.observe("honest", v) for v in honest_values)


def test_the_momentum_reference_catches_a_weak_flip_that_the_leave_one_out_test_misses():
    """Three replicas whose gradients are nearly orthogonal round by round (per-coordinate SNR 1/256: small
    batches), one of them flipping, judged by an honest aggregator over 64 rounds: with its own recent gradients as
    the reference the flip is caught; the leave-one-out test alone never sees it; no honest replica is flagged
    either way. The same SliceJudge and DirectionTest as the averager's and the simulator's."""
    from swarm.averaging import DirectionTest, SliceJudge, update_reference

    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(4000, generator=gen)
    with_ref, without = DirectionTest(CFG), DirectionTest(CFG)
    reference, caught_at, loo_flags, honest_flags = None, None, [], []
    for round_ in range(64):
        g = direction + 0.3 * torch.randn(4000, generator=gen)  # the true gradient drifts a little
        sends = [g + 16.0 * torch.randn(4000, generator=gen) for _ in range(3)]
        sends[2] = -sends[2]
        judge = SliceJudge(3, CFG, own_index=0)
        reference = update_reference(reference, [sends[0]], CFG.direction_momentum)  # the aggregator's own
        judge.combine([0, 1, 2], sends, reference=reference[0])
        loo, refc = judge.cosines(), judge.reference_cosines()
        if with_ref.observe("flip", loo[2], refc[2]) and caught_at is None:
            caught_at = round_
        honest_flags.append(bool(with_ref.observe("honest", loo[1], refc[1])))
        loo_flags.append(bool(without.observe("flip", loo[2])))
        honest_flags.append(bool(without.observe("honest", loo[1])))
    assert caught_at is not None, "the flip was never caught against the momentum reference"
    assert not any(loo_flags)
    assert not any(honest_flags)


def test_update_reference_is_an_average_of_unit_directions():
    from swarm.averaging import update_reference

    ref = update_reference(None, [torch.tensor([3.0, 4.0])], 0.5)
    assert torch.allclose(ref[0], torch.tensor([0.6, 0.8]))
    ref = update_reference(ref, [torch.tensor([0.0, -10.0])], 0.5)
    assert torch.allclose(ref[0], torch.tensor([0.3, -0.1]))
    assert (
        update_reference(ref, [torch.tensor([float("nan"), 0.0])], 0.5) is ref
    )  # a broken round changes nothing
    assert update_reference(ref, [torch.zeros(2)], 0.5) is ref
    assert update_reference(None, [torch.ones(2)], 0.0) is None


def test_reference_parts_follow_hivemind_partition():
    """The reference slices handed to an aggregator's parts are the same elements of the reference as the parts are
    of the round's tensors, however hivemind's partition cut them."""
    from hivemind.averaging.partition import TensorPartContainer

    from swarm.averaging import reference_parts

    tensors = [torch.randn(300), torch.randn(7, 50), torch.randn(1000)]
    reference = [t * 2 + 1 for t in tensors]
    container = TensorPartContainer(tensors, peer_fractions=(0.3, 0.3, 0.4), part_size_bytes=400)
    for peer in range(3):
        parts = container.get_raw_input_parts(peer)
        refs = reference_parts(parts, container.local_tensors, reference)
        assert len(refs) == len(parts) > 0
        for part, ref in zip(parts, refs):
            assert ref is not None and torch.equal(ref, part * 2 + 1)
    assert reference_parts([torch.randn(5)], tensors, reference) == [
        None
    ]  # not a view of the round's tensors
