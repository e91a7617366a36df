"""Tests for swarm.router: chain choice, learning peer speed, spreading load, local bans and the blacklist."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest

from swarm.records import StageRecord
from swarm.router import LocalBans, NoRouteError, Router, RouterConfig


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def info(peer: str, stage: int, state: str = "online", throughput: float = 0.0):
    """A stand-in for network.PeerInfo: the router only reads ``.record``."""
    return SimpleNamespace(record=StageRecord(peer_id=peer, stage=stage, state=state, throughput=throughput))


def make_router(layout, *, seed=0, clock=None, is_blacklisted=None, **cfg):
    """layout: {stage: [peer ids]} -> a Router over len(layout) stages, updated with those peers online."""
    router = Router(
        len(layout), RouterConfig(seed=seed, **cfg), clock=clock or FakeClock(), is_blacklisted=is_blacklisted
    )
    router.update({stage: [info(p, stage) for p in peers] for stage, peers in layout.items()})
    return router


def measure(router: Router, times: dict) -> None:
    """Teach the router each peer's time per micro-batch, as completed chains would."""
    router.report_success(list(times), times)


# ------------------------------------------------------------------------------------------------ chains


def test_chain_has_one_peer_per_stage():
    layout = {0: ["a0", "a1"], 1: ["b0", "b1", "b2"], 2: ["c0"]}
    router = make_router(layout)
    for _ in range(50):
        chain = router.pick_chain()
        assert len(chain) == 3
        assert all(peer in layout[stage] for stage, peer in enumerate(chain))
        router.release(chain)


def test_only_online_peers_are_used():
    router = Router(2, RouterConfig(seed=1), clock=FakeClock())
    router.update(
        {
            0: [info("a-online", 0), info("a-joining", 0, "joining"), info("a-offline", 0, "offline")],
            1: [info("b-offline", 1, "offline"), info("b-online", 1)],
            7: [info("ghost", 7)],  # a stage this router does not have
        }
    )
    assert router.live == {0: ["a-online"], 1: ["b-online"]}
    assert "ghost" not in router.peers
    for _ in range(20):
        chain = router.pick_chain()
        assert chain == ["a-online", "b-online"]
        router.release(chain)
    # a peer going offline disappears with the next update
    router.update({0: [info("a-online", 0, "offline")], 1: [info("b-online", 1)]})
    with pytest.raises(NoRouteError, match="stage 0: no peer announced"):
        router.pick_chain()


def test_prefers_faster_measured_peer():
    router = make_router({0: ["fast0", "slow0"], 1: ["fast1", "slow1"]}, jitter=0.1)
    measure(router, {"fast0": 0.1, "slow0": 1.0, "fast1": 0.2, "slow1": 2.0})
    assert router.pick_chain() == ["fast0", "fast1"]
    router.release(router.last_chain)
    picks = Counter()
    for _ in range(400):
        chain = router.pick_chain()
        picks.update(chain)
        router.report_success(chain, {"fast0": 0.1, "slow0": 1.0, "fast1": 0.2, "slow1": 2.0})
        router.release(chain)
    # the fast chain wins every time it is allowed; the no-repeat rule sends every other pick elsewhere
    assert picks["fast0"] > 0.65 * 400 and picks["fast1"] > 0.65 * 400
    assert 0 < picks["slow0"] < 0.35 * 400 and 0 < picks["slow1"] < 0.35 * 400


def test_speed_is_learned_from_report_success():
    router = make_router({0: ["a", "b"]}, jitter=0.0, ema_alpha=0.5)
    chain = router.pick_chain()
    router.report_success(chain, {chain[0]: 3.0})
    state = router.peers[chain[0]]
    assert state.time_ema_s == 3.0 and state.succeeded == 1
    router.report_success(chain, {chain[0]: 1.0})
    assert state.time_ema_s == pytest.approx(2.0)
    for bad in (math.nan, math.inf, -1.0):
        router.report_success(chain, {chain[0]: bad})
        assert state.time_ema_s == pytest.approx(2.0)
    router.report_success(chain, {})  # no timing: counted, not measured
    assert state.succeeded == 6 and state.time_ema_s == pytest.approx(2.0)
    router.report_success(["unknown-peer"], {"unknown-peer": 1.0})  # ignored
    assert "unknown-peer" not in router.peers


