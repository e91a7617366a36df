"""Tests for swarm.peer_table: LRU / TTL / protection semantics, and the memory bound of every per-peer table
(SENTINEL, router, reputation ledger) at 10,000 distinct senders."""

from __future__ import annotations

import gc
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from swarm.peer_table import DEFAULT_MAX_PEERS, PeerTable
from swarm.records import StageRecord
from swarm.reputation import ReputationLedger, tally_table
from swarm.router import Router, RouterConfig
from swarm.sentinel import BACKWARD, FORWARD, SentinelConfig, SentinelMonitor

MiB = 2**20
BOUND = 96 * MiB  # the bound stated in swarm/peer_table.py


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


# ------------------------------------------------------------------------------------------------ the table


def test_least_recently_used_is_evicted_first():
    table = PeerTable(3)
    for key in "abc":
        table[key] = key.upper()
    assert table["a"] == "A" and table.get("b") == "B" and "c" in table  # reads are not uses
    table["d"] = "D"
    assert list(table) == ["b", "c", "d"] and table.evicted == 1
    table["b"] = "B2"  # a write is a use
    table.setdefault("c", "ignored")  # so is setdefault of a present key
    table["e"] = "E"
    assert list(table) == ["b", "c", "e"] and table["b"] == "B2" and table["c"] == "C"
    assert table.touch("b") and not table.touch("zzz")
    table["f"] = "F"
    assert list(table) == ["e", "b", "f"]
    assert len(table) == 3 and dict(table.items()) == {"e": "E", "b": "B2", "f": "F"}
    assert [k for k, _ in table.newest()] == ["f", "b", "e"]
    del table["b"]
    assert table.pop("e") == "E" and table.pop("e", None) is None and list(table) == ["f"]
    with pytest.raises(KeyError):
        table.pop("e")
    with pytest.raises(ValueError):
        PeerTable(0)


def test_ttl_expires_unused_entries_lazily():
    clock = FakeClock()
    table = PeerTable(10, ttl_s=5.0, clock=clock)
    table["a"] = 1
    clock.advance(3)
    table["b"] = 2
    clock.advance(2)
    assert "a" in table and len(table) == 2  # exactly ttl_s old: still there
    clock.advance(0.5)
    assert "a" not in table and table.get("a") is None and len(table) == 1 and list(table) == ["b"]
    with pytest.raises(KeyError):
        table["a"]
    assert not table.touch("a") and table.setdefault("a", 9) == 9  # an expired entry is gone, not revived
    assert table.expired == 1  # dropped by the write above
    clock.advance(100)
    assert len(table) == 0 and list(table.newest()) == [] and table.items() == []
    table["c"] = 3
    assert list(table) == ["c"] and table.expired == 3


def test_protected_entries_are_evicted_last():
    """Protected entries get a second chance while an unprotected one exists; the bound still holds when none
    does, and the entry just written is never the one evicted for it."""
    table = PeerTable(3, protect=lambda key, value: value >= 10)
    table["old-protected"] = 10
    table["x"] = 1
    table["y"] = 1
    table["z"] = 1  # evicts x, the least recently used unprotected; old-protected gets a second chance
    assert list(table) == ["y", "z", "old-protected"]  # (passed over: moved to the most recently used end)
    table["p1"] = 10
    table["p2"] = 10
    assert list(table) == ["old-protected", "p1", "p2"]
    table["q"] = 1  # all others protected: the least recently used protected one goes
    assert list(table) == ["p1", "p2", "q"] and table.evicted == 4
    assert table["q"] == 1


def test_iteration_is_a_snapshot():
    table = PeerTable(4)
    for i in range(4):
        table[i] = i
    for key in table:  # writing while iterating (a dict would raise)
        table[key + 10] = key
    assert len(table) == 4


# ------------------------------------------------------------------------------------------------ the users


def info(peer: str, stage: int):
    return SimpleNamespace(record=StageRecord(peer_id=peer, stage=stage, state="online", throughput=0.0))