def test_inflight_load_spreads_picks():
    router = make_router({0: ["fast", "slow"]}, jitter=0.0)
    measure(router, {"fast": 1.0, "slow": 2.5})
    picks = []
    for _ in range(21):
        router.last_chain = None  # isolate the busy-time rule from the no-repeat rule
        picks.append(router.pick_chain()[0])  # never released: every pick stays in flight
    assert picks[:3] == ["fast", "fast", "slow"]  # busy times 1 < 2.5, 2 < 2.5, then 3 > 2.5
    counts = Counter(picks)
    assert 13 <= counts["fast"] <= 16 and 5 <= counts["slow"] <= 8  # in proportion to speed, ~2.5 : 1
    assert router.peers["fast"].inflight == counts["fast"]
    # releasing brings the load back down
    for peer in picks:
        router.release([peer])
    assert router.peers["fast"].inflight == router.peers["slow"].inflight == 0


def test_no_repeat_rule_alternates_when_one_stage_has_a_choice():
    router = make_router({0: ["fast", "slow"], 1: ["only"]}, jitter=0.0)
    measure(router, {"fast": 1.0, "slow": 3.0, "only": 1.0})
    picks = [router.pick_chain()[0] for _ in range(12)]  # never released
    # stage 0 is the only stage with an alternative, so the chain must change there every time
    assert picks == ["fast", "slow"] * 6


def test_never_the_same_chain_twice_in_a_row():
    router = make_router({0: ["a0", "a1"], 1: ["b0", "b1"], 2: ["c0"]}, jitter=0.05)
    measure(router, {"a0": 0.1, "a1": 5.0, "b0": 0.1, "b1": 5.0, "c0": 1.0})  # one chain is far better
    previous = None
    for _ in range(300):
        chain = router.pick_chain()
        assert chain != previous
        assert chain[2] == "c0"
        previous = chain
        router.release(chain)


def test_stage_with_a_single_peer_works():
    router = make_router({0: ["a0", "a1"], 1: ["b-only"]})
    for _ in range(20):
        chain = router.pick_chain()
        assert chain[1] == "b-only"
        router.release(chain)
    solo = make_router({0: ["a"], 1: ["b"]})
    assert [solo.pick_chain() for _ in range(3)] == [["a", "b"]] * 3  # no alternative: the same chain is fine
    assert solo.peers["a"].inflight == 3 and solo.peers["a"].chosen == 3


def test_new_peer_enters_at_the_stage_best_estimate():
    router = make_router({0: ["a", "b"]}, jitter=0.0)
    measure(router, {"a": 0.5, "b": 2.0})
    router.update({0: [info("a", 0), info("b", 0), info("new", 0)]})
    assert router.expected_time_s(router.peers["new"]) == 0.5
    # with nothing measured a peer's announced throughput sets its expectation, else 1 s
    router.microbatch_size = 8
    router.update({0: [info("x", 0, throughput=16.0), info("y", 0)]})
    assert router.expected_time_s(router.peers["x"]) == pytest.approx(0.5)
    assert router.expected_time_s(router.peers["y"]) == 1.0


def test_peer_changing_stage_gets_a_fresh_state():
    router = make_router({0: ["p"], 1: ["q"]})
    measure(router, {"p": 0.3})
    router.update({0: [info("q", 0)], 1: [info("p", 1)]})
    assert router.peers["p"].stage == 1 and router.peers["p"].time_ema_s is None
    assert router.pick_chain() == ["q", "p"]


def test_release_never_goes_negative():
    router = make_router({0: ["a"]})
    router.release(["a", "a", "unknown"])
    assert router.peers["a"].inflight == 0


# ------------------------------------------------------------------------------------------------ no route


def test_no_route_names_the_stage_without_peers():
    router = make_router({0: ["a"], 1: [], 2: ["c"]})
    with pytest.raises(NoRouteError, match="no usable peer for stage 1: no peer announced") as err:
        router.pick_chain()
    assert err.value.stage == 1
    assert isinstance(err.value, RuntimeError)


def test_no_route_when_all_peers_are_banned():
    clock = FakeClock()
    router = make_router({0: ["a"], 1: ["b0", "b1"]}, clock=clock)
    assert router.report_failure("b0", "timeout") == 5.0
    assert router.pick_chain() == ["a", "b1"]
    router.report_failure("b1", "bad gradients")
    assert router.peers["b1"].failed == 1
    with pytest.raises(
        NoRouteError, match=r"stage 1: all 2 peer\(s\) banned, blacklisted or excluded"
    ) as err:
        router.pick_chain()
    assert err.value.stage == 1
    clock.advance(5.0)  # both bans were 5 s long
    assert router.pick_chain()[1] in {"b0", "b1"}


def test_no_route_when_all_peers_are_excluded():
    router = make_router({0: ["a0", "a1"], 1: ["b"]})
    assert router.pick_chain(exclude=["a0"])[0] == "a1"
    with pytest.raises(NoRouteError, match="stage 0: all 2 peer"):
        router.pick_chain(exclude=["a0", "a1"])


def test_blacklist_predicate_excludes_peers():
    blacklist = {"evil"}
    router = make_router({0: ["evil", "good"], 1: ["b"]}, is_blacklisted=blacklist.__contains__)
    for _ in range(20):
        chain = router.pick_chain()
        assert chain[0] == "good"
        router.release(chain)
    assert router.usable(0) == ["good"]
    blacklist.add("good")
    with pytest.raises(NoRouteError, match="stage 0"):
        router.pick_chain()
    blacklist.clear()
    assert set(router.usable(0)) == {"evil", "good"}


# ------------------------------------------------------------------------------------------------ bans


def test_ban_backoff_doubles_and_is_capped():
    bans = LocalBans(base_s=5.0, max_s=300.0, clock=FakeClock())
    durations = [bans.ban("p", f"failure {i}") for i in range(9)]
    assert durations == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert bans.reason("p") == "failure 8"


def test_ban_expires_with_the_clock():
    clock = FakeClock()
    bans = LocalBans(base_s=5.0, max_s=300.0, clock=clock)
    assert not bans.is_banned("p") and bans.reason("p") is None
    bans.ban("p", "timeout")
    assert bans.is_banned("p") and bans.reason("p") == "timeout"
    clock.advance(4.9)
    assert bans.is_banned("p")
    clock.advance(0.1)
    assert not bans.is_banned("p") and bans.reason("p") is None
    # the strike is remembered after expiry: the next ban is longer
    assert bans.ban("p", "again") == 10.0
    clock.advance(9.99)
    assert bans.is_banned("p")
    clock.advance(0.01)
    assert not bans.is_banned("p")


def test_sentinel_verdict_bans_are_short_and_do_not_escalate():
    """A rejected tensor bans its sender for verdict_ban_s each time (it keeps meeting receivers, so the evidence
    for a swarm-wide blacklist accumulates); a longer ban already in force is kept; failures still escalate."""
    clock = FakeClock()
    router = make_router({0: ["a"], 1: ["b0", "b1"]}, clock=clock)
    assert [
        router.report_failure("b0", "stage 1 rejected forward tensor: log_rms", judge="a") for _ in range(4)
    ] == [2.0, 2.0, 2.0, 2.0]
    assert router.peers["b0"].failed == 4
    clock.advance(2.0)
    assert not router.bans.is_banned("b0")
    assert router.report_failure("b1", "timeout") == 5.0  # not escalated by the verdicts of another peer
    assert router.report_failure("b0", "timeout") == 5.0  # verdicts add no escalation strikes
    clock.advance(1.0)
    assert router.report_failure("b0", "rejected", judge="a") == pytest.approx(4.0)  # the 5 s ban is kept
    assert router.bans.reason("b0") == "timeout"
    assert router.report_failure("b0", "timeout") == 10.0