def test_ledger_keeps_established_tallies_under_a_flood():
    ledger = ReputationLedger(tallies=tally_table(32))
    for _ in range(5):
        ledger.record("honest", True, "forward")
    for _ in range(3):
        ledger.record("attacker", False, "forward", "log_rms")
    ledger.record("stranger", True, "forward")
    for i in range(1000):  # one message per fresh id: they evict each other, and the one-message stranger
        ledger.record(f"sybil{i}", False, "forward", "finite")
    assert len(ledger.tallies) == 32 and "stranger" not in ledger.tallies
    assert ledger.tallies["honest"].clean == 5 and ledger.tallies["attacker"].strikes == 3
    assert ReputationLedger().tallies.max_size == DEFAULT_MAX_PEERS


# ------------------------------------------------------------------------------------------------ the bound


def _act(hidden: int = 16) -> torch.Tensor:
    return torch.randn(2, 8, hidden)


def _grad() -> torch.Tensor:
    grad = torch.randn(2, 8, 16)
    grad[:, -1] = 0  # an honest causal-LM gradient is zero at the last position
    return grad


def _odd(i: int) -> torch.Tensor:
    """Malformed or odd tensors: other hidden sizes, non-finite, zero, huge, integer, 1-D, empty."""
    kind = i % 8
    if kind == 0:
        return torch.randn(1, 3, 8 + i % 97)
    if kind == 1:
        return torch.full((2, 8, 16), float("nan"))
    if kind == 2:
        return torch.zeros(2, 8, 16)
    if kind == 3:
        return torch.randn(2, 8, 16) * 1e9
    if kind == 4:
        return torch.randint(0, 100, (2, 8, 16))
    if kind == 5:
        return torch.randn(16)
    if kind == 6:
        return torch.randn(0, 16)
    return torch.randn(4, 8, 16) * 3


def _state_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_bounded_at_10000_distinct_senders():
    """10,000 distinct senders (half of them with a malformed or odd activation, the others with an activation and a
    gradient, a quarter with a loss) through a SentinelMonitor, a Router and a ReputationLedger at their default
    sizes, while three honest senders keep sending: every per-peer table is capped, the honest senders' state is
    kept, the state grows by less than the stated bound, and stops growing once the tables are full."""
    torch.manual_seed(0)
    clock = FakeClock()
    monitor, ledger = SentinelMonitor(), ReputationLedger()
    router = Router(2, RouterConfig(seed=0), clock=clock)
    context = _act()
    for i in range(60):  # three honest senders warm the baselines
        for direction, tensor in ((FORWARD, _act()), (BACKWARD, _grad())):
            ledger.record_verdict(
                monitor.check(
                    tensor,
                    f"honest{i % 3}",
                    direction,
                    microbatch=f"h{i}",
                    context=context if direction == BACKWARD else None,
                )
            )
    router.update({0: [info("honest0", 0)], 1: [info("honest1", 1)]})
    router.report_success(["honest0", "honest1"], {"honest0": 0.1, "honest1": 0.2})
    tracemalloc.start()
    try:
        base, at_7000 = _state_bytes(), 0
        for i in range(10_000):
            sender = f"12D3KooWSybil{i:06d}"
            verdicts = [monitor.check(_act() if i % 2 else _odd(i // 2), sender, FORWARD, microbatch=f"s{i}")]
            if i % 2:
                verdicts.append(monitor.check(_grad(), sender, BACKWARD, microbatch=f"s{i}", context=context))
            if i % 4 == 1:
                verdicts.append(monitor.check_loss(3.0 + (i % 7) / 10, sender, microbatch=f"s{i}"))
            if i % 25 == 0:  # the honest swarm keeps training meanwhile
                honest = f"honest{i // 25 % 3}"
                verdicts.append(monitor.check(_act(), honest, FORWARD, microbatch=f"h{i}"))
                verdicts.append(monitor.check(_grad(), honest, BACKWARD, microbatch=f"h{i}", context=context))
            for verdict in verdicts:
                ledger.record_verdict(verdict)
            if i % 50 == 0:
                router.update(
                    {
                        0: [info("honest0", 0)],
                        1: [info("honest1", 1)]
                        + [info(f"12D3KooWSybil{j:06d}", 1) for j in range(max(0, i - 1000), i + 1)],
                    }
                )
                chain = router.pick_chain()
                router.release(chain)
            router.report_failure(sender, "rejected", judge=f"judge{i % 97}")
            if i % 3 == 0:
                router.report_failure(sender, "timeout")
            clock.advance(0.05)
            if i == 6_999:
                at_7000 = _state_bytes()
        grown, plateau = _state_bytes() - base, _state_bytes() - at_7000
    finally:
        tracemalloc.stop()
    cap = DEFAULT_MAX_PEERS
    tables = [
        monitor.senders,
        monitor.momentum,
        monitor.momentum_count,
        monitor.relative,
        *monitor.latest.values(),
        *monitor.last_seen.values(),
        router.peers,
        router.suspects,
        router.judges,
        router.bans._bans,
        ledger.tallies,
    ]
    assert all(len(table) <= cap for table in tables), [len(table) for table in tables]
    assert len(monitor.senders) == cap and len(ledger.tallies) == cap and len(monitor._projections) <= 4
    assert ("honest0", FORWARD) in monitor.senders  # warm baselines are kept
    assert all(ledger.tallies[f"honest{k}"].clean >= 20 for k in range(3))
    assert router.peers["honest1"].time_ema_s == pytest.approx(0.2)
    print(
        f"per-peer state grew by {grown / MiB:.1f} MiB for 10,000 senders, {plateau / MiB:.2f} MiB over the last 3,000"
    )
    assert grown < BOUND
    assert plateau < 2 * MiB  # full tables: fresh senders replace old ones


def test_worst_case_fits_the_bound():
    """The flood above leaves most keys with little state. The most a key can hold: a sender that sent
    ``warmup - 1`` tensors in every direction (its baseline's warm-up is kept whole), with a momentum, a suspect mark
    and the latest references; a suspect of ``max_judges`` judges, banned, measured; a tally with many reasons. Tables
    of ``K`` keys filled with such entries (one sender after the other, so that every table ends up full of them),
    scaled to the default sizes, stay under the bound."""
    torch.manual_seed(1)
    keys = 128
    clock = FakeClock()
    monitor = SentinelMonitor(SentinelConfig(max_senders=keys))
    context = _act()
    for i in range(60):
        monitor.check(_act(), f"honest{i % 3}", FORWARD, microbatch=f"h{i}")
        monitor.check(_grad(), f"honest{i % 3}", BACKWARD, microbatch=f"h{i}", context=context)
    router = Router(2, RouterConfig(seed=0, max_peers=keys), clock=clock)
    ledger = ReputationLedger(tallies=tally_table(keys))
    tracemalloc.start()
    try:
        base = _state_bytes()
        for i in range(keys):
            sender = f"12D3KooWSybil{i:06d}"
            for r in range(monitor.cfg.warmup - 1):
                monitor.check(_act(), sender, FORWARD, microbatch=f"s{i}.{r}")
                monitor.check(_grad(), sender, BACKWARD, microbatch=f"s{i}.{r}", context=context)
                monitor.check_loss(3.0, sender, microbatch=f"s{i}.{r}")
            router.update({0: [info(sender, 0)], 1: []})
            router.report_success([sender], {sender: 0.1})
            for j in range(router.cfg.max_judges):
                router.report_failure(sender, "rejected", judge=f"12D3KooWJudge{i:06d}.{j:02d}")
            router.report_failure(sender, "timeout")
            for reason in range(10):
                ledger.record(sender, False, FORWARD, f"reason{reason}")
                ledger.record(sender, True, BACKWARD)
        used = _state_bytes() - base
    finally:
        tracemalloc.stop()
    tables = [
        monitor.senders,
        monitor.momentum,
        monitor.momentum_count,
        monitor.relative,
        *monitor.latest.values(),
        *monitor.last_seen.values(),
        router.peers,
        router.suspects,
        router.judges,
        router.bans._bans,
        ledger.tallies,
    ]
    assert all(keys - 8 <= len(table) <= keys for table in tables), [
        len(table) for table in tables
    ]  # all full
    worst = used * DEFAULT_MAX_PEERS / keys
    print(
        f"worst case: {used / keys:.0f} B per key of every table, {worst / MiB:.1f} MiB at {DEFAULT_MAX_PEERS} keys"
    )
    assert worst < BOUND