def test_suspect_spread_evenly_over_receivers():
    """By speed, the fastest receiver would see all of a suspect's tensors; once a receiver rejected one, the
    suspect's neighbours are drawn uniformly (so several receivers gather evidence, and an accomplice that never
    judges it is not favoured either), in both directions."""
    clock = FakeClock()
    router = make_router({0: ["a0", "a1"], 1: ["x", "b"], 2: ["c0", "c1", "c2"]}, clock=clock)
    for peer, seconds in {"a0": 0.1, "a1": 0.5, "x": 0.1, "b": 0.9, "c0": 0.1, "c1": 0.2, "c2": 0.3}.items():
        router.peers[peer].time_ema_s = seconds
    assert router.pick_chain() == ["a0", "x", "c0"]
    router.release(["a0", "x", "c0"])
    router.report_failure("x", "stage 2 rejected forward tensor: log_rms", judge="c0")
    assert dict(router.judges["x"]) == {"c0": 1}
    seen = Counter()
    banned_until = clock() + 2.0  # the verdict's ban
    for _ in range(600):
        clock.advance(0.1)
        router.last_chain = None
        chain = router.pick_chain()
        router.release(chain)
        assert "x" not in chain or clock() >= banned_until
        if chain[1] == "x":
            seen.update([chain[0], chain[2]])
    assert 150 <= seen["a1"] <= 450 and all(100 <= seen[c] <= 300 for c in ("c0", "c1", "c2")), seen


def test_slow_suspect_is_retried_then_forgotten():
    """A suspect the router would never pick by speed is put in about half the chains while it is a suspect (so
    evidence about it keeps coming), and picked by speed again once suspect_memory_s has passed."""
    clock = FakeClock()
    router = make_router({0: ["a"], 1: ["fast", "slow", "other"]}, clock=clock)
    for peer, seconds in {"a": 0.1, "fast": 0.1, "slow": 5.0, "other": 0.2}.items():
        router.peers[peer].time_ema_s = seconds
    router.report_failure("slow", "stage 1 rejected backward tensor: causal_tail", judge="a")
    clock.advance(2.0)
    picks = Counter()
    for _ in range(400):
        chain = router.pick_chain()
        router.release(chain)
        picks[chain[1]] += 1
    assert 140 <= picks["slow"] <= 260, picks
    clock.advance(router.cfg.suspect_memory_s)
    picks = Counter()
    for _ in range(100):
        chain = router.pick_chain()
        router.release(chain)
        picks[chain[1]] += 1
    assert picks["slow"] == 0, picks


def test_success_halves_strikes():
    clock = FakeClock()
    bans = LocalBans(base_s=5.0, max_s=300.0, clock=clock)
    for _ in range(4):
        bans.ban("p", "x")  # strikes 4: the last ban was 40 s
    bans.success("p")  # strikes 2
    assert bans.is_banned("p")  # a success does not lift an active ban
    assert bans.ban("p", "x") == 20.0  # strikes 3
    bans.success("p")  # 1
    bans.success("p")  # 0, but the ban is still running
    assert bans.is_banned("p")
    clock.advance(20.0)
    bans.success("p")  # strikes 0 and expired: forgotten
    assert "p" not in bans._bans
    assert bans.ban("p", "x") == 5.0
    bans.success("unknown")  # no-op


def test_router_success_halves_strikes():
    clock = FakeClock()
    router = make_router({0: ["a", "b"]}, clock=clock)
    assert [router.report_failure("a", "t") for _ in range(3)] == [5.0, 10.0, 20.0]
    clock.advance(20.0)
    router.report_success(["a"], {"a": 1.0})
    assert router.report_failure("a", "t") == 10.0  # 3 strikes halved to 1, so this is the 2nd


def test_router_ban_backoff_is_configurable():
    router = make_router({0: ["a"]}, ban_base_s=1.0, ban_max_s=3.0)
    assert [router.report_failure("a", "t") for _ in range(4)] == [1.0, 2.0, 3.0, 3.0]


# ------------------------------------------------------------------------------------------------ load spread


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_load_spreads_evenly_over_replicas(seed):
    layout = {0: ["a0", "a1"], 1: ["b0", "b1"], 2: ["c0", "c1"]}
    router = make_router(layout, seed=seed)
    picks = Counter()
    n = 1000
    for _ in range(n):
        chain = router.pick_chain()
        picks.update(chain)
        router.report_success(chain, {peer: 0.5 for peer in chain})
        router.release(chain)
    for peers in layout.values():
        for peer in peers:
            assert 0.35 * n <= picks[peer] <= 0.65 * n, (peer, picks)
    assert all(state.inflight == 0 for state in router.peers.values())


def test_load_spreads_over_three_replicas():
    router = make_router({0: ["a0", "a1", "a2"]}, seed=3)
    picks = Counter()
    for _ in range(900):
        chain = router.pick_chain()
        picks.update(chain)
        router.release(chain)
    assert all(200 <= picks[p] <= 400 for p in ("a0", "a1", "a2")), picks


def test_seeded_router_is_deterministic():
    def run(seed):
        router = make_router({0: ["a0", "a1"], 1: ["b0", "b1"]}, seed=seed)
        chains = []
        for _ in range(50):
            chains.append(router.pick_chain())
            router.release(chains[-1])
        return chains

    assert run(7) == run(7)


@pytest.mark.parametrize(
    "kwargs",
    [dict(ema_alpha=0.0), dict(ema_alpha=1.5), dict(jitter=1.0), dict(jitter=-0.1), dict(ban_base_s=0.0)],
)
def test_router_config_validation(kwargs):
    with pytest.raises(ValueError, match="router"):
        RouterConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ bounded state


def test_bans_in_force_are_kept_preferentially():
    clock = FakeClock()
    bans = LocalBans(base_s=5.0, max_s=300.0, clock=clock, max_peers=4)
    for _ in range(7):
        bans.ban("bad", "timeout")  # escalated: a 300 s ban
    for i in range(3):
        bans.ban(f"over{i}", "timeout")
    clock.advance(10)  # those three bans are over; bad's is not
    for i in range(3):
        bans.ban(f"new{i}", "timeout")
        assert bans.is_banned("bad")
    assert set(bans._bans) == {"bad", "new0", "new1", "new2"}
    # all four in force: the bound wins, and the least recently used goes (bad was passed over above, which counts
    # as a use: new0 goes)
    bans.ban("new3", "timeout")
    assert set(bans._bans) == {"bad", "new1", "new2", "new3"} and not bans.is_banned("new0")
    with pytest.raises(ValueError):
        LocalBans(max_s=300.0, memory_s=100.0)  # a ban in force must never expire from memory


def test_ban_memory_forgets_strikes_of_peers_not_seen_for_long():
    clock = FakeClock()
    bans = LocalBans(base_s=5.0, max_s=300.0, clock=clock, memory_s=600.0)
    assert [bans.ban("p", "timeout") for _ in range(3)] == [5, 10, 20]
    clock.advance(599)
    assert bans.ban("p", "timeout") == 40  # remembered: within memory_s of the last ban
    clock.advance(601)
    assert bans.ban("p", "timeout") == 5  # forgotten: starts again


def test_router_survives_a_flood_of_announced_peers():
    """More announced peers than the table holds: routing still works, measured peers are kept, tables are capped."""
    clock = FakeClock()
    router = Router(2, RouterConfig(seed=0, max_peers=64), clock=clock)
    router.update({0: [info("a", 0)], 1: [info("b", 1)]})
    router.report_success(["a", "b"], {"a": 0.1, "b": 0.2})
    flood = [info(f"sybil{i}", 1) for i in range(1000)]
    router.update({0: [info("a", 0)], 1: [info("b", 1)] + flood})
    assert len(router.peers) == 64 and router.peers["b"].time_ema_s == pytest.approx(0.2)
    for i in range(200):
        chain = router.pick_chain()
        router.report_failure(chain[1], "rejected", judge=f"judge{i}")
        router.release(chain)
        clock.advance(0.01)
    assert len(router.peers) <= 64 and len(router.suspects) <= 64 and len(router.bans._bans) <= 64
    assert all(state.inflight == 0 for state in router.peers.values()) and len(router.judges) <= 64
    clock.advance(
        router.cfg.suspect_memory_s + 1
    )  # suspects (and their judges) expire with the suspect memory
    assert (
        len(router.suspects) == 0
        and len(router.judges) == 0
        and not any(map(router.is_suspect, router.peers))
    )
